"""The files of a searched plan: ``<stem>.json`` and the span heatmap ``spans.png``."""

from __future__ import annotations

from pathlib import Path

from plans.io import save_plan
from plans.schema import Plan
from search_space.plots import span_heatmap


def write_outputs(plan: Plan, out_dir: str | Path, stem: str = "plan") -> dict:
    """``<stem>.json`` and a span heatmap ``spans.png`` at the longest target length."""
    out = Path(out_dir)
    files = {"plan": save_plan(plan, out / f"{stem}.json")}
    n = max(plan.lengths) if plan.lengths else None
    if n:
        files["spans_png"] = span_heatmap(plan, n, out / "spans.png")
    return files
