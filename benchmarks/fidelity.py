"""Fidelity benchmark: dense vs searched plans vs the uniform window at equal cost, on a held-out RULER-style suite.

    python benchmarks/fidelity.py --plans runs/default/plans/0.5.json runs/default/plans/0.25.json \
        --lengths 2048,4096 --n 50

For every (task, length) cell: ``--n`` items (depths spread over the grid), teacher-forced greedy exact match,
Wilson 95% intervals; each plan vs the StreamingLLM uniform plan matched on prefill density and on KV density,
and vs dense, with paired exact McNemar p-values per cell and pooled over the cells where dense scores >= 80%.
Writes ``benchmarks/results/fidelity.json`` (schema in the README) and ``fidelity.md`` with the command, machine
and date.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import machine, write_results
from compressor.fidelity import DEFAULT_TASKS, FidelityGrid, FidelityReport, run_fidelity
from plans.io import load_plan

RESULTS = Path(__file__).resolve().parent / "results"


def markdown(rep: FidelityReport, command: str, seconds: float, dtype: str = "float32") -> str:
    d = rep.to_dict()
    lines = [f"# Fidelity on {rep.model}: plans vs dense vs the uniform window at equal cost", "",
             f"- command: `{command}`", f"- machine: {machine()}",
             f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {seconds / 60:.1f} min",
             f"- dtype: {dtype}; seconds are wall time of the whole run (a resumed run counts only its own part)",
             f"- prompt style: {rep.style} (dense accuracy on the style probe: {rep.style_probe or 'fixed'})",
             f"- grid: {d['grid']}", "- scoring: teacher-forced greedy exact match (== greedy decoding of the answer);"
             " 95% Wilson intervals; paired exact McNemar tests; `beyond` = dense < 80% (left out of `pooled`)", "",
             "## Cells", "", "| task | N | method | prefill density | KV density | correct / n | 95% CI | note |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rep.cells:
        note = "" if rep.dense_ok(c.task, c.n_tokens) else "beyond the model"
        lines.append(f"| {c.task} | {c.n_tokens} | {c.method} | {c.density:.3f} | {c.kv_density:.3f} | "
                     f"{c.correct}/{c.n} | {c.ci95[0]:.2f}–{c.ci95[1]:.2f} | {note} |")
    lines += ["", "## Comparisons (plan − baseline, pooled)", "",
              "| plan | baseline | cost axis held fixed | scope | cells | items | accuracy diff | p (McNemar) |",
              "|---|---|---|---|---|---|---|---|"]
    for c in rep.comparisons:
        if c.scope.startswith("pooled"):
            lines.append(f"| {c.plan} | {c.baseline} | {c.axis} | {c.scope} | {c.cells} | {c.n} | {c.diff:+.3f} | "
                         f"{c.p_value:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--plans", nargs="+", required=True, help="plan files; the name is the file stem")
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    ap.add_argument("--n", type=int, default=50, help="items per (task, length) cell")
    ap.add_argument("--style", default="auto", choices=["auto", "plain", "chat"])
    ap.add_argument("--haystack", default="noise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--stem", default="fidelity")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and activations (bfloat16 is how models are served, and 2x faster on AVX512-BF16 CPUs)")
    ap.add_argument("--checkpoint", default=None,
                    help="resume file, rewritten after every cell (default: <out>/<stem>.checkpoint.json, removed at the end)")
    a = ap.parse_args(argv)
    from compressor.models import load_model

    model, tok = load_model(a.model, dtype=a.dtype)
    plans = {Path(p).stem: load_plan(p) for p in a.plans}
    grid = FidelityGrid(tasks=tuple(a.tasks.split(",")), lengths=tuple(int(x) for x in a.lengths.split(",")),
                        n_per_cell=a.n, seed=a.seed, style=a.style, haystack=a.haystack)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(a.checkpoint) if a.checkpoint else out / f"{a.stem}.checkpoint.json"
    t0 = time.time()
    with torch.no_grad():
        rep = run_fidelity(model, tok, plans, grid, a.model, checkpoint=checkpoint)
    seconds = time.time() - t0
    command = "python benchmarks/fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {"command": command, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(),
            "seconds": round(seconds, 1), "dtype": a.dtype, **rep.to_dict()}
    write_results(out / f"{a.stem}.json", data, markdown(rep, command, seconds, a.dtype))
    print(markdown(rep, command, seconds, a.dtype))
    checkpoint.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
