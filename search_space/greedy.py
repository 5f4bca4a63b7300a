"""A fast Lagrangian/greedy solver: the fallback and the baseline for the MILP.

1. Every head takes ``argmin_c loss[h, c] + lambda * cost[h, c]`` (costs summed over the budgets, each scaled to
   its budget); with a K limit, each layer first picks at most K candidates (greedy K-median with swaps on the
   same score) and its heads choose among them.
2. ``lambda`` is bisected to the smallest value whose assignment meets every budget.
3. Greedy upgrades: while some head can move to a lower-loss candidate (inside its layer's K set) without
   breaking a budget, apply the move with the best loss decrease per unit of cost.

The result is feasible for the upper budgets (or reported ``infeasible``); the lower bound
(``lower_fraction * budget``) is not enforced, only reported (``lower_ok`` in ``message``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from plans.errors import CompressError
from search_space.cost_rows import (
    CostRow, SolverInput, check_budgets, evaluate_assignment, is_feasible, objective_vector,
)
from search_space.layer_pricing import LayerPricing
from search_space.milp import MilpResult


class _HeuristicLayer(LayerPricing):
    """Layer pricing that never enumerates (greedy + 1-swap), fast enough to call inside a bisection."""

    def __init__(self, heads, C, K, group):
        super().__init__(heads, C, K, group)
        if not (self.n <= K or K >= C):
            self.subsets = None


@dataclass(frozen=True)
class GreedyOptions:
    """How :func:`solve_greedy` searches.

    ``bisection_steps``: the most bisection steps on ``lambda`` (it stops earlier once the bracket is within a
    relative 1e-6). ``max_moves``: the most greedy upgrade moves (None: 4 per head).
    """

    bisection_steps: int = 40
    max_moves: int | None = None


def solve_greedy(inp: SolverInput, options: GreedyOptions = GreedyOptions()) -> MilpResult:
    """The same problem as :func:`search_space.milp.solve_milp` (``inp.loss_bounds`` is ignored); returns a
    MilpResult with ``solver="greedy"``."""
    t0 = time.perf_counter()
    K, layer_of_head, objective_weights = inp.K, inp.layer_of_head, inp.objective_weights
    bisection_steps, max_moves = options.bisection_steps, options.max_moves
    loss = {n: np.asarray(l, dtype=np.float64) for n, l in inp.loss.items()}
    H, C = next(iter(loss.values())).shape
    rows = inp.rows()
    check_budgets(rows)
    if K is not None and K < 1:
        raise CompressError(f"K must be >= 1, got {K}")
    obj = objective_vector(loss, objective_weights)
    lay_ids = layer_of_head if layer_of_head is not None else np.zeros(H, dtype=np.int64)
    k_eff = K if (K is not None and layer_of_head is not None) else C
    group = next((r.group for r in rows if r.group is not None), None)
    layers = [_HeuristicLayer(np.flatnonzero(lay_ids == l), C, k_eff, group) for l in np.unique(lay_ids)]
    ups = [r.upper if r.upper > 0 else 1.0 for r in rows]
    combined = sum(r.cost / u for r, u in zip(rows, ups)) if rows else np.zeros((H, C))

    def assign(lam: float) -> np.ndarray:
        S = obj + lam * combined
        a = np.empty(H, dtype=np.int64)
        for lay in layers:
            _, assigns, _ = lay.price(S[lay.heads], None)
            a[lay.heads] = assigns[0]
        return a

    def feasible(a) -> bool:
        return is_feasible(a, rows, lower=False)

    lam_used = 0.0
    a = assign(0.0)
    status = "greedy"
    if not feasible(a):
        lo, hi = 0.0, 1e-3
        a_hi = assign(hi)
        while not feasible(a_hi) and hi < 1e12:
            lo, hi = hi, hi * 4
            a_hi = assign(hi)
        if not feasible(a_hi):
            a_hi = assign(1e15)  # cheapest reachable under the K limit
            if not feasible(a_hi):
                status = "infeasible"
        else:
            for _ in range(bisection_steps):
                mid = np.sqrt(lo * hi) if lo > 0 else hi / 2
                a_mid = assign(mid)
                if feasible(a_mid):
                    hi, a_hi = mid, a_mid
                else:
                    lo = mid
                if hi - lo <= 1e-6 * hi:
                    break
        a, lam_used = a_hi, hi
    moves = 0
    if status == "greedy":
        a, moves = _upgrade(a, obj, rows, lay_ids, k_eff, max_moves if max_moves is not None else 4 * H)
    losses, costs, objective = evaluate_assignment(a, loss, rows, objective_weights)
    lower_ok = is_feasible(a, rows, lower=True) if status == "greedy" else False
    missed = status == "greedy" and not lower_ok and any(r.lower for r in rows if r.group is None)
    return MilpResult(
        assignment=a, status=status, objective=objective, mip_gap=None, time_s=time.perf_counter() - t0,
        losses=losses, costs=costs, solver="greedy", lower_relaxed=missed,
        lower_relaxed_reason="the greedy heuristic does not enforce lower bounds and this plan misses them "
        "(no proof that no plan meets them)" if missed else "",
        message=json.dumps({"lambda": lam_used, "moves": moves, "lower_ok": lower_ok}),
    )


def _upgrade(a: np.ndarray, obj: np.ndarray, rows: Sequence[CostRow], lay_ids: np.ndarray, K: int, max_moves: int):
    """Apply feasible loss-decreasing single-head moves, best loss-per-cost first."""
    H, C = obj.shape
    a = a.copy()
    idx = np.arange(H)
    add = [r for r in rows if r.group is None]
    grp = [r for r in rows if r.group is not None]
    ups = np.array([r.upper for r in add])
    uniq_layers, lay_pos = np.unique(lay_ids, return_inverse=True)
    moves = 0
    while moves < max_moves:
        d_obj = obj - obj[idx, a][:, None]  # [H, C]
        ok = d_obj < -1e-12
        if not ok.any():
            break
        # layer K sets: allowed = candidates already used in the layer, or any when the layer has room
        used = np.zeros((len(uniq_layers), C), dtype=bool)
        used[lay_pos, a] = True
        room = used.sum(1) < K
        ok &= used[lay_pos] | room[lay_pos][:, None]
        d_cost_total = np.zeros((H, C))
        for r, u in zip(add, ups):
            tot = r.cost[idx, a].sum()
            d = r.cost - r.cost[idx, a][:, None]
            ok &= tot + d <= r.upper * (1 + 1e-9) + 1e-12
            d_cost_total += np.maximum(d, 0) / (u if u > 0 else 1.0)
        for r in grp:
            cur = r.cost[idx, a]
            tot = 0.0
            other_max = np.zeros(H)
            gmax = {}
            for g in np.unique(r.group):
                m = np.flatnonzero(r.group == g)
                v = cur[m]
                gmax[g] = v.max()
                tot += v.max()
                if len(m) == 1:
                    other_max[m] = -np.inf
                else:
                    order = np.argsort(v)[::-1]
                    other_max[m] = v[order[0]]
                    other_max[m[order[0]]] = v[order[1]]
            gm = np.array([gmax[g] for g in r.group])
            new_g = np.maximum(r.cost, other_max[:, None])
            d = new_g - gm[:, None]
            ok &= tot + d <= r.upper * (1 + 1e-9) + 1e-12
            d_cost_total += np.maximum(d, 0) / (r.upper if r.upper > 0 else 1.0)
        if not ok.any():
            break
        ratio = np.where(ok, d_obj / np.maximum(d_cost_total, 1e-12), np.inf)
        h, c = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
        a[h] = c
        moves += 1
    return a, moves
