"""Budget rows and the objective of the per-head assignment, shared by every solver.

A :class:`CostRow` is one budget over the heads (``lower <= sum_h cost[h, choice_h] <= upper``, or a GQA group
paying its widest member); the objective is a weighted sum of per-length losses, each normalised to its
worst-case total. The helpers here build the rows, reject budgets no assignment can meet, evaluate an
assignment and check it against the rows; the solvers (:mod:`search_space.milp`, :mod:`search_space.greedy`)
only decide. :class:`SolverInput` is the one problem every solver takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

from plans.errors import CompressError


@dataclass
class CostRow:
    """One budget constraint over the heads: ``lower <= sum_h cost[h, choice_h] <= upper``.

    With ``group`` ([H] group ids) the row's cost is ``sum_g max_{h in g} cost[h, choice_h]`` (the upper bound
    only; a lower bound on a maximum is not linear and is skipped). ``display_scale`` turns a cost total into the
    unit people read (e.g. the number of heads, so that a density total reads as a density).
    """

    key: str
    cost: np.ndarray
    upper: float
    lower: float | None = None
    group: np.ndarray | None = None
    length: int | None = None
    display_scale: float = 1.0
    unit: str = ""
    kind: str = ""  # budget kind (density | kv_density | latency_ms) when the row comes from a Budget

    def total(self, assignment: np.ndarray) -> float:
        per_head = self.cost[np.arange(len(assignment)), assignment]
        if self.group is None:
            return float(per_head.sum())
        return float(sum(per_head[self.group == g].max() for g in np.unique(self.group)))

    def min_total(self) -> float:
        m = self.cost.min(1)
        if self.group is None:
            return float(m.sum())
        return float(sum(m[self.group == g].max() for g in np.unique(self.group)))

    def max_total(self) -> float:
        m = self.cost.max(1)
        if self.group is None:
            return float(m.sum())
        return float(sum(m[self.group == g].max() for g in np.unique(self.group)))

    def show(self, total: float) -> str:
        return f"{total / self.display_scale:.4g}{self.unit}"


def make_rows(
    cost: Mapping[Hashable, np.ndarray] | Sequence[CostRow],
    budgets: Mapping[Hashable, float] | None,
    lower_fraction: float,
    groups: Mapping[Hashable, np.ndarray] | None = None,
) -> list[CostRow]:
    """Fresh rows from ``cost[key]`` + ``budgets[key]`` (or copies of given rows); a missing lower bound becomes
    ``lower_fraction * upper`` (0 for a group-max row)."""
    if isinstance(cost, Mapping):
        if budgets is None:
            raise CompressError("solve_milp: cost given as a mapping needs budgets for the same keys")
        rows = []
        for k, c in cost.items():
            if k not in budgets:
                continue
            rows.append(CostRow(
                key=str(k), cost=np.asarray(c, dtype=np.float64), upper=float(budgets[k]),
                group=None if not groups or k not in groups else np.asarray(groups[k]),
                length=k if isinstance(k, (int, np.integer)) else None,
            ))
    else:
        rows = [CostRow(**{**r.__dict__}) for r in cost]
    for r in rows:
        if r.lower is None:
            r.lower = lower_fraction * r.upper if r.group is None else 0.0
    return rows


@dataclass(frozen=True)
class SolverInput:
    """One per-head assignment problem, as every solver (:func:`search_space.milp.solve_milp`,
    :func:`search_space.greedy.solve_greedy`) takes it.

    ``loss[N]`` and ``cost[key]`` are [H, C] arrays (H heads in decision order, C candidates); ``budgets[key]``
    is the upper bound of ``cost[key]`` summed over heads (or pass ``cost`` as a list of :class:`CostRow` and
    ``budgets`` None). A row without a lower bound gets ``lower_fraction * upper`` (0 for a group-max row).
    ``groups[key]`` ([H] group ids) makes the budget ``key`` pay each group's widest member (mapping ``cost``
    only). ``layer_of_head`` [H] gives each head's layer (needed for ``K``, the most distinct candidates per
    layer; None: no limit). ``objective_weights[N]`` weighs length N's normalised loss (None: all 1).
    ``loss_bounds[N]`` caps a length's raw loss (epsilon-constraint scans; the greedy solver ignores it).
    """

    loss: Mapping[int, np.ndarray]
    cost: Mapping[Hashable, np.ndarray] | Sequence[CostRow]
    budgets: Mapping[Hashable, float] | None = None
    lower_fraction: float = 0.9
    groups: Mapping[Hashable, np.ndarray] | None = None
    layer_of_head: np.ndarray | None = None
    K: int | None = 2
    objective_weights: Mapping[int, float] | None = None
    loss_bounds: Mapping[int, float] | None = None

    def rows(self) -> list[CostRow]:
        """Fresh budget rows (:func:`make_rows`)."""
        return make_rows(self.cost, self.budgets, self.lower_fraction, self.groups)


def loss_scales(loss: Mapping[int, np.ndarray]) -> dict:
    """Per length: the worst-case loss total (every head at its worst candidate), 1 where that is 0."""
    out = {}
    for n, l in loss.items():
        s = float(np.asarray(l).max(1).sum())
        out[n] = s if s > 0 else 1.0
    return out


def objective_vector(loss: Mapping[int, np.ndarray], weights: Mapping | None) -> np.ndarray:
    """[H*C] weighted sum of per-length losses, each length normalised to its worst-case total."""
    scales = loss_scales(loss)
    obj = None
    for n, l in loss.items():
        w = 1.0 if weights is None else float(weights.get(n, 0.0))
        term = w * np.asarray(l, dtype=np.float64) / scales[n]
        obj = term if obj is None else obj + term
    return obj


def check_budgets(rows: Sequence[CostRow]) -> None:
    """CompressError for a budget below the cheapest reachable cost.

    A lower bound above the most any assignment can cost is left as it is: no assignment meets it, so the solver
    drops the lower bounds and says so (``MilpResult.lower_relaxed``). It used to be clamped to that maximum in
    silence, a weaker constraint than the one asked for, and path-dependent (the K=1 model clamped to the
    per-layer maximum, the others to the per-head one).
    """
    for r in rows:
        lo = r.min_total()
        if lo > r.upper * (1 + 1e-9) + 1e-12:
            at = f" at N={r.length}" if r.length is not None else ""
            raise CompressError(
                f"budget {r.key}{at} is infeasible: the cheapest assignment of the candidates costs "
                f"{r.show(lo)} but the budget allows {r.show(r.upper)}; raise the budget or add smaller spans"
            )


def budgets_unmet(rows: Sequence[CostRow], K: int | None, loss_bounds) -> CompressError:
    """The error for a proof that no assignment meets the budgets (with the K limit and loss bounds) together."""
    what = ", ".join(f"{r.key} <= {r.show(r.upper)}" for r in rows)
    kmsg = f" with at most K={K} distinct candidates per layer" if K is not None else ""
    bmsg = f" and loss bounds {dict(loss_bounds)}" if loss_bounds else ""
    return CompressError(f"the budgets cannot be met together{kmsg}{bmsg}: {what}")


def evaluate_assignment(
    assignment: np.ndarray, loss: Mapping[int, np.ndarray], rows: Sequence[CostRow], weights: Mapping | None = None
) -> tuple[dict, dict, float]:
    """(raw loss per length, cost per row in display units, normalised objective)."""
    idx = np.arange(len(assignment))
    losses = {n: float(np.asarray(l)[idx, assignment].sum()) for n, l in loss.items()}
    obj = float(objective_vector(loss, weights)[idx, assignment].sum())
    costs = {r.key: r.total(assignment) / r.display_scale for r in rows}
    return losses, costs, obj


def distinct_candidates(loss: Mapping[int, np.ndarray], rows: Sequence[CostRow]) -> np.ndarray:
    """Indices of the first of every set of candidates whose loss and cost columns agree for every head."""
    M = np.vstack([np.asarray(l, dtype=np.float64) for l in loss.values()] + [r.cost for r in rows])
    _, first = np.unique(M.T, axis=0, return_index=True)
    return np.sort(first).astype(np.int64)


def is_feasible(assignment, rows: Sequence[CostRow], layer_of_head=None, K=None, lower=True, tol=1e-7) -> bool:
    """Does ``assignment`` meet every row (and the lower bounds with ``lower``) and the K limit per layer?"""
    for r in rows:
        t = r.total(assignment)
        if t > r.upper * (1 + tol) + tol:
            return False
        if lower and r.group is None and r.lower and t < r.lower * (1 - tol) - tol:
            return False
    if K is not None and layer_of_head is not None:
        for l in np.unique(layer_of_head):
            if len(np.unique(assignment[layer_of_head == l])) > K:
                return False
    return True
