"""Dense accuracy of the short-name models on the RULER suite (issue 12 §4): what each model can retrieve at all.

    python benchmarks/dense_models.py --lengths 2048,4096,8000 --n 50 --minutes 115 --threads 1 --fresh

8000, not 8192: a teacher-forced sequence is the prompt plus its answer tokens, and SmolLM2 has 8192 positions.

Per (model, task, length) cell: up to ``--n`` items from :mod:`profilers.data.ruler` (noise haystack; item ``i`` of a
cell is item ``i`` of :func:`compressor.fidelity.make_cell_items`, so depths cycle over 0.1..0.9 and a partial
run is a prefix of the full grid), in each model's recorded prompt style (:func:`compressor.models.prompt_style`:
plain text for all three), scored by teacher-forced greedy exact match (:func:`compressor.evaluation.answer_score`,
as in :func:`compressor.fidelity.run_fidelity`), correct/n with the Wilson 95% interval.

Lengths go in order (every cell of the shortest length first); within a length, items go round-robin (item i of
every model and task, then item i + 1) until ``--n``, or until the cell is *decided*
(:func:`compressor.statistics.threshold_decided`: after at least ``--min-n`` items its Wilson interval lies wholly
below or wholly above the 80% "beyond the model" line), or until the ``--minutes`` budget. Decided cells free
the CPU for the undecided ones; the table says which cells stopped early. Weights in ``--dtype`` (bfloat16 by
default, as the fidelity benchmark). Results are rewritten after every item to
``benchmarks/results/dense_models.json`` / ``.md`` (command, machine, date, per-cell outcomes). A rerun on the
same settings resumes cell by cell: it keeps the items already measured and goes on (``--fresh``: start over).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import machine, write_results
from compressor.evaluation import answer_score
from compressor.fidelity import FidelityGrid, make_cell_items
from compressor.models import KNOWN_MODELS, known_model, load_model, prompt_style
from compressor.statistics import CellResult, threshold_decided
from plans.atomic import write_text_atomic
from profilers.data import ruler

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")


class _Model:
    """One model under measurement: its items per (task, length) and outcomes so far."""

    def __init__(self, name: str, grid: FidelityGrid, dtype: str = "bfloat16"):
        t0 = time.time()
        self.name, self.model, self.tok = name, *load_model(name, dtype=dtype)
        self.dtype = dtype
        self.load_s = time.time() - t0
        self.style = prompt_style(name) or "plain"
        self.items = {(t, n): make_cell_items(t, self.tok, n, grid, self.style, ruler.NOISE)
                      for n in grid.lengths for t in grid.tasks}
        self.outcomes = {k: [] for k in self.items}
        self.seconds = 0.0
        self.history: list[dict] = []

    def resume(self, entry: dict | None, grid: FidelityGrid) -> None:
        """Take over the outcomes of an earlier run with the same seeds, depths, style, haystack and dtype (tasks,
        lengths and n aside): items are seeded by (task, length, index), so the earlier items of a cell are this
        run's first items of it."""
        keys = ("depths", "seed", "style", "haystack")
        same = lambda g: {k: v for k, v in json.loads(json.dumps(g)).items() if k in keys}  # noqa: E731
        if not entry or same(entry["grid"]) != same(asdict(grid)) or entry.get("dtype", "float32") != self.dtype:
            return
        for c in entry["cells"]:
            if (c["task"], c["n_tokens"]) in self.outcomes:
                self.outcomes[(c["task"], c["n_tokens"])] = [bool(x) for x in c["outcomes"]][:grid.n_per_cell]
        self.seconds = entry["seconds"]
        self.history = entry.get("history") or [{"date": entry["date"], "command": entry["command"]}]

    def decided(self, key, min_n: int) -> bool:
        o = self.outcomes[key]
        return threshold_decided(sum(o), len(o), min_n=min_n)

    def score(self, key, i: int) -> None:
        if len(self.outcomes[key]) > i:
            return  # measured by an earlier run
        t0 = time.time()
        with torch.no_grad():
            self.outcomes[key].append(answer_score(self.model, ruler.to_sample(self.items[key][i], self.tok))[0])
        self.seconds += time.time() - t0

    def entry(self, grid: FidelityGrid, command: str, started: str, min_n: int) -> dict:
        spec = known_model(self.name)
        cells = []
        for (task, n), o in self.outcomes.items():
            c = CellResult(self.name, task, n, None, "dense", 1.0, 1.0, sum(o), len(o))
            cells.append({"task": task, "n_tokens": n, "correct": c.correct, "n": c.n, "accuracy": c.accuracy,
                          "ci95": list(c.ci95), "depths": [it.depth for it in self.items[(task, n)][:len(o)]],
                          "outcomes": [int(x) for x in o],
                          "stopped_early": len(o) < grid.n_per_cell and self.decided((task, n), min_n)})
        return {"model": self.name, "title": spec.title if spec else self.name, "prompt_style": self.style,
                "dtype": self.dtype,
                "command": command, "machine": machine(), "date": started, "seconds": round(self.seconds, 1),
                "load_seconds": round(self.load_s, 1), "grid": asdict(grid), "cells": cells,
                "history": self.history + [{"date": started, "command": command}]}


def measure(names: list[str], grid: FidelityGrid, minutes: float, path: Path, command: str,
            resume: bool = True, dtype: str = "bfloat16", min_n: int = 10) -> dict:
    """Length by length, round-robin over items until ``grid.n_per_cell``, a decided cell (see the module
    docstring) or ``minutes``; rewrites the results after every item. With ``resume``, a model already in ``path``
    with the same settings keeps its items and goes on from there."""
    started = datetime.now(timezone.utc).isoformat()
    data = json.loads(path.read_text()) if resume and path.exists() else {"models": {}}
    deadline = time.time() + 60 * minutes
    ms = [_Model(name, grid, dtype) for name in names]
    if resume:
        for m in ms:
            m.resume(data["models"].get(m.name), grid)

    def save():
        for m in ms:
            data["models"][m.name] = m.entry(grid, command, started, min_n)
        write_results(path, data, markdown(data))

    save()
    for n in grid.lengths:
        for i in range(grid.n_per_cell):
            for m in ms:
                for key in [k for k in m.items if k[1] == n]:
                    if time.time() > deadline:
                        return data
                    if m.decided(key, min_n) or len(m.outcomes[key]) > i:
                        continue
                    m.score(key, i)
                    save()
            print(f"N={n}: round {i + 1}/{grid.n_per_cell} done, {(deadline - time.time()) / 60:.1f} min left",
                  flush=True)
    return data


def markdown(data: dict) -> str:
    models = list(data["models"])
    lines = ["# Dense accuracy of the short-name models on the RULER suite (issue 12 §4)", "",
             "What each model retrieves *dense*: a cell where dense is below 80% is beyond the model, and no plan "
             "can be judged there (compressor.statistics.BEYOND_MODEL_THRESHOLD).", "",
             "- scoring: teacher-forced greedy exact match of the whole answer (== greedy decoding of it); "
             "correct/n with the Wilson 95% interval",
             "- items: profilers/data/ruler.py, noise haystack, depths cycled over the grid, seeds from ruler.item_seed "
             "(the same items for every model up to tokenization); item i of a cell sits at depth "
             "(0.1, 0.3, 0.5, 0.7, 0.9)[i % 5]",
             "- n per cell: up to the run's --n; a cell stops early once decided (≥ --min-n items and its Wilson "
             "interval wholly below or wholly at/above 80%: compressor.statistics.threshold_decided; marked †), and "
             "lengths go in order, so the longest length has what CPU time was left; stopping on the data makes a "
             "stopped cell's interval slightly optimistic", ""]
    for m in models:
        e = data["models"][m]
        lines += [f"- **{m}** ({e['title']}): prompt style {e['prompt_style']}, {e.get('dtype', 'float32')}; "
                  f"{e['seconds'] / 60:.1f} min "
                  f"({e['date'][:16].replace('T', ' ')} UTC); `{e['command']}`; machine: {e['machine']}"]
    lines += ["", "Cells within the model (Wilson lower bound ≥ 80%) / beyond it (upper bound < 80%) / undecided, "
              "per model (the fidelity benchmark uses the model with the most cells within):", ""]
    for m in models:
        cs = [c for c in data["models"][m]["cells"] if c["n"]]
        within = [f"{c['task']}@{c['n_tokens']}" for c in cs if c["ci95"][0] >= 0.8]
        beyond = sum(c["ci95"][1] < 0.8 for c in cs)
        lines.append(f"- {m}: {len(within)} within ({', '.join(within) or 'none'}), {beyond} beyond, "
                     f"{len(cs) - len(within) - beyond} undecided")
    keys = sorted({(c["task"], c["n_tokens"]) for e in data["models"].values() for c in e["cells"]},
                  key=lambda k: (k[1], k[0]))
    lines += ["", "| task | N | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for task, n in keys:
        row = []
        for m in models:
            c = next((c for c in data["models"][m]["cells"] if (c["task"], c["n_tokens"]) == (task, n)), None)
            mark = "†" if c and c.get("stopped_early") else ""
            row.append("-" if c is None or not c["n"] else
                       f"{c['correct']}/{c['n']}{mark} ({c['ci95'][0]:.2f}–{c['ci95'][1]:.2f})")
        lines.append(f"| {task} | {n} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def rewrite_markdown(path: Path = RESULTS / "dense_models.json") -> None:
    """Regenerate ``dense_models.md`` from the JSON (after a change to :func:`markdown`)."""
    write_text_atomic(path.with_suffix(".md"), markdown(json.loads(path.read_text())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(KNOWN_MODELS))
    ap.add_argument("--lengths", default="2048,4096,8000")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--n", type=int, default=50, help="items per (task, length) cell at most")
    ap.add_argument("--min-n", type=int, default=10, help="items before a cell may stop as decided")
    ap.add_argument("--minutes", type=float, default=110.0, help="stop starting new items after this")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--fresh", action="store_true", help="do not resume from the items already in the results")
    a = ap.parse_args(argv)
    command = "python benchmarks/dense_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    grid = FidelityGrid(tasks=tuple(a.tasks.split(",")), lengths=tuple(int(x) for x in a.lengths.split(",")),
                        n_per_cell=a.n, seed=a.seed, style="plain", haystack="noise")
    if a.threads:
        torch.set_num_threads(a.threads)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    data = measure(a.models.split(","), grid, a.minutes, Path(a.out) / "dense_models.json", command,
                   resume=not a.fresh, dtype=a.dtype, min_n=a.min_n)
    print(markdown(data), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
