"""Perplexity of a plan with a share of linear (MPCViT scaling-attention) heads next to an all-window plan of
the same analytic cost (search_space.operator_selection.plan_cost), on the default model and held-out Austen text.

The linear heads are the KV heads with the least Taylor influence in a profile (per-layer normalised);
the other heads keep a sink + window whose span is bisected so the two plans cost the same.

    python benchmarks/operators_ppl.py --profile runs/fidelity/profile --n 2048 --linear-share 0.25 --samples 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch

from compressor.evaluation import make_samples, text_loss
from compressor.models import load_model
from compressor.patching import apply, unapply
from plans.atomic import write_text_atomic
from plans.identity import identity_from_config
from plans.schema import LayerPlan, LinearPattern, Plan, SinkWindowPattern
from profilers.data.corpora import load_corpus, split_corpus
from profilers.profile_format import load_profile, normalize_profile
from search_space.operator_selection import plan_cost


def window_plan(ident, span, sink, linear=frozenset()):
    layers = []
    for li in range(ident.num_layers):
        heads = [LinearPattern() if (li, h) in linear else SinkWindowPattern(sink=sink, alpha=span, beta=0.0)
                 for h in range(ident.num_kv_heads)]
        layers.append(LayerPlan(heads=heads))
    return Plan(model=ident, granularity="kv_head", source="benchmark", layers=layers)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", required=True)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--base-span", type=int, default=384, help="span of the all-window plan")
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--linear-share", type=float, default=0.25)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--distill-steps", type=int, default=0, help="also report linear_mix after KD fine-tuning")
    ap.add_argument("--distill-length", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/operators_ppl")
    a = ap.parse_args()

    model, tok = load_model()
    ident = identity_from_config(model.config)
    prof = normalize_profile(load_profile(a.profile))
    n_prof = max(prof.meta.lengths)
    score = prof.dist(n_prof, "kv").sum(-1)  # [L, Hkv]
    k = round(a.linear_share * score.numel())
    order = torch.argsort(score.flatten())[:k].tolist()
    linear = {(i // ident.num_kv_heads, i % ident.num_kv_heads) for i in order}

    base = window_plan(ident, a.base_span, a.sink)
    target = plan_cost(base, a.n)
    lo, hi = a.sink + 1, a.n
    while lo < hi:  # smallest span whose mixed plan costs >= the all-window plan
        mid = (lo + hi) // 2
        if plan_cost(window_plan(ident, mid, a.sink, linear), a.n) >= target:
            hi = mid
        else:
            lo = mid + 1
    mixed = window_plan(ident, lo, a.sink, linear)

    hay = list(split_corpus(load_corpus("austen")).heldout)
    samples = make_samples("ppl", tok, [a.n], [None], a.samples, 0, hay)[(a.n, None)]
    rows = []
    runs = [("dense", None), ("all_window", base), ("linear_mix", mixed)]
    if a.distill_steps:
        runs.append((f"linear_mix+distill{a.distill_steps}", mixed))
    for name, plan in runs:
        if plan is None:
            unapply(model)
        elif "distill" in name:
            import tempfile

            from compressor.args import DistillArgs
            from compressor.distill import distill
            from profilers.data.calibration import CalibrationRecipe, build_calibration

            unapply(model)  # the teacher is the dense model (the implementation apply found)
            rec = CalibrationRecipe(sources=["austen"], lengths=[a.distill_length], samples_per_length=8, seed=3)
            cal = build_calibration(tok, rec, progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                losses = distill(model, plan, cal, DistillArgs(steps=a.distill_steps, lr=1e-4, resume=False), out_dir=tmp)
            print(f"distill loss {losses[0]:.4g} -> {losses[-1]:.4g}", flush=True)
        else:
            apply(model, plan)
        loss = toks = 0
        for s in samples:
            lo_, n_ = text_loss(model, s.input_ids)
            loss, toks = loss + lo_, toks + n_
        rows.append({"plan": name, "ppl": float(torch.tensor(loss / toks).exp()),
                     "relative_cost": None if plan is None else plan_cost(plan, a.n) / plan_cost(window_plan(ident, a.n, 0), a.n),
                     "window_span": None if plan is None else (lo if name.startswith("linear_mix") else a.base_span),
                     "linear_kv_heads": len(linear) if name.startswith("linear_mix") else 0, "prefill_density": None if plan is None else plan.density(a.n)})
        print(rows[-1], flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "n": a.n, "samples": a.samples, "text": "Austen held-out novels", "rows": rows}
    write_text_atomic(a.out + ".json", json.dumps(meta, indent=2) + "\n")
    md = [f"# Linear-head share vs all-window at equal cost (N={a.n})", "", f"- command: `{meta['command']}`",
          f"- date: {meta['date']}; machine: {meta['machine']}", "- cost: analytic multiply-adds "
          "(search_space.operator_selection.OPERATOR_COSTS), linear heads = lowest-influence KV heads of the profile", "",
          "| plan | perplexity | relative cost | window span | linear KV heads |", "|---|---|---|---|---|"]
    for r in rows:
        cost = "-" if r["relative_cost"] is None else format(r["relative_cost"], ".3f")
        md.append(f"| {r['plan']} | {r['ppl']:.3f} | {cost} | {r['window_span'] or '-'} | {r['linear_kv_heads']} |")
    write_text_atomic(a.out + ".md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
