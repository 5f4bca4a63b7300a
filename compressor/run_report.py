"""The one-screen report that ends `compress run`: speed, KV memory, accuracy and perplexity vs dense and vs the
uniform window, from the data the run's eval and bench stages already wrote.

For each budget's plan (and its uniform StreamingLLM baseline at the same prefill density, the one
:func:`compressor.methods.methods_at` builds):

* speed: whole-model prefill and decode-step time at the bench length, as a speedup over dense measured in the
  same bench call (:func:`compressor.bench.bench`), and the KV cache bytes as a fraction of dense;
* accuracy per accuracy task, pooled over every eval length and depth: correct / n with the Wilson 95% interval,
  and the paired exact McNemar p-value against dense and against the uniform window (pooled over the cells; the
  eval scores every method on the same samples, in the same order);
* perplexity pooled over the eval lengths (token-weighted) and its ratio to dense.

:func:`build_report` returns the JSON ``report`` section; :func:`print_report` shows it as a rich table on stderr;
:func:`report_markdown` renders it for ``report.md``; :func:`report_png` draws accuracy by length x depth with
dense, the plans and the uniform windows side by side.
"""

from __future__ import annotations

import math
from pathlib import Path

from compressor.evaluation import Cell, EvalReport, accuracy_png
from compressor.methods import uniform_label
from compressor.statistics import McNemarResult, mcnemar_pooled, wilson_interval


def _accuracy(cells: list[Cell]) -> dict:
    correct, n = sum(c.correct for c in cells), sum(c.total for c in cells)
    lo, hi = wilson_interval(correct, n)
    return {"correct": correct, "n": n, "accuracy": correct / n if n else None, "ci95": [lo, hi]}


def _paired(cells: dict, a: str, b: str) -> dict:
    """Pooled exact McNemar of method ``a`` vs ``b`` over the cells both have (per-item outcomes); None values
    when the eval file predates per-item outcomes."""
    keys = [k[1:] for k in cells if k[0] == a and (b, *k[1:]) in cells]
    pairs = [(cells[(a, *k)].outcomes, cells[(b, *k)].outcomes) for k in keys]
    if not pairs or any(not x or not y or len(x) != len(y) for x, y in pairs):
        return {"diff": None, "p_value": None, "n": 0, "a_only": None, "b_only": None}
    r: McNemarResult = mcnemar_pooled(pairs)
    return {"diff": r.diff, "p_value": r.p_value, "n": r.n, "a_only": r.a_only, "b_only": r.b_only}


def _task_accuracy(ev: EvalReport, plan: str, uniform: str) -> dict:
    cells = {(c.method, c.n, c.depth): c for c in ev.cells}
    out = {}
    for role, m in (("dense", "dense"), ("plan", plan), ("uniform", uniform)):
        mine = [c for (mm, *_k), c in cells.items() if mm == m]
        out[role] = _accuracy(mine)
        out[role]["by_length"] = {int(n): _accuracy([c for c in mine if c.n == n]) for n in ev.lengths}
    out["plan_vs_dense"] = _paired(cells, plan, "dense")
    out["plan_vs_uniform"] = _paired(cells, plan, uniform)
    return out


def _ppl(cells: list[Cell]) -> float | None:
    loss, toks = sum(c.loss_sum for c in cells), sum(c.tokens for c in cells)
    return math.exp(loss / toks) if toks else None


def _perplexity(ev: EvalReport, plan: str, uniform: str) -> dict:
    out: dict = {"by_length": {}}
    for role, m in (("dense", "dense"), ("plan", plan), ("uniform", uniform)):
        mine = [c for c in ev.cells if c.method == m]
        out[role] = _ppl(mine)
        for n in ev.lengths:
            out["by_length"].setdefault(int(n), {})[role] = _ppl([c for c in mine if c.n == n])
    for role in ("plan", "uniform"):
        d, x = out["dense"], out[role]
        out[f"{role}_ratio"] = x / d if d and x is not None else None
    return out


def _speed(rows: list[dict] | None) -> dict | None:
    """dense / plan / uniform timings of one bench call and their ratios to that call's dense."""
    if not rows:
        return None
    by = {r["method"]: r for r in rows}
    d = by["dense"]
    out = {"n": d["n"], "dense": {k: d.get(k) for k in ("model_prefill_ms", "decode_step_ms", "kv_bytes")}}
    for role in ("plan", "uniform"):
        r = by[role]
        out[role] = {k: r.get(k) for k in ("model_prefill_ms", "decode_step_ms", "kv_bytes")} | {
            "prefill_speedup": _ratio(d.get("model_prefill_ms"), r.get("model_prefill_ms")),
            "decode_speedup": _ratio(d.get("decode_step_ms"), r.get("decode_step_ms")),
            "kv_fraction": _ratio(r.get("kv_bytes"), d.get("kv_bytes"))}
    return out


def _ratio(a, b) -> float | None:
    return a / b if a and b else None


def build_report(plans: dict, evals: dict[str, EvalReport], bench: dict | None) -> dict:
    """The ``report`` section of report.json. ``plans``: {budget tag: Plan}; ``evals``: {task: EvalReport};
    ``bench``: bench.json's content ({"n", "results": {tag: [MethodResult dicts]}}) or None."""
    n_bench = bench["n"] if bench else None
    budgets = {}
    for tag, plan in plans.items():
        uni = uniform_label(tag, len(plans))
        entry = {"plan_method": tag, "uniform_method": uni, "at_n": n_bench,
                 "accuracy": {t: _task_accuracy(ev, tag, uni) for t, ev in evals.items() if ev.task != "ppl"},
                 "perplexity": next((_perplexity(ev, tag, uni) for ev in evals.values() if ev.task == "ppl"), None),
                 "speed": _speed((bench or {}).get("results", {}).get(tag))}
        n = n_bench or (max(next(iter(evals.values())).lengths) if evals else None)
        if n:
            entry |= {"at_n": n, "density": plan.density(n), "kv_density": plan.kv_density(n)}
        budgets[tag] = entry
    return {"bench_n": n_bench, "budgets": budgets,
            "notes": f"x = relative to dense. prefill x / decode x: dense time / method time at N={n_bench} in the "
                     "same bench call (>1 is faster); KV x: cache bytes / dense; ppl x: perplexity / dense; accuracy "
                     "pooled over eval lengths and depths, Wilson 95% "
                     "interval; p: exact two-sided McNemar of the plan vs dense / vs its uniform window on the same "
                     "items; uniform = sink + window at the plan's prefill density"}


# ----------------------------------------------------------------------------------------------------------
# rendering


def _f(v, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _acc_text(a: dict | None) -> str:
    if not a or a.get("n", 0) == 0:
        return "-"
    return f"{a['correct']}/{a['n']} {a['accuracy']:.2f} ({a['ci95'][0]:.2f}–{a['ci95'][1]:.2f})"


def dense_absolute(rep: dict) -> str:
    """Dense's own numbers (what the x-dense columns divide by), from the first budget's bench call."""
    first = next(iter(rep["budgets"].values()), {})
    sp = (first.get("speed") or {}).get("dense") or {}
    if not sp:
        return "no bench (speed / KV columns from the plan's KV density only)"
    kv, pre, dec = sp.get("kv_bytes"), sp.get("model_prefill_ms"), sp.get("decode_step_ms")
    return (f"dense at N={(first.get('speed') or {}).get('n')}: prefill {_f(pre, '.0f')} ms, decode {_f(dec, '.1f')} "
            f"ms/token, KV cache {_f(kv and kv / 2**20, '.1f')} MiB")


def _row_dense(rep: dict, tasks: list[str]) -> list[str]:
    first = next(iter(rep["budgets"].values()), {})
    has_speed = bool((first.get("speed") or {}).get("dense"))
    ppl = (first.get("perplexity") or {}).get("dense")
    row = ["dense", "1.000", "1.00", "1.00" if has_speed else "-", "1.00" if has_speed else "-"]
    for t in tasks:
        row += [_acc_text(first["accuracy"][t]["dense"]), "-", "-"]
    return row + [_f(ppl, ".2f"), "1.000" if ppl is not None else "-"]


def _rows_budget(entry: dict, tasks: list[str]) -> list[list[str]]:
    """The plan's row and its uniform window's (same prefill density by construction)."""
    rows = []
    for role in ("plan", "uniform"):
        sp = (entry.get("speed") or {}).get(role) or {}
        kv = sp.get("kv_fraction")
        if kv is None and role == "plan":
            kv = entry.get("kv_density")
        row = [entry[f"{role}_method"], _f(entry.get("density"), ".3f"), _f(kv, ".2f"),
               _f(sp.get("prefill_speedup"), ".2f"), _f(sp.get("decode_speedup"), ".2f")]
        for t in tasks:
            a = entry["accuracy"][t]
            p_dense = a["plan_vs_dense"]["p_value"] if role == "plan" else None
            p_uni = a["plan_vs_uniform"]["p_value"] if role == "plan" else None
            row += [_acc_text(a[role]), _f(p_dense, ".3g"), _f(p_uni, ".3g")]
        ppl = entry.get("perplexity") or {}
        rows.append(row + [_f(ppl.get(role), ".2f"), _f(ppl.get(f"{role}_ratio"), ".3f")])
    return rows


def report_table(rep: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the one-screen table: dense, then per budget the plan and its uniform window."""
    tasks = list(next(iter(rep["budgets"].values()), {}).get("accuracy", {}))
    n = rep.get("bench_n") or next((e.get("at_n") for e in rep["budgets"].values()), None)
    header = ["method", f"density\n@{n}", "KV\nx", "prefill\nx", "decode\nx"]
    for t in tasks:
        header += [f"{t} acc\n(95% CI)", "p vs\ndense", "p vs\nunif."]
    rows = [_row_dense(rep, tasks)]
    for entry in rep["budgets"].values():
        rows += _rows_budget(entry, tasks)
    return header + ["ppl", "ppl\nx"], rows


def print_report(rep: dict, console) -> None:
    """The table on ``console`` (stderr in `compress run`)."""
    from rich.table import Table

    from rich import box

    header, rows = report_table(rep)
    t = Table(title="compress run: plan vs dense vs the uniform window", box=box.SIMPLE_HEAD, padding=(0, 1),
              caption=f"{dense_absolute(rep)}. {rep['notes']}", caption_justify="left")
    for i, h in enumerate(header):  # only the accuracy cells may wrap when the terminal is narrow
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap="CI" not in h)
    for r in rows:
        t.add_row(*r)
    if console.is_terminal:
        console.print(t)
    else:  # a log file or a pipe has no width: print the whole table rather than rich's 80-column default
        from profilers.terminal import LiteralConsole

        LiteralConsole(file=console.file, width=160, soft_wrap=False).print(t)


def markdown_section(rep: dict) -> list[str]:
    """report.md's summary table and per-length accuracy / perplexity details."""
    header, rows = report_table(rep)
    lines = ["## Summary", "", "| " + " | ".join(h.replace("\n", " ") for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"{dense_absolute(rep)}. {rep['notes']}", ""]
    for tag, e in rep["budgets"].items():
        for task, a in e["accuracy"].items():
            lines += [f"### {task}, budget {tag}: accuracy by length", "",
                      "| N | dense | plan | uniform |", "|---|---|---|---|"]
            for n in a["dense"]["by_length"]:
                lines.append(f"| {n} | " + " | ".join(_acc_text(a[r]["by_length"].get(n)) for r in
                                                      ("dense", "plan", "uniform")) + " |")
            for k in ("plan_vs_dense", "plan_vs_uniform"):
                c = a[k]
                lines.append(f"\n{k.replace('_', ' ')}: diff {_f(c['diff'], '+.3f')}, McNemar p {_f(c['p_value'], '.3g')}"
                             f" ({c['a_only']} vs {c['b_only']} discordant of {c['n']})")
            lines.append("")
    return lines


def report_png(evals: dict[str, EvalReport], plans: dict, path: str | Path) -> bool:
    """Accuracy by length x depth, dense / each plan / its uniform window side by side (one row per accuracy
    task); False when there is no accuracy task."""
    methods = ["dense"]
    for tag in plans:
        methods += [tag, uniform_label(tag, len(plans))]
    return accuracy_png(list(evals.values()), path, methods=methods)


__all__ = ["build_report", "print_report", "report_table", "markdown_section", "report_png"]
