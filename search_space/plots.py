"""PNG figures for `compress search`: a layers x heads span heatmap and the Pareto front.

Uses matplotlib's object API with the Agg canvas (no global backend switch, no display needed); files are
written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from plans.atomic import atomic_path
from plans.schema import DensePattern, Plan


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def plan_span_matrix(plan: Plan, n: int) -> np.ndarray:
    """[layers, heads] span at input length n in the plan's own granularity (dense = n)."""
    out = np.zeros((len(plan.layers), plan.heads_per_layer), dtype=np.int64)
    for li, layer in enumerate(plan.layers):
        for hi, p in enumerate(layer.heads):
            out[li, hi] = n if isinstance(p, DensePattern) else min(p.span(n + plan.length_offset), n)
    return out


def span_heatmap(plan: Plan, n: int, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of each head's span at length n (colour: span / n; dense heads marked 'D')."""
    m = plan_span_matrix(plan, n)
    L, H = m.shape
    fig = _figure(min(2 + 0.35 * H, 20), min(1.5 + 0.25 * L, 20))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m / n, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=f"span / N  (N={n})")
    if L * H <= 400:
        for li in range(L):
            for hi in range(H):
                dense = isinstance(plan.layers[li].heads[hi], DensePattern)
                ax.text(hi, li, "D" if dense else str(m[li, hi]), ha="center", va="center", fontsize=6,
                        color="black" if m[li, hi] / n > 0.6 else "white")
    ax.set_xlabel("KV head" if plan.granularity == "kv_head" else "query head")
    ax.set_ylabel("layer")
    ax.set_title(title or f"spans at N={n}: density {plan.density(n):.3f}, KV density {plan.kv_density(n):.3f}")
    return _save(fig, path)


PARETO_TITLE = "search trials and Pareto front"


def pareto_plot(
    loss: Sequence[float],
    latency: Sequence[float],
    pareto: Sequence[int],
    path: str | Path,
    chosen: int | None = None,
    feasible: Sequence[bool] | None = None,
    xlabel: str = "latency",
    ylabel: str = "loss",
) -> Path:
    """Scatter of every trial (infeasible ones as x), the Pareto front as a line, the chosen plan starred (titled
    :data:`PARETO_TITLE`)."""
    loss = np.asarray(loss, dtype=float)
    latency = np.asarray(latency, dtype=float)
    feas = np.ones(len(loss), dtype=bool) if feasible is None else np.asarray(feasible, dtype=bool)
    fig = _figure(6, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(latency[feas], loss[feas], s=18, c="tab:blue", alpha=0.6, label="trials")
    if (~feas).any():
        ax.scatter(latency[~feas], loss[~feas], s=18, c="tab:gray", marker="x", label="infeasible")
    if len(pareto):
        p = sorted(pareto, key=lambda i: latency[i])
        ax.plot(latency[p], loss[p], "-o", c="tab:orange", ms=5, label="Pareto front")
    if chosen is not None:
        ax.scatter([latency[chosen]], [loss[chosen]], marker="*", s=200, c="tab:red", zorder=5, label="chosen")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(PARETO_TITLE)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
