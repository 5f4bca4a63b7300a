"""GPU benchmark (prepared for one H200; not yet run): Triton sparse_prefill / sparse_decode vs torch SDPA,
FlashAttention-2 (when ``flash-attn`` is installed) and FlexAttention; decode throughput at a KV budget.

    python benchmarks/gpu_kernels.py            # writes $OUT/gpu_kernels.json (or benchmarks/results/)
    python benchmarks/gpu_kernels.py --quick    # N=8192 only
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --interpret-check --out /tmp/x   # the same code, tiny, on CPU

1. Correctness: sparse_prefill / sparse_decode against the reference at N=2048 (bf16, GQA 32/8) and the
   interpreter-tested fp32 path with tf32 off.
2. Prefill, bf16, B=1, Hq=32, Hkv=8, D in {64, 128}, N in {8k, 16k, 32k, 64k}, densities ~0.1/0.25/0.5 (spans as in
   benchmarks/kernels_cpu.make_windows, sink 64): dense causal SDPA (flash backend, K/V repeated beforehand),
   sparse_prefill with the plan, and sparse_prefill with every head full (the kernel's own dense efficiency).
3. Decode, bf16, B in {1, 8}: SDPA over the full cache vs sparse_decode over the full cache vs sparse_decode
   over the compressed cache (each head keeps min(span, N) slots).
4. Throughput (``--model``, default ``qwen2.5-coder-0.5b``; needs ``pip install -e '.[models]'``): the largest batch
   whose KV cache fits ``--kv-budget`` GiB at 32k for dense / a uniform plan / the same at its KV density
   (:func:`compressor.bench.throughput`), and its decode tokens/s.
Times are medians from triton.testing.do_bench (ms; a plain timer under ``--interpret-check``). Every row is written
as soon as it is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from common import utc_minute

HQ, HKV, SINK = 32, 8, 64


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--interpret-check", action="store_true",
                    help="run every section at tiny sizes on the CPU under TRITON_INTERPRET=1 (what CI can check)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="model of the throughput section")
    ap.add_argument("--kv-budget", type=float, default=16.0, help="GiB of KV cache for the throughput section")
    return ap.parse_args(argv)


def set_mode(check: bool) -> None:
    """The interpreter check runs 4/2 heads on the CPU; a real run needs CUDA and compiled (not interpreted) Triton.
    Runs before triton is first imported: TRITON_INTERPRET is read then."""
    global HQ, HKV
    if check:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--interpret-check needs TRITON_INTERPRET=1 set before Python starts")
        HQ, HKV = 4, 2
    elif not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA device (or --interpret-check under TRITON_INTERPRET=1)")
    else:
        os.environ.pop("TRITON_INTERPRET", None)


def flash_attn_or_none():
    try:
        from flash_attn import flash_attn_func  # FlashAttention-2, the dense peer on a GPU
    except ImportError:
        return None
    return flash_attn_func


class Run:
    """What every section shares: the mode, the device, the random source, the results (rewritten to ``path``
    after every row) and how a call is timed."""

    def __init__(self, check: bool, out_dir: Path):
        import triton

        self.check = check
        self.path = out_dir / "gpu_kernels.json"
        self.dev = torch.device("cpu" if check else "cuda")
        self.flash_attn_func = flash_attn_or_none()
        self.result = {
            "meta": {
                "command": "python " + " ".join(sys.argv),
                "device": "cpu (TRITON_INTERPRET=1 check)" if check else torch.cuda.get_device_name(self.dev),
                "flash_attn": "installed" if self.flash_attn_func is not None else "not installed (FA2 columns null)",
                "torch": torch.__version__, "triton": triton.__version__,
                "date": utc_minute(),
                "heads": {"q": HQ, "kv": HKV}, "sink": SINK, "dtype": "bfloat16",
            },
            "checks": [], "prefill": [], "decode": [], "throughput": [], "errors": [],
        }
        torch.backends.cuda.matmul.allow_tf32 = False
        self.g = torch.Generator(device=self.dev).manual_seed(0)
        self.dt = torch.float32 if check else torch.bfloat16  # of the timed sections

    def save(self) -> None:
        self.path.write_text(json.dumps(self.result, indent=1) + "\n")

    def bench(self, fn) -> float:
        """Median ms of ``fn`` (triton.testing.do_bench; the interpreter: a plain timer, one warm-up)."""
        if self.check:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1000
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def flash_backend(self):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return contextlib.nullcontext() if self.check else sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def guarded(self, section: str, label: str, fn) -> None:
        """Append ``fn()`` to ``section``; an exception becomes an ``errors`` entry (one failing shape must not
        lose the other rows). Saves either way."""
        try:
            row = fn()
            self.result[section].append(row)
            print(section, json.dumps(row), flush=True)
        except Exception as e:  # keep going: one failing shape must not lose the other rows
            self.result["errors"].append({"where": f"{section} {label}", "error": repr(e),
                                          "trace": traceback.format_exc()[-2000:]})
            print("ERROR", section, label, repr(e), flush=True)
            torch.cuda.empty_cache()
        self.save()

    def rnd(self, *shape, dtype=torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, device=self.dev, generator=self.g, dtype=torch.float32).to(dtype)


# ---- 1. correctness


def check_prefill(run: Run, dtype, d: int) -> dict:
    from attention_kernels.reference import reference_attention
    from attention_kernels.triton_prefill import sparse_prefill
    from kernels_cpu import make_windows

    n = 256 if run.check else 2048
    q, k, v = run.rnd(1, HQ, n, d, dtype=dtype), run.rnd(1, HKV, n, d, dtype=dtype), run.rnd(1, HKV, n, d, dtype=dtype)
    spans = torch.tensor(make_windows(n, HQ, 0.25), device=run.dev)
    spans[0] = n
    sink = torch.full((HQ,), SINK, device=run.dev)
    sink[1] = 0
    ref = reference_attention(q.double(), k.double(), v.double(), sink, spans)
    out = sparse_prefill(q, k, v, sink, spans)
    err = (out.double() - ref).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return {"what": "prefill", "dtype": str(dtype), "D": d, "max_abs_err": err, "ok": err < tol}


def check_decode(run: Run, dtype, d: int) -> dict:
    from attention_kernels.reference import decode_reference
    from attention_kernels.triton_decode import sparse_decode

    lmax = 256 if run.check else 4096
    q = run.rnd(4, HQ, d, dtype=dtype)
    kc, vc = run.rnd(4, HKV, lmax, d, dtype=dtype), run.rnd(4, HKV, lmax, d, dtype=dtype)
    kv_len = torch.randint(1, lmax + 1, (4, HKV), device=run.dev, generator=run.g)
    ref = decode_reference(q.double(), kc.double(), vc.double(), kv_len)
    out = sparse_decode(q, kc, vc, kv_len)
    err = (out.double() - ref).abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return {"what": "decode", "dtype": str(dtype), "D": d, "max_abs_err": err, "ok": err < tol}


def correctness(run: Run) -> None:
    for dtype in ((torch.float32,) if run.check else (torch.bfloat16, torch.float16, torch.float32)):
        for d in ((64,) if run.check else (64, 128)):
            run.guarded("checks", f"prefill {dtype} {d}", lambda: check_prefill(run, dtype, d))
            run.guarded("checks", f"decode {dtype} {d}", lambda: check_decode(run, dtype, d))


# ---- 2. prefill


def flex_mask(run: Run, spans: torch.Tensor, n: int):
    """FlexAttention block mask of the per-head sink+window pattern (:func:`plans.span.sink_window_mask_mod`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from plans.span import sink_window_mask_mod, split_span_tensor

    mask_mod = sink_window_mask_mod(*split_span_tensor(torch.full_like(spans, SINK), spans), n=n)
    return create_block_mask(mask_mod, 1, HQ, n, n, device=str(run.dev.type))


def prefill_row(run: Run, flex, n: int, d: int, target: float) -> dict:
    from attention_kernels.triton_prefill import sparse_prefill
    from kernels_cpu import make_windows
    from plans.span import prefill_density

    dt, bench = run.dt, run.bench
    spans_l = make_windows(n, HQ, target)
    density = sum(prefill_density(s, n) for s in spans_l) / HQ
    q, k, v = run.rnd(1, HQ, n, d, dtype=dt), run.rnd(1, HKV, n, d, dtype=dt), run.rnd(1, HKV, n, d, dtype=dt)
    kr, vr = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    spans = torch.tensor(spans_l, device=run.dev)
    sink = torch.full((HQ,), SINK, device=run.dev)
    full = torch.full((HQ,), n, device=run.dev)
    with run.flash_backend():
        t_dense = bench(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
    sparse_prefill(q, k, v, sink, spans)  # autotune outside the timing
    t_sparse = bench(lambda: sparse_prefill(q, k, v, sink, spans))
    t_full = bench(lambda: sparse_prefill(q, k, v, sink, full))
    bm = flex_mask(run, spans, n)
    t0 = time.perf_counter()
    o_flex = flex(q, kr, vr, block_mask=bm)
    flex_compile_s = time.perf_counter() - t0
    flex_err = float((o_flex.float() - sparse_prefill(q, k, v, sink, spans).float()).abs().max())
    t_flex = bench(lambda: flex(q, kr, vr, block_mask=bm))
    t_fa2 = None
    if run.flash_attn_func is not None:  # (B, N, H, D) layout, GQA native
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        t_fa2 = bench(lambda: run.flash_attn_func(qt, kt, vt, causal=True))
    flops = 4 * n * n / 2 * d * HQ
    return {
        "flex_ms": round(t_flex, 3), "flex_compile_s": round(flex_compile_s, 1), "flex_max_abs_diff": flex_err,
        "speedup_vs_flex": round(t_flex / t_sparse, 2),
        "fa2_ms": None if t_fa2 is None else round(t_fa2, 3),
        "speedup_vs_fa2": None if t_fa2 is None else round(t_fa2 / t_sparse, 2),
        "pct_of_ideal_vs_fa2": None if t_fa2 is None else round(100 * t_fa2 / t_sparse * density, 1),
        "N": n, "D": d, "target": target, "density": round(density, 4), "ideal": round(1 / density, 2),
        "sdpa_flash_ms": round(t_dense, 3), "sparse_ms": round(t_sparse, 3), "triton_full_ms": round(t_full, 3),
        "speedup_vs_sdpa": round(t_dense / t_sparse, 2), "pct_of_ideal": round(100 * t_dense / t_sparse * density, 1),
        "sdpa_tflops": round(flops / t_dense / 1e9, 1), "triton_full_tflops": round(flops / t_full / 1e9, 1),
    }


def prefill(run: Run, lengths: list[int], dims: tuple[int, ...]) -> None:
    from torch.nn.attention.flex_attention import flex_attention

    targets = (0.25,) if run.check else (0.1, 0.25, 0.5)
    flex = flex_attention if run.check else torch.compile(flex_attention, dynamic=False)
    for n in lengths:
        for d in dims:
            for target in targets:
                run.guarded("prefill", f"N={n} D={d} {target}", lambda: prefill_row(run, flex, n, d, target))
                torch.cuda.empty_cache()


# ---- 3. decode


def decode_row(run: Run, n: int, d: int, b: int, target: float) -> dict:
    from attention_kernels.triton_decode import sparse_decode
    from kernels_cpu import make_windows

    dt, bench, dev = run.dt, run.bench, run.dev
    spans_l = make_windows(n, HQ, target)  # per query head; a KV head keeps the largest span of its group
    grp = HQ // HKV
    kv_span = [max(spans_l[h * grp : (h + 1) * grp]) for h in range(HKV)]
    q = run.rnd(b, HQ, d, dtype=dt)
    kc, vc = run.rnd(b, HKV, n, d, dtype=dt), run.rnd(b, HKV, n, d, dtype=dt)
    full_len = torch.full((b, HKV), n, device=dev, dtype=torch.int32)
    comp_len = torch.tensor(kv_span, device=dev, dtype=torch.int32).clamp(max=n).expand(b, HKV).contiguous()
    lc = int(max(kv_span))
    kcc, vcc = kc[:, :, :lc].contiguous(), vc[:, :, :lc].contiguous()
    kr, vr = kc.repeat_interleave(grp, 1), vc.repeat_interleave(grp, 1)
    q4 = q[:, :, None]
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(q4, kr, vr))
    t_full = bench(lambda: sparse_decode(q, kc, vc, full_len))
    t_comp = bench(lambda: sparse_decode(q, kcc, vcc, comp_len))
    kv_frac = sum(min(s, n) for s in kv_span) / (HKV * n)
    return {
        "N": n, "D": d, "B": b, "target": target, "kv_fraction": round(kv_frac, 4),
        "sdpa_full_ms": round(t_sdpa, 4), "triton_full_ms": round(t_full, 4), "triton_compressed_ms": round(t_comp, 4),
        "speedup_vs_sdpa": round(t_sdpa / t_comp, 2), "speedup_vs_triton_full": round(t_full / t_comp, 2),
    }


def decode(run: Run, lengths: list[int], dims: tuple[int, ...]) -> None:
    for n in lengths:
        for d in dims:
            for b in ((2,) if run.check else (1, 8)):
                run.guarded("decode", f"N={n} D={d} B={b}", lambda: decode_row(run, n, d, b, 0.25))
                torch.cuda.empty_cache()


# ---- 4. throughput at a KV budget (MoA's metric) on a real model


def throughput_rows(run: Run, model_name: str, kv_budget: float) -> dict:
    from compressor.bench import throughput
    from compressor.models import load_model
    from plans.identity import identity_from_config
    from plans.schema import span_for_density, uniform_plan

    model, _ = load_model(model_name, dtype="bfloat16", device_map={"": run.dev.type})
    n = 32768
    plan = uniform_plan(identity_from_config(model.config), span_for_density(0.25, n), sink=SINK, lengths=[n])
    with torch.no_grad():
        rows = throughput(model, plan, [n], int(kv_budget * 2**30), max_batch=256, decode_steps=16)
    return {"model": model_name, "N": n, "kv_budget_gib": kv_budget,
            "rows": [{k: getattr(r, k) for k in ("method", "kv_density", "batch", "step_ms", "tok_s", "ratios")}
                     for r in rows]}


def main(argv=None) -> None:
    args = parse_args(argv)
    check = args.interpret_check
    set_mode(check)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(check, out_dir)
    correctness(run)
    lengths = [512] if check else [8192] if args.quick else [8192, 16384, 32768, 65536]
    dims = (64,) if check else (64, 128)
    prefill(run, lengths, dims)
    decode(run, lengths, dims)
    if not check:
        run.guarded("throughput", args.model, lambda: throughput_rows(run, args.model, args.kv_budget))
    run.result["meta"]["finished"] = time.strftime("%H:%M:%S")
    run.save()
    print(f"wrote {run.path}")


if __name__ == "__main__":
    main()
