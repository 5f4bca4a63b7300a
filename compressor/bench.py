"""`compress bench`: prefill (attention alone and whole model), decode step time and KV bytes for dense,
the plan, and the uniform baseline at the plan's density — ratios against dense measured in the same run.

Every figure is the median over repeats; methods alternate inside each repeat so that machine load hits
all of them alike.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from compressor.args import BenchArgs
from plans.schema import Plan


@dataclass
class MethodResult:
    method: str
    n: int
    density: float
    kv_density: float
    attn_prefill_ms: float | None = None
    model_prefill_ms: float | None = None
    decode_step_ms: float | None = None
    decode_tok_s: float | None = None
    attn_decode_ms: float | None = None  # dense only: every layer's attention over an N-slot cache, one step
    kv_bytes: int | None = None
    ratios: dict = field(default_factory=dict)


def _timeit(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def attention_only_ms(plan: Plan | None, n: int, dtype=torch.float32, seed: int = 0) -> callable:
    """A closure running every layer's attention once at length n (dense SDPA when plan is None)."""
    from attention_kernels.dispatch import sparse_attention

    ident = plan.model if plan is not None else None
    g = torch.Generator().manual_seed(seed)

    def make(hq, hkv, d):
        q = torch.randn(1, hq, n, d, generator=g, dtype=dtype)
        k = torch.randn(1, hkv, n, d, generator=g, dtype=dtype)
        return q, k, torch.randn(1, hkv, n, d, generator=g, dtype=dtype)

    def run_dense(layers, hq, hkv, d):
        q, k, v = make(hq, hkv, d)

        def f():
            for _ in range(layers):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return f

    if plan is None:
        return run_dense
    spans = [plan.spans(li, n).clamp(max=n) for li in range(ident.num_layers)]
    sinks = [plan.sinks(li) for li in range(ident.num_layers)]

    def run_plan(layers, hq, hkv, d):
        q, k, v = make(hq, hkv, d)

        def f():
            for li in range(layers):
                sparse_attention(q, k, v, sinks[li], spans[li], None)
        return f

    return run_plan


def attention_decode_only(n: int, layers: int, hq: int, hkv: int, d: int, dtype=torch.float32, seed: int = 0):
    """A closure running one dense decode step's attention for every layer: one query token over an N-slot KV
    cache per layer, one grouped-query SDPA call each (:func:`attention_kernels.cpu_decode.sdpa_decode`, the
    dense baseline of ``benchmarks/decode_cpu.py``); a separate cache per layer, as a real model reads."""
    from attention_kernels.cpu_decode import sdpa_decode

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, d, generator=g, dtype=dtype)
    caches = [(torch.randn(1, hkv, n, d, generator=g, dtype=dtype), torch.randn(1, hkv, n, d, generator=g, dtype=dtype))
              for _ in range(layers)]
    kv_len = torch.full((1, hkv), n, dtype=torch.int64)

    def f():
        for k, v in caches:
            sdpa_decode(q, k, v, kv_len)
    return f


def bench(model, plan: Plan, args: BenchArgs = BenchArgs(), *, progress: bool = False) -> list[MethodResult]:
    """Measure dense, ``plan`` and the uniform plan of the same prefill density at every length of ``args``
    (:class:`BenchArgs`). With ``progress``: a bar on a terminal, plain lines on stderr otherwise (see
    :mod:`profilers.progress`), one step per case. The model's attention implementation is restored afterwards."""
    from compressor.hf.plan_cache import dense_cache_bytes
    from compressor.methods import methods_at
    from compressor.patching import plan_applied
    from profilers.progress import progress as progress_helper

    lengths, repeats, decode, decode_steps = list(args.lengths), args.repeats, args.decode, args.decode_steps
    attention, whole_model, time_decode_prefill = args.attention, args.whole_model, args.time_decode_prefill
    ident = plan.model
    results: list[MethodResult] = []
    per_n = {n: len(methods_at({"plan": plan}, n, ("prefill_density",))) * (repeats + (1 if decode else 0))
             for n in lengths}
    prog = progress_helper("bench", total=sum(per_n.values()), unit="cases",
                           work_total=sum(c * n for n, c in per_n.items()), enabled=progress)
    with prog as tick:
        for n in lengths:
            # dense, the plan, uniform at the plan's density
            methods = {m.name: m.plan for m in methods_at({"plan": plan}, n, ("prefill_density",))}
            res = {m: MethodResult(m, n, 1.0 if p is None else p.density(n), 1.0 if p is None else p.kv_density(n))
                   for m, p in methods.items()}
            vocab = model.get_input_embeddings().num_embeddings
            ids = torch.randint(min(100, vocab // 2), vocab, (1, n), generator=torch.Generator().manual_seed(n))
            times: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
            tick(0, stage=f"bench N={n} prefill")
            for _ in range(repeats):
                for m, p in methods.items():
                    tick(0, method=m)
                    if attention:
                        f = attention_only_ms(p, n)(ident.num_layers, ident.num_heads, ident.num_kv_heads,
                                                    ident.head_dim)
                        times[m].setdefault("attn", []).extend(_timeit(f, 1))
                    if whole_model:
                        with plan_applied(model, p), torch.no_grad():
                            times[m].setdefault("model", []).extend(_timeit(lambda: model(ids, use_cache=False), 1))
                    tick(1, work=n)
            if decode:
                tick(0, stage=f"bench N={n} decode")
                for m, p in methods.items():
                    tick(0, method=m)
                    with plan_applied(model, p), torch.no_grad():
                        t = time.perf_counter()
                        cache, nxt = _prefill(model, ids, p is not None)
                        if time_decode_prefill and whole_model:
                            times[m].setdefault("model", []).append((time.perf_counter() - t) * 1000)
                        _, step = _decode_steps(model, nxt, cache, decode_steps)
                        res[m].kv_bytes = cache.nbytes() if p is not None else dense_cache_bytes(model, n + decode_steps)
                    res[m].decode_step_ms = statistics.median(step)
                    res[m].decode_tok_s = 1000 / res[m].decode_step_ms
                    if attention and p is None:
                        f = attention_decode_only(n, ident.num_layers, ident.num_heads, ident.num_kv_heads,
                                                  ident.head_dim)
                        f()
                        res[m].attn_decode_ms = statistics.median(_timeit(f, max(3, decode_steps)))
                    tick(1, work=n)
            for m in methods:
                if "attn" in times[m]:
                    res[m].attn_prefill_ms = statistics.median(times[m]["attn"])
                if "model" in times[m]:
                    res[m].model_prefill_ms = statistics.median(times[m]["model"])
            d = res["dense"]
            share = attention_share(d.attn_prefill_ms, d.model_prefill_ms)
            decode_share = attention_share(d.attn_decode_ms, d.decode_step_ms)
            for m in methods:
                r = res[m]
                for key in ("attn_prefill_ms", "model_prefill_ms", "decode_step_ms"):
                    a, b = getattr(d, key), getattr(r, key)
                    if a and b:
                        r.ratios[key.replace("_ms", "_speedup")] = a / b
                if d.kv_bytes and r.kv_bytes:
                    r.ratios["kv_bytes_fraction"] = r.kv_bytes / d.kv_bytes
                if share is not None and "model_prefill_speedup" in r.ratios:
                    ideal = ideal_model_speedup(share, r.density)
                    r.ratios.update(attention_share=share, ideal_model_speedup=ideal,
                                    fraction_of_ideal=r.ratios["model_prefill_speedup"] / ideal)
                if decode_share is not None and "decode_step_speedup" in r.ratios:
                    ideal = ideal_model_speedup(decode_share, r.kv_density)  # decode reads the kept KV only
                    r.ratios.update(decode_attention_share=decode_share, ideal_decode_speedup=ideal,
                                    decode_fraction_of_ideal=r.ratios["decode_step_speedup"] / ideal)
            results.extend(res.values())
    return results


def attention_share(attn_ms: float | None, model_ms: float | None) -> float | None:
    """``a``: the share of dense whole-model prefill time spent in attention (dense attention alone over the same
    layers ÷ the whole-model prefill, both measured in the same run), clipped to [0, 1]; None when not measured."""
    if not attn_ms or not model_ms:
        return None
    return min(1.0, attn_ms / model_ms)


def ideal_model_speedup(share: float, density: float) -> float:
    """Amdahl's bound for a whole-model prefill when only attention gets cheaper, in proportion to its density:
    ``1 / ((1 - a) + a * density)`` with ``a`` the attention share of dense time."""
    return 1.0 / ((1.0 - share) + share * density)


@dataclass
class ThroughputResult:
    """Decode throughput at a KV memory budget (MoA's metric): ``batch`` = the most sequences of context ``n`` whose
    KV cache fits ``kv_budget_bytes`` (capped at ``max_batch``), ``tok_s`` = decoded tokens per second at that batch."""

    method: str
    n: int
    kv_density: float
    kv_bytes_per_seq: int
    kv_budget_bytes: int
    batch: int
    max_batch: int
    step_ms: float | None = None
    tok_s: float | None = None
    ratios: dict = field(default_factory=dict)


def throughput(model, plan: Plan, lengths: list[int], kv_budget_bytes: int, *, max_batch: int = 64,
               decode_steps: int = 8, progress: bool = False) -> list[ThroughputResult]:
    """For dense, ``plan`` and the uniform plan of the plan's KV density: the largest batch of length-``n``
    sequences whose KV cache (measured: ``PlanCache.nbytes`` / a dense cache, after ``decode_steps`` steps of one
    sequence) fits ``kv_budget_bytes``, and the decode tokens/s that batch reaches (median step time over
    ``decode_steps`` steps; the batch's cache is one real prefill repeated ``batch`` times, which leaves the cost
    of a step unchanged). Ratios are against dense in the same run. Raises ValueError for a non-positive budget."""
    from compressor.hf.plan_cache import dense_cache_bytes
    from compressor.methods import uniform_matched
    from compressor.patching import plan_applied
    from profilers.progress import progress as progress_helper

    if kv_budget_bytes <= 0 or max_batch < 1:
        raise ValueError(f"need a positive KV budget and max batch; got {kv_budget_bytes} bytes, {max_batch}")
    out: list[ThroughputResult] = []
    vocab = model.get_input_embeddings().num_embeddings
    with progress_helper("throughput", total=3 * len(lengths), unit="cases", enabled=progress) as tick:
        for n in lengths:
            methods = {"dense": None, "plan": plan, "uniform": uniform_matched(plan, n, "kv_density")}
            ids = torch.randint(min(100, vocab // 2), vocab, (1, n), generator=torch.Generator().manual_seed(n))
            rows = {}
            for m, p in methods.items():
                tick(0, stage=f"throughput N={n}", method=m)
                with plan_applied(model, p), torch.no_grad():
                    cache, nxt = _prefill(model, ids, p is not None)
                    nxt, _ = _decode_steps(model, nxt, cache, decode_steps)
                    per_seq = cache.nbytes() if p is not None else dense_cache_bytes(model, n + 2 * decode_steps)
                    batch = min(max_batch, kv_budget_bytes // per_seq)
                    r = ThroughputResult(m, n, 1.0 if p is None else p.kv_density(n), per_seq, kv_budget_bytes,
                                         int(batch), max_batch)
                    if batch > 0:
                        cache.batch_repeat_interleave(int(batch))
                        _, step = _decode_steps(model, nxt.repeat_interleave(int(batch), dim=0), cache, decode_steps)
                        r.step_ms = statistics.median(step)
                        r.tok_s = batch * 1000 / r.step_ms
                rows[m] = r
                del cache
                tick(1)
            for r in rows.values():
                if rows["dense"].tok_s and r.tok_s:
                    r.ratios["tok_s_vs_dense"] = r.tok_s / rows["dense"].tok_s
                r.ratios["batch_vs_dense"] = r.batch / max(rows["dense"].batch, 1)
            out.extend(rows.values())
    return out


def _prefill(model, ids: torch.Tensor, planned: bool):
    """One prefill of ``ids`` (B, N) filling a PlanCache (``planned``) or the model's default dense cache;
    returns (cache, greedy next token (B, 1))."""
    from compressor.hf.plan_cache import PlanCache

    cache = PlanCache(model) if planned else None
    out = model(ids, use_cache=True, **({"cache": cache} if planned else {}))
    if not planned:  # the model's own cache: ``cache`` since transformers 5.25 (``past_key_values`` before)
        cache = out.get("cache")
        if cache is None:
            cache = out.get("past_key_values")
    return cache, out.logits[:, -1:].argmax(-1)


def _decode_steps(model, tok: torch.Tensor, cache, steps: int) -> tuple[torch.Tensor, list[float]]:
    """``steps`` greedy decode steps from ``tok`` (B, 1) on ``cache``; returns (last token, per-step ms)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        tok = model(tok, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        times.append((time.perf_counter() - t) * 1000)
    return tok, times


def results_as_dicts(results: list[MethodResult]) -> list[dict]:
    return [asdict(r) for r in results]


@dataclass
class BenchReport:
    """What `compress bench` reports: the model, which plan, the torch threads, the repeats and every result."""

    model: dict
    plan: str
    threads: int
    repeats: int
    results: list[MethodResult]
    throughput: list[ThroughputResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "plan": self.plan, "threads": self.threads, "repeats": self.repeats,
                "results": results_as_dicts(self.results), "throughput": [asdict(r) for r in self.throughput]}


def kernel_table(lengths: list[int], head_dim: int):
    """Measure the latency table `compress search --latency-table` reads (kernel times and operator costs)."""
    from profilers.progress import progress
    from search_space.costs import measure_latency_table
    from search_space.operator_selection import measure_operator_costs

    with progress("bench kernel table", total=2, unit="tables") as tick:
        table = measure_latency_table(lengths=lengths, head_dim=head_dim)
        tick()
        table.operators = measure_operator_costs(lengths=lengths, head_dim=head_dim)
        tick()
    return table


__all__ = ["bench", "BenchArgs", "BenchReport", "MethodResult", "ThroughputResult", "throughput", "attention_share",
           "ideal_model_speedup", "attention_decode_only", "kernel_table", "results_as_dicts"]
