"""Probe for issue 24: do content-selected blocks (SnapKV's rule) keep held-out needles where a uniform window of
the same cost loses them? Kernel-level experiment, not yet a plan head type.

Every head of the default model gets the same pattern, run through ``attention_kernels.native_cpu`` with a
per-KV-head selected-block map chosen by :mod:`attention_kernels.selection` from the observation rows: the last
``--obs`` rows of the prompt (the question and the answer prefix; never the answer tokens, which are teacher-forced
in the same forward and see the selected blocks as a decode step would). Methods at N (items of
``compressor.evaluation.make_samples``, held-out Austen text, depths 0.1 / 0.5 / 0.9 in turn):

- ``dense``;
- ``uniform``: sink 64 + window, span chosen so the prefill density is ``--density``;
- ``uniform_kv``: sink 64 + window with as many kept keys per head as ``select`` (equal KV bytes);
- ``select``: sink 64 + window ``--select-window`` + ``--k`` blocks of ``--block`` keys per KV head.

``select``'s prefill density is measured from its selections (a selected key j is seen by every row i >= j).
Accuracy: exact greedy match of every answer token (``compressor.evaluation.answer_score``), Wilson 95%
intervals, exact McNemar against ``select`` on the same items.

    python benchmarks/selection_probe.py --n 2048 --items 50          # writes benchmarks/results/selection_probe.*
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attention_kernels.banded import head_pattern
from attention_kernels.native_cpu import native_kernel, sink_window_prefill
from attention_kernels.selection import select_blocks, snapkv_votes
from common import command_line, machine, utc_minute, write_results
from compressor.evaluation import answer_score, heldout_corpus
from profilers.data import ruler
from compressor.models import load_model
from compressor.statistics import mcnemar_exact, wilson_interval
from plans.span import prefill_density, split_span_tensor

RESULTS = Path(__file__).resolve().parent / "results"
NOTES = [
    "Question-at-the-end protocol only: the observation rows contain the question, so selection can aim at the "
    "needle; the multi-turn protocol (context compressed before the question) is not measured here and is where "
    "selection cannot cheat.",
    "The selection's own cost (scores of the observation rows against every prompt key: m x N per head, about 1.6% "
    "of the causal entries at m = 32, N = 2048) is not in the prefill density column.",
    "Kernel-level experiment: every head of every layer gets the same pattern through a registered attention "
    "function; no plan head type, no PlanCache (the teacher-forced answer rows see the selected blocks as a decode "
    "step over a cache holding them would). One task, one length, the default model.",
]
SINK = 64


class Probe:
    """What the registered attention function reads: the current method's pattern and the observation rows."""

    span: int = 0
    k: int = 0
    block: int = 64
    obs_end: int = 0  # the observation window is rows [obs_end - obs, obs_end)
    obs: int = 32
    extra_entries: list[int] = []  # per call: selected keys' extra visible entries, summed over heads


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: (B=1, Hq, N, D) -> (1, N, Hq, D) under Probe's pattern (no padding, no past)."""
    hq, n, d = query.shape[1], query.shape[2], query.shape[3]
    hkv = key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    sink_t = torch.full((hq,), SINK, dtype=torch.int64)
    span_t = torch.full((hq,), Probe.span, dtype=torch.int64)
    se, w = head_pattern(sink_t, span_t, n)
    sel = None
    if Probe.k > 0:
        q_obs = query[:, :, Probe.obs_end - Probe.obs : Probe.obs_end]
        votes = snapkv_votes(q_obs, key[:, :, : Probe.obs_end], scale)  # the prompt's keys only
        se_kv, w_kv = split_span_tensor(torch.full((hkv,), SINK), torch.full((hkv,), Probe.span))
        sel_prompt = select_blocks(votes, Probe.k, Probe.block, se_kv, w_kv)
        n_blocks = -(-n // Probe.block)
        sel = torch.zeros(1, hkv, n_blocks, dtype=torch.bool)
        sel[..., : sel_prompt.shape[-1]] = sel_prompt
        keys = sel.repeat_interleave(Probe.block, -1)[..., :n][0]  # (Hkv, n)
        j = torch.arange(n)
        in_sink = j < int(se[0])
        extra = ((n - j) - torch.clamp(n - j, max=int(w[0]))).clamp(min=0)  # rows past the window that see key j
        Probe.extra_entries.append(int((keys & ~in_sink).mul(extra).sum()) * (hq // hkv))
    out = sink_window_prefill(query, key, value, se, w, scale, selected=sel, block=Probe.block)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("probe_select", probe_attention)
AttentionMaskInterface.register("probe_select", sdpa_mask)


def span_for_density(target: float, n: int) -> int:
    """The smallest span whose prefill density at n reaches ``target``."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if prefill_density(mid, n) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass(frozen=True)
class Method:
    name: str
    span: int
    k: int = 0


def run_method(model, samples, m: Method, args, layers: int, heads: int) -> dict:
    """Score ``samples`` ((Sample, context end) pairs) under method ``m``; outcomes, Wilson interval, density."""
    name, span, k, block, n = m.name, m.span, m.k, args.block, args.n
    Probe.span, Probe.k, Probe.block, Probe.obs, Probe.extra_entries = span, k, block, args.obs, []
    outcomes = []
    dens = []
    for s, context_end in samples:
        # question at the end: the observation rows end at the first answer token (they hold the question);
        # context first: they end with the context, before the question is known (multi-turn)
        Probe.obs_end = int(s.loss_mask.nonzero()[0]) if args.protocol == "question_at_end" else context_end
        Probe.extra_entries = []
        if name == "dense":
            model.set_attn_implementation("sdpa")
            ok, _, _ = answer_score(model, s)
            model.set_attn_implementation("probe_select")
        else:
            ok, _, _ = answer_score(model, s)
        outcomes.append(bool(ok))
        causal = n * (n + 1) / 2
        base = prefill_density(span, n) if name != "dense" else 1.0
        dens.append(base + sum(Probe.extra_entries) / (causal * layers * heads))
    correct = sum(outcomes)
    lo, hi = wilson_interval(correct, len(outcomes))
    return {"method": name, "span": span, "k": k, "block": block, "correct": correct, "n": len(outcomes),
            "wilson95": [lo, hi], "prefill_density": sum(dens) / len(dens),
            "kv_keys_per_head": None if name == "dense" else span + k * block, "outcomes": outcomes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--items", type=int, default=50)
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--select-window", type=int, default=128)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--obs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=240)
    ap.add_argument("--protocol", choices=["question_at_end", "context_first"], default="question_at_end",
                    help="where the observation rows end: at the answer (they hold the question) or at the context's end")
    ap.add_argument("--select-only", action="store_true", help="only the select method (the others see no question)")
    ap.add_argument("--out", default="selection_probe", help="results name under benchmarks/results/")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if native_kernel() is None:
        raise SystemExit("the probe needs the native CPU kernel (a C compiler)")
    model, tok = load_model()
    model.set_attn_implementation("probe_select")
    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    depths = [0.1, 0.5, 0.9]
    per = -(-args.items // len(depths))
    hs = ruler.Haystack("text", "\n\n".join(heldout_corpus("austen")), "heldout")  # as compressor.evaluation
    kw = ruler.haystack_options(args.task, hs)
    samples = [(ruler.to_sample(it, tok), it.context_span[1]) for d in depths
               for it in ruler.make_items(args.task, tok, args.n, d, per, args.seed, style="plain", **kw)][: args.items]
    sel_span = SINK + args.select_window
    rows = []
    with torch.no_grad():
        select = run_method(model, samples, Method("select", sel_span, args.k), args, layers, heads)
        rows.append(select)
        print(select["method"], select["correct"], "/", select["n"], f"density {select['prefill_density']:.3f}",
              flush=True)
        methods = [("dense", args.n, 0), ("uniform", span_for_density(args.density, args.n), 0),
                   ("uniform_equal_density", span_for_density(select["prefill_density"], args.n), 0),
                   ("uniform_kv", sel_span + args.k * args.block, 0)]
        for name, span, k in ([] if args.select_only else methods):
            r = run_method(model, samples, Method(name, span, k), args, layers, heads)
            r["mcnemar_p_vs_select"] = mcnemar_exact(select["outcomes"], r["outcomes"]).p_value
            rows.append(r)
            print(r["method"], r["correct"], "/", r["n"], f"span {span} density {r['prefill_density']:.3f} "
                  f"McNemar p {r['mcnemar_p_vs_select']:.3g}", flush=True)
    meta = {"command": command_line(), "machine": machine("threads"), "date": utc_minute(), "task": args.task,
            "N": args.n, "items": len(samples), "depths": depths, "haystack": "austen (held-out split)",
            "obs_rows": args.obs, "seed": args.seed, "protocol": args.protocol}
    if not args.no_write:
        write_results(RESULTS / f"{args.out}.json", {"meta": meta, "rows": rows}, to_markdown(meta, rows))


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Probe (issue 24): content-selected blocks vs a uniform window, every head the same pattern", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}", f"- date: {meta['date']}",
             f"- {meta['task']}, N = {meta['N']}, {meta['items']} held-out items (depths {meta['depths']} in turn, "
             f"{meta['haystack']}, seed {meta['seed']}); observation window: the last {meta['obs_rows']} rows "
             + ("of the prompt (question + answer prefix): protocol question_at_end"
                if meta.get("protocol", "question_at_end") == "question_at_end" else
                "of the context, before the question (multi-turn): protocol context_first"),
             "- exact greedy match of every answer token; Wilson 95% interval; exact McNemar vs `select` on the same items",
             "", "| method | pattern (every head) | prefill density | kept keys / head | correct | Wilson 95% | McNemar p vs select |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pat = "dense" if r["method"] == "dense" else f"span {r['span']} (sink 64 inside)" + (
            f" + {r['k']} × {r['block']} selected keys" if r["k"] else "")
        p = r.get("mcnemar_p_vs_select")
        lines.append(f"| {r['method']} | {pat} | {r['prefill_density']:.3f} | {r['kv_keys_per_head'] or '-'} | "
                     f"{r['correct']}/{r['n']} | {r['wilson95'][0]:.2f}–{r['wilson95'][1]:.2f} | "
                     f"{'-' if p is None else format(p, '.2g')} |")
    notes = list(NOTES)
    if meta.get("protocol") == "context_first":
        notes[0] = ("Multi-turn protocol: the observation rows are the last rows of the context, before the question "
                    "is known; the question and answer rows then see what was selected. Only `select` runs here: the "
                    "other methods select nothing, so they score as in selection_probe.md on the same items.")
    lines += ["", "Notes:", ""] + [f"- {x}" for x in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
