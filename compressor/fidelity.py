"""Fidelity on a held-out RULER-style suite: dense vs each plan vs the uniform window at equal cost.

The instrument of the fidelity issue: items from :mod:`profilers.data.ruler` (never calibration text), scored by
teacher-forced greedy exact match (:func:`compressor.evaluation.answer_score`, equivalent to greedy decoding of
the answer, see :mod:`profilers.data.ruler`), Wilson 95% intervals per cell and paired exact McNemar tests
(:mod:`compressor.statistics`).

Equal cost. Each plan is compared with StreamingLLM's uniform sink + window plan matched on one cost axis at
the cell's length N, and every comparison row names the axis it holds fixed:

* ``prefill_density``: the uniform span whose prefill density equals the plan's (:func:`plans.schema.span_for_density`);
* ``kv_density``: the uniform span whose kept KV tokens ÷ N equal the plan's KV density (``round(kv_density · N)``).

A cell is (model, task, N); its items spread evenly over the depth grid (``depth`` is null in the rows, the item
depths are kept in ``items``). A cell where dense scores below 80% is "beyond the model" and left out of the
pooled headline comparisons (it is still reported).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from compressor.evaluation import answer_score
from compressor.methods import AXES, Method, methods_at, uniform_matched  # noqa: F401  (re-exported)
from compressor.statistics import BEYOND_MODEL_THRESHOLD, CellResult, Comparison, beyond_model
from plans.atomic import write_text_atomic
from plans.errors import CompressError
from plans.schema import Plan
from profilers.data import ruler
from profilers.progress import progress

DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")


@dataclass(frozen=True)
class FidelityGrid:
    """What to measure: tasks × lengths, ``n_per_cell`` items per cell spread over ``depths``; ``style`` is
    "plain", "chat" or "auto" (the one with the higher dense accuracy on a probe of ``style_probe`` items);
    ``haystack`` is "noise" or a held-out corpus name (``austen``, ``wikipedia``)."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    lengths: tuple[int, ...] = (2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    n_per_cell: int = 50
    seed: int = 0
    style: str = "auto"
    haystack: str = "noise"
    style_probe: int = 10


@dataclass
class FidelityReport:
    """Everything measured: per-item outcomes, cells, comparisons, and how (style, grid)."""

    model: str
    style: str
    grid: FidelityGrid
    cells: list[CellResult] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    outcomes: dict[tuple[str, int, str], list[bool]] = field(default_factory=dict)
    item_depths: dict[tuple[str, int], list[float | None]] = field(default_factory=dict)
    style_probe: dict[str, float] = field(default_factory=dict)

    def dense_ok(self, task: str, n: int) -> bool:
        o = self.outcomes[(task, n, "dense")]
        return not beyond_model(sum(o), len(o))

    def to_dict(self) -> dict:
        return {
            "model": self.model, "prompt_style": self.style, "style_probe_dense_accuracy": self.style_probe,
            "grid": asdict(self.grid), "beyond_model_threshold": BEYOND_MODEL_THRESHOLD,
            "cells": [c.to_row() for c in self.cells],
            "comparisons": [c.to_row() for c in self.comparisons],
            "items": [{"task": t, "n_tokens": n, "depths": self.item_depths[(t, n)],
                       "outcomes": {m: [int(x) for x in o] for (t2, n2, m), o in self.outcomes.items()
                                    if (t2, n2) == (t, n)}} for (t, n) in self.item_depths],
        }


def make_cell_items(task: str, tokenizer, n: int, grid: FidelityGrid, style: str, haystack) -> list:
    """``grid.n_per_cell`` items of one cell, depths cycled over the grid, seeds from :func:`profilers.data.ruler.item_seed`."""
    items = []
    for i in range(grid.n_per_cell):
        depth = grid.depths[i % len(grid.depths)]
        seed = ruler.item_seed(task, n, depth, grid.seed, i)
        items.append(ruler.make_item(task, tokenizer, n, depth, seed, style=style,
                                     **ruler.haystack_options(task, haystack)))
    return items


def choose_style(model, tokenizer, grid: FidelityGrid, haystack) -> tuple[str, dict[str, float]]:
    """The prompt style with the higher dense accuracy on ``style_probe`` niah_single items at the shortest length."""
    if grid.style != "auto":
        return grid.style, {}
    probe = FidelityGrid(tasks=("niah_single",), lengths=(min(grid.lengths),), depths=grid.depths,
                         n_per_cell=grid.style_probe, seed=grid.seed + 7919, style="plain", haystack=grid.haystack)
    acc = {}
    for style in ("plain", "chat"):
        if style == "chat" and not getattr(tokenizer, "chat_template", None):
            continue
        items = make_cell_items("niah_single", tokenizer, probe.lengths[0], probe, style, haystack)
        acc[style] = sum(answer_score(model, ruler.to_sample(it, tokenizer))[0] for it in items) / len(items)
    return max(acc, key=lambda s: (acc[s], s == "plain")), acc


def _haystack(name: str):
    return ruler.NOISE if name == "noise" else ruler.Haystack.from_corpus(name)


def run_fidelity(model, tokenizer, plans: dict[str, Plan], grid: FidelityGrid, model_name: str,
                 checkpoint: str | os.PathLike | None = None) -> FidelityReport:
    """Measure every method on identical items for every (task, length) cell; returns the report with cells and
    comparisons filled (:func:`compare`). The model's attention implementation is restored afterwards.

    ``checkpoint``: a JSON file rewritten atomically after every (length, method, task) cell; a rerun with the same
    grid, plans and model resumes from it (cells already measured are not measured again). A checkpoint of another
    grid, plan set or model is refused (CompressError) rather than mixed in."""
    from compressor.patching import plan_applied

    haystack = _haystack(grid.haystack)
    key = _checkpoint_key(grid, plans, model_name, model)
    done, style, probe = _load_checkpoint(checkpoint, key)
    if style is None:
        style, probe = choose_style(model, tokenizer, grid, haystack)
    rep = FidelityReport(model=model_name, style=style, grid=grid, style_probe=probe)
    total = len(grid.tasks) * len(grid.lengths) * grid.n_per_cell * len(methods_at(plans, grid.lengths[0]))
    with progress("fidelity", total=total, unit="items") as tick:
        for n in grid.lengths:
            cells = {t: make_cell_items(t, tokenizer, n, grid, style, haystack) for t in grid.tasks}
            for t, items in cells.items():
                rep.item_depths[(t, n)] = [it.depth for it in items]
            for m in methods_at(plans, n):
                with plan_applied(model, m.plan):
                    for t, items in cells.items():
                        if f"{t}|{n}|{m.name}" in done:
                            rep.outcomes[(t, n, m.name)] = [bool(x) for x in done[f"{t}|{n}|{m.name}"]]
                            tick(len(items))
                            continue
                        rep.outcomes[(t, n, m.name)] = [answer_score(model, ruler.to_sample(it, tokenizer))[0]
                                                        for it in items if tick(1) or True]
                        done[f"{t}|{n}|{m.name}"] = [int(x) for x in rep.outcomes[(t, n, m.name)]]
                        _save_checkpoint(checkpoint, key, style, probe, done)
                rep.cells += [_cell(rep, t, n, m) for t in grid.tasks]
    rep.comparisons = compare(rep, plans)
    return rep


def _checkpoint_key(grid: FidelityGrid, plans: dict[str, Plan], model_name: str, model) -> dict:
    plan_fp = {name: hashlib.sha256(p.model_dump_json().encode()).hexdigest()[:16] for name, p in plans.items()}
    return {"grid": json.loads(json.dumps(asdict(grid))), "plans": plan_fp, "model": model_name,
            "dtype": str(next(model.parameters()).dtype)}


def _load_checkpoint(path, key: dict) -> tuple[dict[str, list[int]], str | None, dict]:
    if path is None or not Path(path).exists():
        return {}, None, {}
    data = json.loads(Path(path).read_text())
    if data.get("key") != key:
        raise CompressError(f"checkpoint {path} was written for another grid, plan set, model or dtype; "
                            "delete it or pass another --checkpoint")
    return data["outcomes"], data["style"], data.get("style_probe", {})


def _save_checkpoint(path, key: dict, style: str, probe: dict, done: dict) -> None:
    if path is not None:
        write_text_atomic(path, json.dumps({"key": key, "style": style, "style_probe": probe, "outcomes": done}))


def _cell(rep: FidelityReport, task: str, n: int, m: Method) -> CellResult:
    o = rep.outcomes[(task, n, m.name)]
    density = 1.0 if m.plan is None else m.plan.density(n)
    kv = 1.0 if m.plan is None else m.plan.kv_density(n)
    return CellResult(rep.model, task, n, None, m.name, round(density, 6), round(kv, 6), sum(o), len(o))


def compare(rep: FidelityReport, plans: dict[str, Plan]) -> list[Comparison]:
    """Per plan: vs each equal-cost uniform baseline and vs dense, per cell and pooled over the cells where dense
    scores >= 80% (``scope="pooled"``; ``"pooled-all"`` includes the cells beyond the model)."""
    out = []
    keys = sorted({(t, n) for (t, n, _m) in rep.outcomes})
    for name in plans:
        for base, axis in [(f"uniform[{name}|{a}]", a) for a in AXES] + [("dense", "none")]:
            pairs = {k: (rep.outcomes[(*k, name)], rep.outcomes[(*k, base)]) for k in keys}
            for (t, n), pair in pairs.items():
                out.append(Comparison.from_pairs(name, base, axis, [pair], scope=f"{t}@{n}"))
            ok = [pairs[k] for k in keys if rep.dense_ok(*k)]
            if ok:
                out.append(Comparison.from_pairs(name, base, axis, ok, scope="pooled"))
            out.append(Comparison.from_pairs(name, base, axis, list(pairs.values()), scope="pooled-all"))
    return out


__all__ = ["FidelityGrid", "FidelityReport", "Method", "run_fidelity", "compare", "uniform_matched", "methods_at",
           "choose_style", "AXES", "DEFAULT_TASKS"]
