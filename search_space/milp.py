"""The exact per-head assignment: a 0/1 MILP solved with HiGHS (scipy.optimize.milp), MoA's formulation.

Variables ``x[h, c]`` (head h takes candidate c), ``y[l, c]`` (layer l uses candidate c) and, for a budget whose
cost is a GQA group's widest member, one continuous ``w[g]`` per group::

    min   sum_N  weight_N * (loss_N . x) / scale_N               scale_N = sum_h max_c loss_N[h, c]
    s.t.  sum_c x[h, c] = 1                                      every head takes one candidate
          lower_b <= sum_{h,c} cost_b[h, c] x[h, c] <= upper_b   every budget b (lower_b = lower_fraction * upper_b)
          w[g] >= sum_c cost_b[h, c] x[h, c]  (h in g),  sum_g w[g] <= upper_b      group-max budgets
          x[h, c] <= y[layer(h), c],  sum_c y[l, c] <= K          at most K distinct candidates per layer
          loss_N . x <= eps_N                                    (epsilon-constraint Pareto scans only)

A budget that no assignment can meet raises CompressError naming the budget, its length and the cheapest
reachable cost. The lower bounds are dropped only on a proof that no assignment meets them together with
everything else (HiGHS' infeasibility verdict on the full model, or a column-generation certificate, never a
restricted master that merely lacks the right columns); the result then says so (``MilpResult.lower_relaxed``
and ``lower_relaxed_reason``). They only exist to make the plan use its budget.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

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


@dataclass
class MilpResult:
    assignment: np.ndarray  # [H] candidate index per head
    status: str
    objective: float
    mip_gap: float | None
    time_s: float
    losses: dict = field(default_factory=dict)  # {N: raw loss sum}
    costs: dict = field(default_factory=dict)  # {row key: total / display_scale}
    solver: str = "highs-milp"
    lower_relaxed: bool = False  # the lower bounds were dropped: only once no assignment can meet them
    lower_relaxed_reason: str = ""  # why they were dropped (the proof), empty when they hold
    n_vars: int = 0
    n_constraints: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("optimal", "feasible", "time_limit", "greedy")

    def summary(self) -> dict:
        return {
            "name": self.solver, "status": self.status, "objective": self.objective,
            "mip_gap": self.mip_gap, "time_s": round(self.time_s, 4), "lower_relaxed": self.lower_relaxed,
            "lower_relaxed_reason": self.lower_relaxed_reason, "n_vars": self.n_vars,
            "n_constraints": self.n_constraints,
        }


# ------------------------------------------------------------------------------------------------ helpers
def make_rows(
    cost: Mapping[Hashable, np.ndarray] | Sequence[CostRow],
    budgets: Mapping[Hashable, float] | None,
    lower_fraction: float,
    groups: Mapping[Hashable, np.ndarray] | None = None,
) -> list[CostRow]:
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


def loss_scales(loss: Mapping[int, np.ndarray]) -> dict:
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


def evaluate_assignment(
    assignment: np.ndarray, loss: Mapping[int, np.ndarray], rows: Sequence[CostRow], weights: Mapping | None = None
) -> tuple[dict, dict, float]:
    """(raw loss per length, cost per row in display units, normalised objective)."""
    idx = np.arange(len(assignment))
    losses = {n: float(np.asarray(l)[idx, assignment].sum()) for n, l in loss.items()}
    obj = float(objective_vector(loss, weights)[idx, assignment].sum())
    costs = {r.key: r.total(assignment) / r.display_scale for r in rows}
    return losses, costs, obj


def _distinct_candidates(loss: Mapping[int, np.ndarray], rows: Sequence[CostRow]) -> np.ndarray:
    """Indices of the first of every set of candidates whose loss and cost columns agree for every head."""
    M = np.vstack([np.asarray(l, dtype=np.float64) for l in loss.values()] + [r.cost for r in rows])
    _, first = np.unique(M.T, axis=0, return_index=True)
    return np.sort(first).astype(np.int64)


def is_feasible(assignment, rows: Sequence[CostRow], layer_of_head=None, K=None, lower=True, tol=1e-7) -> bool:
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


# ------------------------------------------------------------------------------------------------ the MILP
def solve_milp(
    loss: Mapping[int, np.ndarray],
    cost: Mapping[Hashable, np.ndarray] | Sequence[CostRow],
    budgets: Mapping[Hashable, float] | None = None,
    *,
    lower_fraction: float = 0.9,
    layer_of_head: np.ndarray | None = None,
    K: int | None = 2,
    time_limit: float = 60.0,
    objective_weights: Mapping[int, float] | None = None,
    groups: Mapping[Hashable, np.ndarray] | None = None,
    loss_bounds: Mapping[int, float] | None = None,
    mip_rel_gap: float = 1e-3,
    linking: str = "aggregated",
    relax_lower: bool = True,
    presolve: bool = False,
    method: str = "auto",
) -> MilpResult:
    """Optimal candidate per head under every budget, with at most K distinct candidates per layer.

    ``loss[N]`` and ``cost[key]`` are [H, C] arrays (H heads in decision order, C candidates); ``budgets[key]``
    is the upper bound of ``cost[key]`` summed over heads (or pass ``cost`` as a list of :class:`CostRow`).
    ``layer_of_head`` [H] gives each head's layer (needed for K). ``loss_bounds[N]`` caps a length's raw loss
    (epsilon-constraint scans). ``linking``: ``aggregated`` (``sum_{h in l} x[h,c] <= n_l y[l,c]``, small) or
    ``disaggregated`` (``x[h,c] <= y[l,c]``, a tighter LP relaxation, many more rows).

    ``method``: ``direct`` (the formulation above in one HiGHS call), ``colgen`` (column generation over
    per-layer assignments with exactly priced K-subsets, then the integer master; the gap is certified by the
    Lagrangian bound) or ``auto`` (colgen when the K limit binds and the problem has more than 1,500 x
    variables: the direct model's LP is slow and weak there, see benchmarks/milp_bench.py).
    HiGHS presolve is off by default: it stalls for minutes on this model (many parallel columns).
    """
    t0 = time.perf_counter()
    loss = {n: np.asarray(l, dtype=np.float64) for n, l in loss.items()}
    if not loss:
        raise CompressError("solve_milp: no loss matrices")
    H, C = next(iter(loss.values())).shape
    rows = make_rows(cost, budgets, lower_fraction, groups)
    for r in rows:
        if r.cost.shape != (H, C):
            raise CompressError(f"solve_milp: cost {r.key} has shape {r.cost.shape}, loss has {(H, C)}")
    check_budgets(rows)
    # the K limit binds only when a layer has more heads than K and there are more than K candidates
    use_k = (
        K is not None and layer_of_head is not None and K < C
        and int(np.bincount(np.unique(layer_of_head, return_inverse=True)[1]).max()) > K
    )
    if K is not None and K < 1:
        raise CompressError(f"K must be >= 1, got {K}")
    # candidates with the same loss and cost for every head are interchangeable: solve over one of each (fewer
    # variables, and no symmetric copies of every solution for the branch and bound), then map back
    keep = _distinct_candidates(loss, rows)
    if len(keep) < C:
        sub = solve_milp(
            {n: l[:, keep] for n, l in loss.items()},
            [CostRow(**{**r.__dict__, "cost": r.cost[:, keep]}) for r in rows], None,
            lower_fraction=lower_fraction, layer_of_head=layer_of_head, K=K,
            time_limit=time_limit - (time.perf_counter() - t0), objective_weights=objective_weights,
            loss_bounds=loss_bounds, mip_rel_gap=mip_rel_gap, linking=linking, relax_lower=relax_lower,
            presolve=presolve, method=method,
        )
        sub.assignment = keep[sub.assignment]
        sub.time_s = time.perf_counter() - t0
        if sub.message.startswith("{"):
            sub.message = json.dumps({**json.loads(sub.message), "distinct_candidates": int(len(keep))})
        return sub

    # K=1 collapses every layer to one choice; a group-max row whose group spans layers is not linear in those
    # choices (its members may differ), so such rows take the general model
    if use_k and K == 1 and all(_groups_within_layers(r.group, layer_of_head) for r in rows if r.group is not None):
        return _solve_k1(loss, rows, layer_of_head, time_limit=time_limit, objective_weights=objective_weights,
                         loss_bounds=loss_bounds, mip_rel_gap=mip_rel_gap, relax_lower=relax_lower,
                         presolve=presolve, t0=t0)
    obj = objective_vector(loss, objective_weights)
    if method not in ("auto", "direct", "colgen"):
        raise CompressError(f"unknown MILP method {method!r}: use auto, direct or colgen")
    if use_k and (method == "colgen" or (method == "auto" and H * C > 1500)):
        res = _colgen_path(
            loss, rows, obj, layer_of_head, K, t0=t0, time_limit=time_limit, objective_weights=objective_weights,
            loss_bounds=loss_bounds, mip_rel_gap=mip_rel_gap, relax_lower=relax_lower, lower_fraction=lower_fraction,
        )
        if res is not None:
            return res
        # column generation found no plan and proved nothing: the direct model below decides (it finds a plan or
        # proves that the lower bounds, or the budgets themselves, cannot be met)

    def build(with_lower: bool):
        layers = np.unique(layer_of_head) if use_k else np.array([], dtype=int)
        lid = {int(l): i for i, l in enumerate(layers)}
        n_x, n_y = H * C, len(layers) * C
        group_rows = [r for r in rows if r.group is not None]
        g_ids = [np.unique(r.group) for r in group_rows]
        n_w = sum(len(g) for g in g_ids)
        n = n_x + n_y + n_w
        c = np.zeros(n)
        c[:n_x] = obj.ravel()
        blocks, lo, hi = [], [], []
        # one candidate per head
        blocks.append(sparse.csr_matrix((np.ones(n_x), (np.repeat(np.arange(H), C), np.arange(n_x))), shape=(H, n)))
        lo.append(np.ones(H)); hi.append(np.ones(H))
        # additive budgets
        for r in rows:
            if r.group is not None:
                continue
            blocks.append(sparse.csr_matrix(np.concatenate([r.cost.ravel(), np.zeros(n_y + n_w)])[None, :]))
            lo.append([r.lower if with_lower and r.lower else -np.inf]); hi.append([r.upper])
        # group-max budgets: w_g - cost_h . x_h >= 0 for h in g ; sum_g w_g <= upper
        w0 = n_x + n_y
        for r, gs in zip(group_rows, g_ids):
            gpos = {int(g): w0 + i for i, g in enumerate(gs)}
            ri = np.concatenate([np.repeat(np.arange(H), C), np.arange(H)])
            ci = np.concatenate([np.arange(n_x), [gpos[int(g)] for g in r.group]])
            vals = np.concatenate([-r.cost.ravel(), np.ones(H)])
            blocks.append(sparse.csr_matrix((vals, (ri, ci)), shape=(H, n)))
            lo.append(np.zeros(H)); hi.append(np.full(H, np.inf))
            row = np.zeros(n); row[w0:w0 + len(gs)] = 1.0
            blocks.append(sparse.csr_matrix(row[None, :])); lo.append([-np.inf]); hi.append([r.upper])
            w0 += len(gs)
        # K distinct candidates per layer
        if use_k:
            lh = np.array([lid[int(l)] for l in layer_of_head])
            if linking == "disaggregated":
                ri = np.arange(n_x)
                xi = np.arange(n_x)
                yi = n_x + lh[np.repeat(np.arange(H), C)] * C + np.tile(np.arange(C), H)
                m = sparse.csr_matrix(
                    (np.concatenate([np.ones(n_x), -np.ones(n_x)]), (np.concatenate([ri, ri]), np.concatenate([xi, yi]))),
                    shape=(n_x, n),
                )
                blocks.append(m); lo.append(np.full(n_x, -np.inf)); hi.append(np.zeros(n_x))
            else:
                n_l = np.bincount(lh, minlength=len(layers)).astype(float)
                rx = lh[np.repeat(np.arange(H), C)] * C + np.tile(np.arange(C), H)
                ry = np.arange(n_y)
                m = sparse.csr_matrix(
                    (np.concatenate([np.ones(n_x), -np.repeat(n_l, C)]), (np.concatenate([rx, ry]), np.concatenate([np.arange(n_x), n_x + ry]))),
                    shape=(n_y, n),
                )
                blocks.append(m); lo.append(np.full(n_y, -np.inf)); hi.append(np.zeros(n_y))
            m = sparse.csr_matrix(
                (np.ones(n_y), (np.repeat(np.arange(len(layers)), C), n_x + np.arange(n_y))), shape=(len(layers), n)
            )
            blocks.append(m); lo.append(np.full(len(layers), -np.inf)); hi.append(np.full(len(layers), float(K)))
        # epsilon constraints on raw losses
        for nlen, eps in (loss_bounds or {}).items():
            row = np.zeros(n); row[:n_x] = loss[nlen].ravel()
            blocks.append(sparse.csr_matrix(row[None, :])); lo.append([-np.inf]); hi.append([float(eps)])
        A = sparse.vstack(blocks, format="csr")
        integrality = np.concatenate([np.ones(n_x + n_y), np.zeros(n_w)])
        ub = np.concatenate([np.ones(n_x + n_y), np.full(n_w, np.inf)])
        return c, A, np.concatenate([np.asarray(x, float) for x in lo]), np.concatenate([np.asarray(x, float) for x in hi]), integrality, ub

    def run(with_lower: bool, limit: float):
        c, A, lo, hi, integ, ub = build(with_lower)
        res = milp(
            c, integrality=integ, bounds=Bounds(np.zeros(len(c)), ub), constraints=LinearConstraint(A, lo, hi),
            options={"time_limit": max(limit, 0.1), "mip_rel_gap": mip_rel_gap, "presolve": presolve, "disp": False},
        )
        return res, len(c), A.shape[0]

    res, n_vars, n_cons = run(True, time_limit)
    relaxed, reason = False, ""
    has_lower = any(r.lower for r in rows if r.group is None)
    if res.x is None and res.status == 2 and relax_lower and has_lower:
        # HiGHS proved the full model (lower bounds included) infeasible: only now are the lower bounds dropped
        res, n_vars, n_cons = run(False, time_limit - (time.perf_counter() - t0))
        relaxed, reason = True, _LOWER_DROPPED + "HiGHS proved the full model with the lower bounds infeasible"
    elapsed = time.perf_counter() - t0
    if res.x is None:
        if res.status == 2:
            raise _budgets_unmet(rows, K if use_k else None, loss_bounds)
        status = "time_limit" if res.status == 1 else "error"
        return MilpResult(
            assignment=np.zeros(H, dtype=np.int64), status=f"{status} (no feasible solution)", objective=float("nan"),
            mip_gap=None, time_s=elapsed, lower_relaxed=relaxed, lower_relaxed_reason=reason, n_vars=n_vars,
            n_constraints=n_cons, message=res.message,
        )
    x = np.asarray(res.x[: H * C]).reshape(H, C)
    assignment = x.argmax(1).astype(np.int64)
    losses, costs, objective = evaluate_assignment(assignment, loss, rows, objective_weights)
    status = {0: "optimal", 1: "time_limit"}.get(res.status, f"status {res.status}")
    gap = getattr(res, "mip_gap", None)
    return MilpResult(
        assignment=assignment, status=status, objective=objective, mip_gap=None if gap is None else float(gap),
        time_s=elapsed, losses=losses, costs=costs, lower_relaxed=relaxed, lower_relaxed_reason=reason,
        n_vars=n_vars, n_constraints=n_cons, message=str(res.message),
    )


_LOWER_DROPPED = "no assignment meets the lower bounds together with the other constraints: "


def _budgets_unmet(rows: Sequence[CostRow], K: int | None, loss_bounds) -> CompressError:
    what = ", ".join(f"{r.key} <= {r.show(r.upper)}" for r in rows)
    kmsg = f" with at most K={K} distinct candidates per layer" if K is not None else ""
    bmsg = f" and loss bounds {dict(loss_bounds)}" if loss_bounds else ""
    return CompressError(f"the budgets cannot be met together{kmsg}{bmsg}: {what}")


def _colgen_path(loss, rows, obj, layer_of_head, K, *, t0, time_limit, objective_weights, loss_bounds, mip_rel_gap,
                 relax_lower, lower_fraction) -> MilpResult | None:
    """The column-generation solve of :func:`solve_milp`, or None when it found no plan and proved nothing.

    The restricted master only holds the generated columns, so "no integer plan among them" proves nothing about
    the whole problem. The lower bounds are dropped only on a proof that no assignment meets them (see
    ``_solve_colgen``); without a proof the caller's direct model decides, which finds the plan or proves the
    infeasibility itself (this used to drop the lower bounds of a feasible problem instead).
    """
    H, C = obj.shape
    cg_rows = list(rows) + [
        CostRow(key=f"loss@{nlen}", cost=loss[nlen], upper=float(eps), lower=0.0)
        for nlen, eps in (loss_bounds or {}).items()
    ]
    has_lower = any(r.lower for r in rows if r.group is None)
    with_lower, reason = True, ""
    a, status, gap, lb, info = _solve_colgen(obj, cg_rows, layer_of_head, K, time_limit - (time.perf_counter() - t0),
                                             mip_rel_gap, True)
    if a is None and status == "infeasible" and has_lower and relax_lower:
        with_lower, reason = False, _LOWER_DROPPED + f"column generation proved it ({info.get('infeasible_proof')})"
        a, status, gap, lb, info = _solve_colgen(obj, cg_rows, layer_of_head, K,
                                                 time_limit - (time.perf_counter() - t0), mip_rel_gap, False)
    if a is None:
        if status == "infeasible" and (with_lower is False or not has_lower or not relax_lower):
            raise _budgets_unmet(rows, K, loss_bounds)  # proven: nothing meets the constraints left
        return None
    left = time_limit - (time.perf_counter() - t0)
    if status != "optimal" and H * C <= 20000 and left > 1.0:
        # small problem, gap not closed: the direct model's branch and bound, bound shared
        d_rows = rows if with_lower else [CostRow(**{**r.__dict__, "lower": 0.0}) for r in rows]
        try:
            d = solve_milp(
                loss, d_rows, None, lower_fraction=lower_fraction, layer_of_head=layer_of_head, K=K,
                time_limit=min(left, max(5.0, 0.5 * left)), objective_weights=objective_weights,
                loss_bounds=loss_bounds, mip_rel_gap=mip_rel_gap, linking="disaggregated", relax_lower=False,
                method="direct",
            )
        except CompressError:  # a plan is known, so only a numerical disagreement lands here: keep the plan
            d = None
        if d is not None and d.status in ("optimal", "time_limit") and np.isfinite(d.objective):
            val = float(obj[np.arange(H), a].sum())
            dbound = d.objective - d.mip_gap * abs(d.objective) if d.mip_gap is not None else -np.inf
            bound = max(lb if lb is not None and np.isfinite(lb) else -np.inf, dbound)
            if d.objective < val:
                a, val = d.assignment, d.objective
            gap = max((val - bound) / max(abs(val), 1e-12), 0.0) if np.isfinite(bound) else None
            status = "optimal" if gap is not None and gap <= mip_rel_gap else "feasible"
            info["direct_fallback"] = d.status
    losses, costs, objective = evaluate_assignment(a, loss, rows, objective_weights)
    return MilpResult(
        assignment=a, status=status, objective=objective, mip_gap=gap, time_s=time.perf_counter() - t0,
        losses=losses, costs=costs, solver="highs-colgen", lower_relaxed=not with_lower, lower_relaxed_reason=reason,
        n_vars=info["columns"], n_constraints=len(cg_rows) + len(np.unique(layer_of_head)), message=json.dumps(info),
    )


def _groups_within_layers(group: np.ndarray, layer_of_head: np.ndarray) -> bool:
    return all(len(np.unique(layer_of_head[group == g])) == 1 for g in np.unique(group))


def _solve_k1(loss, rows, layer_of_head, *, t0, **kw) -> MilpResult:
    """K=1: every head of a layer takes the layer's candidate, so the exact model has one choice per layer."""
    layers, inv = np.unique(layer_of_head, return_inverse=True)
    nL = len(layers)
    agg = np.zeros((nL, len(inv)))
    agg[inv, np.arange(len(inv))] = 1.0
    loss_l = {n: agg @ l for n, l in loss.items()}
    rows_l = []
    for r in rows:
        if r.group is None:
            rows_l.append(CostRow(key=r.key, cost=agg @ r.cost, upper=r.upper, lower=r.lower, length=r.length,
                                  display_scale=r.display_scale, unit=r.unit))
        else:  # identical choices within a group: the group pays max over members of the candidate's cost
            c = np.zeros((nL, r.cost.shape[1]))
            for g in np.unique(r.group):
                m = r.group == g
                c[inv[np.flatnonzero(m)[0]]] += r.cost[m].max(0)
            rows_l.append(CostRow(key=r.key, cost=c, upper=r.upper, lower=0.0, length=r.length,
                                  display_scale=r.display_scale, unit=r.unit))
    # the layer-level weights must reproduce the head-level objective: scales from the head-level losses
    scales = loss_scales(loss)
    scales_l = loss_scales(loss_l)
    w = kw.pop("objective_weights") or {n: 1.0 for n in loss}
    w_l = {n: float(w.get(n, 0.0)) * scales_l[n] / scales[n] for n in loss}
    r = solve_milp(loss_l, rows_l, None, layer_of_head=None, K=None, objective_weights=w_l, method="direct", **kw)
    a = r.assignment[inv] if r.ok and "no feasible" not in r.status else np.zeros(len(inv), dtype=np.int64)
    losses, costs, objective = evaluate_assignment(a, loss, rows, w)
    return MilpResult(
        assignment=a, status=r.status, objective=objective if r.ok else float("nan"), mip_gap=r.mip_gap,
        time_s=time.perf_counter() - t0, losses=losses, costs=costs, solver="highs-milp (K=1 per layer)",
        lower_relaxed=r.lower_relaxed, lower_relaxed_reason=r.lower_relaxed_reason, n_vars=r.n_vars,
        n_constraints=r.n_constraints, message=r.message,
    )


# ------------------------------------------------------------------------------------------------ column generation
_MAX_ENUM = 20000  # K-subsets per layer enumerated exactly in pricing (K=3 over 48 candidates: 17,296)
_subset_cache: dict = {}


def _subsets(C: int, k: int) -> np.ndarray | None:
    if math.comb(C, k) > _MAX_ENUM:
        return None
    key = (C, k)
    if key not in _subset_cache:
        _subset_cache[key] = np.array(list(itertools.combinations(range(C), k)), dtype=np.int64).reshape(-1, k)
    return _subset_cache[key]


class _Layer:
    """Pricing for one layer: min over K-subsets T of sum_h min_{c in T} S[h, c] (+ the group-max term)."""

    def __init__(self, heads: np.ndarray, C: int, K: int, group: np.ndarray | None):
        self.heads = heads
        self.n = len(heads)
        self.k = min(K, C)
        self.C = C
        # a layer with no more heads than K (or K >= C) is unconstrained: one "subset" of every candidate
        self.subsets = np.arange(C)[None, :] if (self.n <= K or K >= C) else _subsets(C, self.k)
        if group is None:
            self.onehot = None
        else:
            g = group[heads]
            ids, inv = np.unique(g, return_inverse=True)
            self.onehot = np.zeros((len(ids), self.n))
            self.onehot[inv, np.arange(self.n)] = 1.0
            self.ginv = inv

    def _values(self, S: np.ndarray, gterm: np.ndarray | None, subsets: np.ndarray):
        """value [n_sub], sorted subsets, V [n, n_sub, k], caps [n_groups, n_sub] (or None)."""
        if self.onehot is None or gterm is None:
            V = S[:, subsets]
            return V.min(2).sum(0), subsets, V, None
        order = np.argsort(gterm[subsets], axis=1, kind="stable")
        Ts = np.take_along_axis(subsets, order, axis=1)
        V = S[:, Ts]  # [n, n_sub, k]
        P = np.minimum.accumulate(V, axis=2)
        G = (self.onehot @ P.reshape(self.n, -1)).reshape(self.onehot.shape[0], *P.shape[1:]) + gterm[Ts][None]
        caps = G.argmin(2)
        return G.min(2).sum(0), Ts, V, caps

    def _assign(self, b: int, Ts: np.ndarray, V: np.ndarray, caps) -> np.ndarray:
        T = Ts[b]
        if caps is None:
            return T[V[:, b, :].argmin(1)]
        out = np.empty(self.n, dtype=np.int64)
        for h in range(self.n):
            j = caps[self.ginv[h], b]
            out[h] = T[V[h, b, : j + 1].argmin()]
        return out

    def price(self, S: np.ndarray, gterm: np.ndarray | None, top: int = 1):
        """(best value, [assignments of the `top` best subsets], exact?)."""
        if self.subsets is not None:
            val, Ts, V, caps = self._values(S, gterm, self.subsets)
            order = np.argsort(val)[:top] if top > 1 else [int(val.argmin())]
            return float(val[order[0]]), [self._assign(b, Ts, V, caps) for b in order], True
        # greedy + 1-swap local search (K-median heuristic) when K-subsets are too many to enumerate
        T: list[int] = []
        for _ in range(self.k):
            rest = np.array([c for c in range(self.C) if c not in T])
            cand = np.array([T + [c] for c in rest])
            val, *_ = self._values(S, gterm, cand)
            T.append(int(rest[val.argmin()]))
        best, *_ = self._values(S, gterm, np.array([T]))
        best = float(best[0])
        for _ in range(5):
            improved = False
            for i in range(self.k):
                rest = np.array([c for c in range(self.C) if c not in T])
                cand = np.array([T[:i] + [c] + T[i + 1 :] for c in rest])
                val, *_ = self._values(S, gterm, cand)
                j = int(val.argmin())
                if val[j] < best - 1e-12:
                    best, T, improved = float(val[j]), list(cand[j]), True
            if not improved:
                break
        val, Ts, V, caps = self._values(S, gterm, np.array([T]))
        return float(val[0]), [self._assign(0, Ts, V, caps)], False

    def price_exact_milp(self, S: np.ndarray, gterm: np.ndarray | None, time_limit: float) -> float | None:
        """Exact pricing value by a small K-median MILP (used to certify the bound when K-subsets are too many)."""
        n, C = S.shape
        ng = 0 if (self.onehot is None or gterm is None) else self.onehot.shape[0]
        nx, ny = n * C, C
        nv = nx + ny + ng
        c = np.zeros(nv)
        c[:nx] = S.ravel()
        c[nx + ny :] = 1.0
        rows, cols, vals, lo, hi = [], [], [], [], []
        r = 0
        for h in range(n):  # one candidate per head
            rows += [r] * C; cols += list(range(h * C, (h + 1) * C)); vals += [1.0] * C; lo.append(1); hi.append(1); r += 1
        for h in range(n):  # x[h,c] <= y[c]
            for cc in range(C):
                rows += [r, r]; cols += [h * C + cc, nx + cc]; vals += [1.0, -1.0]; lo.append(-np.inf); hi.append(0); r += 1
        rows += [r] * C; cols += list(range(nx, nx + C)); vals += [1.0] * C; lo.append(-np.inf); hi.append(self.k); r += 1
        for h in range(n if ng else 0):  # w_g >= gterm . x_h
            rows += [r] * (C + 1); cols += list(range(h * C, (h + 1) * C)) + [nx + ny + int(self.ginv[h])]
            vals += list(-gterm) + [1.0]; lo.append(0); hi.append(np.inf); r += 1
        A = sparse.csr_matrix((vals, (rows, cols)), shape=(r, nv))
        res = milp(
            c, integrality=np.concatenate([np.ones(nx + ny), np.zeros(ng)]),
            bounds=Bounds(np.zeros(nv), np.concatenate([np.ones(nx + ny), np.full(ng, np.inf)])),
            constraints=LinearConstraint(A, lo, hi),
            options={"time_limit": max(time_limit, 0.1), "mip_rel_gap": 1e-9, "disp": False},
        )
        bound = getattr(res, "mip_dual_bound", None)
        if bound is not None and np.isfinite(bound):
            return float(bound)  # a valid lower bound of the pricing value even at the time limit
        return float(res.fun) if res.status == 0 and res.x is not None else None


def _max_value(obj: np.ndarray) -> float:
    """The largest objective value any assignment can have (every head at its worst candidate)."""
    return float(obj.max(1).sum())


def _no_plan_status(complete_infeasible: bool, lb: float, obj: np.ndarray, info: dict) -> str:
    """``infeasible`` only with a proof that no assignment meets the constraints, else ``no_plan``.

    Proofs: the master holds every column (K=1) and is infeasible, or the certified lower bound exceeds the
    largest value any assignment can have (so no assignment is feasible: with big-M slacks the Lagrangian bound
    of an infeasible master grows with the penalty, and the extended master's bound is its cut when it is empty).
    """
    top = _max_value(obj)
    if complete_infeasible:
        info["infeasible_proof"] = "the master holds every column and is infeasible"
    elif np.isfinite(lb) and lb > top + 1e-6 * max(1.0, abs(top)):
        info["infeasible_proof"] = f"certified lower bound {lb:.6g} > largest objective of any plan {top:.6g}"
    else:
        return "no_plan"
    return "infeasible"


def _exact_pricing_bound(L, S, g, pi, lp_val, t0, time_limit) -> float | None:
    """The Lagrangian bound with every layer priced exactly by its K-median MILP (None when one fails)."""
    vals = []
    for li, lay in enumerate(L):
        left = time_limit - (time.perf_counter() - t0)
        v = lay.price_exact_milp(S[lay.heads], g, max(0.5, 0.3 * left / (len(L) - li)))
        if v is None:
            return None
        vals.append(v - pi[li])
    return lp_val + float(np.minimum(vals, 0).sum())


def _solve_colgen(
    obj: np.ndarray,
    rows: Sequence[CostRow],
    layer_of_head: np.ndarray,
    K: int,
    time_limit: float,
    mip_rel_gap: float,
    with_lower: bool,
    max_iters: int = 300,
):
    """Dantzig-Wolfe column generation over per-layer assignments, then the integer master with HiGHS.

    A column is one layer's assignment; its coefficients are exact (group maxima included). Pricing enumerates
    the K-subsets of candidates per layer, so the Lagrangian (Farley) bound ``LP + sum_l min(0, reduced cost_l)``
    is a valid lower bound of the full MILP and the returned gap is certified. Returns
    (assignment or None, status, gap, lower bound, info dict).
    """
    from scipy.optimize import linprog

    t0 = time.perf_counter()
    H, C = obj.shape
    layers = np.unique(layer_of_head)
    grp_rows = [r for r in rows if r.group is not None]
    group = grp_rows[0].group if grp_rows else None  # all group rows share the KV grouping
    L = [_Layer(np.flatnonzero(layer_of_head == l), C, K, group) for l in layers]
    # rows scaled to upper = 1
    R = len(rows)
    ups = np.array([r.upper if r.upper > 0 else 1.0 for r in rows])
    lows = np.array([(r.lower or 0.0) if (with_lower and r.group is None) else 0.0 for r in rows]) / ups
    has_low = lows > 0
    add_cost = [r.cost / u for r, u in zip(rows, ups) if r.group is None]
    add_idx = [i for i, r in enumerate(rows) if r.group is None]
    grp_idx = [i for i, r in enumerate(rows) if r.group is not None]
    grp_cost_min = []  # per group row: [C] member-independent lower envelope of the cost
    for i in grp_idx:
        grp_cost_min.append(rows[i].cost.min(0) / ups[i])

    cols_layer: list[int] = []
    cols_obj: list[float] = []
    cols_coef: list[np.ndarray] = []
    cols_assign: list[np.ndarray] = []
    seen: set = set()

    def add_column(li: int, a: np.ndarray) -> bool:
        key = (li, a.tobytes())
        if key in seen:
            return False
        seen.add(key)
        hs = L[li].heads
        coef = np.zeros(R)
        for j, i in enumerate(add_idx):
            coef[i] = add_cost[j][hs, a].sum()
        for i in grp_idx:
            r = rows[i]
            pc = r.cost[hs, a] / ups[i]
            g = r.group[hs]
            coef[i] = sum(pc[g == x].max() for x in np.unique(g))
        cols_layer.append(li); cols_obj.append(float(obj[hs, a].sum())); cols_coef.append(coef); cols_assign.append(a)
        return True

    def scores(mu: np.ndarray):
        """per-head additive score and member-independent group term for duals mu (+ upper, - lower)."""
        S = obj.copy()
        for j, i in enumerate(add_idx):
            if mu[i] != 0:
                S += mu[i] * add_cost[j]
        g = None
        if grp_idx:
            g = np.zeros(C)
            for j, i in enumerate(grp_idx):
                g += max(mu[i], 0.0) * grp_cost_min[j]
        return S, g

    def price_all(mu: np.ndarray, top: int = 1):
        S, g = scores(mu)
        out, exact = [], True
        for lay in L:
            v, assigns, ex = lay.price(S[lay.heads], g, top)
            out.append((v, assigns))
            exact &= ex
        return out, exact

    # initial columns: a sweep of multipliers from "loss only" to "cost only"
    lam_grid = [0.0] + list(np.geomspace(1e-3, 1e3, 7))
    for lam in lam_grid:
        mu = np.full(R, lam)
        priced, _ = price_all(mu)
        for li, (_, assigns) in enumerate(priced):
            for a in assigns:
                add_column(li, a)
    # the always-affordable column per layer: every head at its cheapest candidate in combined scaled cost
    cheap = np.zeros((H, C))
    for j in range(len(add_idx)):
        cheap += add_cost[j]
    for gm in grp_cost_min:
        cheap += gm[None, :]
    for li, lay in enumerate(L):
        v, assigns, _ = lay.price(cheap[lay.heads] * 1e6 + obj[lay.heads], None)
        add_column(li, assigns[0])

    big_m = 1e3 * max(1.0, float(np.abs(obj).max(1).sum()))
    nL = len(L)
    lb = -np.inf
    lp_val = np.inf
    iters = 0
    exact_all = True
    mu = np.zeros(R)
    while True:
        iters += 1
        n = len(cols_obj)
        coef = np.array(cols_coef).T  # [R, n]
        # variables: z (n), s_up (R), s_lo (R)
        c = np.concatenate([cols_obj, np.full(R, big_m), np.full(R, big_m)])
        A_ub = np.vstack([
            np.hstack([coef, -np.eye(R), np.zeros((R, R))]),
            np.hstack([-coef[has_low], np.zeros((has_low.sum(), R)), -np.eye(R)[has_low]]),
        ])
        b_ub = np.concatenate([np.ones(R), -lows[has_low]])
        A_eq = np.zeros((nL, n + 2 * R))
        A_eq[np.array(cols_layer), np.arange(n)] = 1.0
        res = linprog(c, A_ub=sparse.csr_matrix(A_ub), b_ub=b_ub, A_eq=sparse.csr_matrix(A_eq), b_eq=np.ones(nL),
                      bounds=(0, None), method="highs")
        if res.status != 0:
            raise CompressError(f"column generation: master LP failed ({res.message})")
        lp_val = float(res.fun)
        m_ub = res.ineqlin.marginals
        pi = res.eqlin.marginals
        mu = -m_ub[:R].copy()
        if has_low.any():
            mu[has_low] -= -m_ub[R:]
        priced, exact = price_all(mu)
        # reduced cost of the best column per layer (pricing value includes the group term lower envelope)
        rcs = np.array([v - pi[li] for li, (v, _) in enumerate(priced)])
        if exact:
            lb = max(lb, lp_val + float(np.minimum(rcs, 0).sum()))
        exact_all = exact
        added = 0
        for li, (v, assigns) in enumerate(priced):
            if rcs[li] < -1e-9:
                added += add_column(li, assigns[0])
        if added == 0 or iters >= max_iters or time.perf_counter() - t0 > 0.6 * time_limit:
            break
        if exact and lp_val - lb <= 1e-7 * max(1.0, abs(lp_val)):
            break
    certified = exact_all
    if not exact_all and np.isfinite(lp_val):  # certify the bound with exact per-layer MILP pricing
        b = _exact_pricing_bound(L, *scores(mu), pi, lp_val, t0, time_limit)
        lb, certified = (max(lb, b), True) if b is not None else (lb, False)
    cg_time = time.perf_counter() - t0

    # enrich: top subsets at the final duals, perturbed duals, and one-head moves around the LP support
    for scale in (0.8, 0.9, 0.95, 0.98, 1.02, 1.05, 1.1, 1.2):
        priced, _ = price_all(mu * scale, top=3)
        for li, (_, assigns) in enumerate(priced):
            for a in assigns:
                add_column(li, a)
    complete = K == 1 and all(lay.n > 1 for lay in L)
    if complete:  # K=1: every layer has only C possible columns; with all of them the master is the full problem
        for li, lay in enumerate(L):
            for cnd in range(C):
                add_column(li, np.full(lay.n, cnd, dtype=np.int64))
    z = res.x[: len(res.x) - 2 * R]
    support = [k for k in range(len(z)) if z[k] > 1e-6]
    for k in support:
        li, a = cols_layer[k], cols_assign[k]
        T = np.unique(a)
        for h in range(len(a)):
            for cnd in T:
                if cnd != a[h]:
                    b = a.copy(); b[h] = cnd
                    add_column(li, b)

    # the master's own gap is measured against its LP bound, which is >= the Lagrangian bound: ask for what is
    # left of the tolerance once the CG bound's distance is accounted for
    cg_slack = max(0.0, (lp_val - lb) / max(abs(lp_val), 1e-12)) if np.isfinite(lb) else 0.0
    master_gap = max(0.2 * mip_rel_gap, 0.9 * mip_rel_gap - cg_slack)

    def master_milp(limit: float):
        n = len(cols_obj)
        coef = np.array(cols_coef).T
        lo_b = np.where(has_low, lows, -np.inf)
        A = sparse.vstack([sparse.csr_matrix(coef), sparse.csr_matrix((np.ones(n), (np.array(cols_layer), np.arange(n))), shape=(nL, n))])
        lo = np.concatenate([lo_b, np.ones(nL)])
        hi = np.concatenate([np.ones(R), np.ones(nL)])
        r = milp(np.array(cols_obj), integrality=np.ones(n), bounds=Bounds(0, 1),
                 constraints=LinearConstraint(A, lo, hi),
                 options={"time_limit": max(limit, 0.5), "mip_rel_gap": master_gap, "disp": False})
        return r

    if not certified:
        lb = -np.inf
    S_final, g_final = scores(mu)

    def neighbours(li: int, a: np.ndarray) -> None:
        """Columns that swap one candidate of the layer's set for another, heads re-priced at the final duals."""
        lay = L[li]
        T = list(np.unique(a))
        for i in range(len(T)):
            for cnd in range(C):
                if cnd in T:
                    continue
                T2 = np.array(sorted(T[:i] + [cnd] + T[i + 1 :]))
                _, Ts, V, caps = lay._values(S_final[lay.heads], g_final, T2[None, :])
                add_column(li, lay._assign(0, Ts, V, caps))

    # the reduced-cost filtered extended master (exact) needs additive rows and enumerated K-subsets
    can_extend = certified and not grp_idx and all(lay.subsets is not None for lay in L) and np.isfinite(lp_val)
    ext_info: dict = {}

    def extended_master(ub: float, limit: float, cut: float | None = None):
        """The integer problem restricted to the plans that beat ``cut = ub * (1 - 0.9 * mip_rel_gap)``, exactly.

        With the final duals, any assignment costs at least ``LB + sum_l excess_l`` where a layer's excess is its
        column's reduced cost above the layer's best; a plan better than ``cut`` has every excess <= ``cut - LB``.
        For a K-subset T the excess is T's best reduced cost plus, per head, the cost of not taking its best
        candidate in T, so only subsets and head choices within that slack are kept: one binary per (layer,
        subset) and one per (head, subset, candidate) left free, plus the row ``objective <= cut``. The kept
        model holds every plan better than ``cut``, so ``min(cut, its dual bound)`` is a valid lower bound of the
        whole problem; an infeasible model proves that ``ub`` is within 0.9 x the tolerance of the optimum.
        Returns (assignment or None, its value, lower bound) or None when the model would be too large.
        """
        tl0 = time.perf_counter()
        vals_T, minrc = [], []
        for li, lay in enumerate(L):
            v, *_ = lay._values(S_final[lay.heads], None, lay.subsets)
            vals_T.append(v)
            minrc.append(float(v.min()) - pi[li])
        lb_f = lp_val + float(np.minimum(minrc, 0.0).sum())
        cut = ub - 0.9 * mip_rel_gap * abs(ub) if cut is None else cut
        delta = cut - lb_f
        if not delta > 0:
            return None, ub, cut
        tol = 1e-9 * max(1.0, abs(ub))
        add_rows = [(i, rows[i].cost / ups[i]) for i in range(R)]
        # variables: u[l, T] then free x[h, T, c]; columns of the budget rows and of the objective
        c_obj, a_cols, kind = [], [], []  # kind: ("u", li, T, fixed choice per head) | ("x", li, T, h, c)
        eq_rows = []  # (u index, [x indices]) one per (head, subset) with a choice left
        conv = [[] for _ in L]
        for li, lay in enumerate(L):
            Sl = S_final[lay.heads]
            keep = np.flatnonzero(vals_T[li] - pi[li] - min(minrc[li], 0.0) <= delta + tol)
            for b in keep:
                T = lay.subsets[b]
                slack = delta + tol - (vals_T[li][b] - pi[li] - min(minrc[li], 0.0))
                ST = Sl[:, T]
                dl = ST - ST.min(1, keepdims=True)
                allowed = dl <= slack
                fixed = np.where(allowed.sum(1) == 1, T[ST.argmin(1)], -1)
                hs_fixed = np.flatnonzero(fixed >= 0)
                gh = lay.heads[hs_fixed]
                ui = len(c_obj)
                conv[li].append(ui)
                c_obj.append(float(obj[gh, fixed[hs_fixed]].sum()))
                a_cols.append(np.array([m[gh, fixed[hs_fixed]].sum() for _, m in add_rows]))
                kind.append(("u", li, T, fixed))
                for h in np.flatnonzero(fixed < 0):
                    xs = []
                    for j in np.flatnonzero(allowed[h]):
                        g = lay.heads[h]
                        xs.append(len(c_obj))
                        c_obj.append(float(obj[g, T[j]]))
                        a_cols.append(np.array([m[g, T[j]] for _, m in add_rows]))
                        kind.append(("x", li, T, h, int(T[j])))
                    eq_rows.append((ui, xs))
                if len(c_obj) > 300000:
                    return None
        n = len(c_obj)
        Acost = np.array(a_cols).T  # [R, n]
        ri, ci, vv = [], [], []
        for k, (ui, xs) in enumerate(eq_rows):  # sum_c x[h, T, c] - u[l, T] = 0
            ri += [k] * (len(xs) + 1); ci += xs + [ui]; vv += [1.0] * len(xs) + [-1.0]
        E = sparse.csr_matrix((vv, (ri, ci)), shape=(len(eq_rows), n))
        Cv = sparse.csr_matrix(
            (np.ones(sum(map(len, conv))), (np.concatenate([[li] * len(u) for li, u in enumerate(conv)]).astype(int),
                                            np.concatenate(conv).astype(int))), shape=(nL, n))
        A = sparse.vstack([sparse.csr_matrix(Acost), E, Cv, sparse.csr_matrix(np.array(c_obj)[None, :])], format="csr")
        lo = np.concatenate([np.where(has_low, lows, -np.inf), np.zeros(len(eq_rows)), np.ones(nL), [-np.inf]])
        hi = np.concatenate([np.ones(R), np.zeros(len(eq_rows)), np.ones(nL), [cut]])
        r = milp(np.array(c_obj), integrality=np.ones(n), bounds=Bounds(0, 1), constraints=LinearConstraint(A, lo, hi),
                 options={"time_limit": max(limit, 0.5), "mip_rel_gap": 0.9 * mip_rel_gap, "disp": False})
        ext_info.update({"ext_vars": n, "ext_rows": int(A.shape[0]), "ext_status": int(r.status),
                         "ext_time_s": round(time.perf_counter() - tl0, 3)})
        dual = getattr(r, "mip_dual_bound", None)
        bound = min(cut, float(dual)) if dual is not None and np.isfinite(dual) else lb_f
        if r.status == 2:  # nothing beats cut
            bound = cut
        if r.x is None:
            return None, ub, max(bound, lb_f)
        x = np.round(r.x).astype(bool)
        a = np.full(H, -1, dtype=np.int64)
        for k in np.flatnonzero(x):
            kd = kind[k]
            if kd[0] == "u":
                lay = L[kd[1]]
                hs = np.flatnonzero(kd[3] >= 0)
                a[lay.heads[hs]] = kd[3][hs]
            else:
                a[L[kd[1]].heads[kd[3]]] = kd[4]
        if (a < 0).any():
            return None, ub, max(bound, lb_f)
        tot = np.array([m[np.arange(H), a].sum() for _, m in add_rows])
        if (tot > 1 + 1e-7).any() or (tot < np.where(has_low, lows, -np.inf) - 1e-7).any():
            return None, ub, max(bound, lb_f)
        return a, float(obj[np.arange(H), a].sum()), max(bound, lb_f)

    best = None  # (value, assignment, master result)
    rounds = 0
    ext_ub = np.inf  # incumbent value at the last extended-master attempt

    def try_extended(limit: float, cut: float | None = None):
        """One extended-master attempt from the incumbent (or over every plan below ``cut``): (new incumbent or
        None, new lower bound, done?)."""
        out = extended_master(best[0] if best else cut, limit, cut)
        ext_info["ext_calls"] = ext_info.get("ext_calls", 0) + 1
        if out is None:
            return None, lb, True
        a_x, v_x, b_x = out
        improves = a_x is not None and (not best or v_x < best[0] - 1e-12)
        better = (v_x, a_x, best[2] if best else rm) if improves else None
        return better, max(lb, b_x), ext_info.get("ext_status") in (0, 2)

    while True:
        left = time_limit - (time.perf_counter() - t0)
        rm = master_milp(min(left, max(2.0, 0.5 * left)))
        rounds += 1
        if rm.x is None:
            break
        chosen = np.flatnonzero(np.round(rm.x).astype(bool))
        assignment = np.zeros(H, dtype=np.int64)
        for k in chosen:
            assignment[L[cols_layer[k]].heads] = cols_assign[k]
        val = float(obj[np.arange(H), assignment].sum())
        if best is None or val < best[0] - 1e-12:
            best = (val, assignment, rm)
        gap = (best[0] - lb) / max(abs(best[0]), 1e-12) if np.isfinite(lb) else None
        if complete or (gap is not None and gap <= mip_rel_gap) or rounds >= 8:
            break
        left = time_limit - (time.perf_counter() - t0)
        if can_extend and best[0] < ext_ub - 1e-12 and left > 1.0:
            # a short try per new incumbent (the model shrinks as the incumbent improves), the rest at the end
            ext_ub = best[0]
            better, lb, done = try_extended(max(1.0, 0.15 * left))
            best = better or best
            if done or (best[0] - lb) / max(abs(best[0]), 1e-12) <= mip_rel_gap:
                break
        if time.perf_counter() - t0 > 0.7 * time_limit:
            break
        n_before = len(cols_obj)
        for k in chosen:
            neighbours(cols_layer[k], cols_assign[k])
        tighter = max(master_gap / 4, 1e-5)
        if len(cols_obj) == n_before and (rm.status != 0 or tighter == master_gap):
            break
        master_gap = tighter  # the master stopped at its own tolerance: ask it for more next round
    left = time_limit - (time.perf_counter() - t0)
    if best is None and not complete and can_extend and left > 0.5:
        # the restricted master holds no integer plan, which proves nothing (its columns are a heuristic subset:
        # with lower bounds the few plans that meet them are often missing). The extended master with a cut
        # above every plan's value keeps every plan: it finds one, or its infeasibility proves there is none.
        ext_info["ext_every_plan"] = True
        best, lb, _ = try_extended(max(0.9 * left, 1.0), cut=_max_value(obj) + 1.0)
    if best is not None and can_extend and ext_info.get("ext_status") not in (0, 2):
        left = time_limit - (time.perf_counter() - t0)
        if (best[0] - lb) / max(abs(best[0]), 1e-12) > mip_rel_gap and left > 1.0:
            better, lb, _ = try_extended(0.9 * left)  # the remaining time on the gap
            best = better or best
    info = {"method": "colgen", "columns": len(cols_obj), "cg_iterations": iters, "cg_time_s": round(cg_time, 3),
            "master_rounds": rounds, "lp_bound": lp_val, "lagrangian_bound": lb if np.isfinite(lb) else None,
            "bound_certified": bool(certified), "complete_master": complete, **ext_info}
    if best is None:
        return None, _no_plan_status(complete and rm.status == 2, lb, obj, info), None, lb, info
    val, assignment, rm = best
    gap = max((val - lb) / max(abs(val), 1e-12), 0.0) if np.isfinite(lb) else None
    if complete and rm.status == 0 and getattr(rm, "mip_gap", None) is not None:
        gap = float(rm.mip_gap) if gap is None else min(gap, float(rm.mip_gap))
    status = "optimal" if gap is not None and gap <= mip_rel_gap else "feasible"
    return assignment, status, gap, lb, info


# ------------------------------------------------------------------------------------------------ Pareto
def non_dominated(points: Sequence[Sequence[float]], tol: float = 1e-12) -> list[int]:
    """Indices of the points no other point dominates (<= everywhere, < somewhere); duplicates keep the first."""
    pts = np.asarray(points, dtype=np.float64)
    keep = []
    for i in range(len(pts)):
        le = np.all(pts <= pts[i] + tol, axis=1)
        lt = np.any(pts < pts[i] - tol, axis=1)
        dominated = np.any(le & lt)
        dup_before = np.any(np.all(np.abs(pts[:i] - pts[i]) <= tol, axis=1)) if i else False
        if not dominated and not dup_before:
            keep.append(i)
    return keep


def pareto_front(
    loss: Mapping[int, np.ndarray],
    cost: Mapping[Hashable, np.ndarray] | Sequence[CostRow],
    budgets: Mapping[Hashable, float] | None = None,
    *,
    method: str = "epsilon",
    n_bands: int = 4,
    n_weights: int = 5,
    time_limit: float = 60.0,
    **kw,
) -> list[MilpResult]:
    """Non-dominated plans over the per-length losses, deduplicated, sorted by the first length's loss.

    ``epsilon`` (MoA): minimise each length alone (anchors), split every other length's range over the anchors
    into ``n_bands`` and minimise each length under every combination of caps: M + M*n_bands^(M-1) MILPs.
    ``weights``: minimise weighted sums over a simplex grid with ``n_weights`` steps per axis.
    """
    lengths = list(loss)
    results: list[MilpResult] = []

    def solve(**extra):
        try:
            r = solve_milp(loss, cost, budgets, time_limit=time_limit, **kw, **extra)
        except CompressError as e:
            if "cannot be met together" in str(e) and "loss bounds" in str(e):
                return None
            raise
        if r.status.startswith(("optimal", "time_limit")) and "no feasible" not in r.status:
            results.append(r)
        return r

    if len(lengths) == 1 or method == "weights":
        if len(lengths) == 1:
            solve(objective_weights={lengths[0]: 1.0})
        else:
            for combo in itertools.product(range(n_weights + 1), repeat=len(lengths)):
                if sum(combo) != n_weights:
                    continue
                solve(objective_weights={n: c / n_weights for n, c in zip(lengths, combo)})
    elif method == "epsilon":
        anchors = [solve(objective_weights={n: 1.0}) for n in lengths]
        anchors = [a for a in anchors if a is not None]
        lo = {n: min(a.losses[n] for a in anchors) for n in lengths}
        hi = {n: max(a.losses[n] for a in anchors) for n in lengths}
        for p in lengths:
            others = [n for n in lengths if n != p]
            caps = {n: np.linspace(lo[n], hi[n], n_bands + 1)[1:] for n in others}
            for combo in itertools.product(*[caps[n] for n in others]):
                bounds = {n: float(v) * (1 + 1e-9) + 1e-12 for n, v in zip(others, combo)}
                solve(objective_weights={p: 1.0}, loss_bounds=bounds)
    else:
        raise CompressError(f"unknown Pareto method {method!r}: use epsilon or weights")
    seen, uniq = set(), []
    for r in results:
        key = r.assignment.tobytes()
        if key not in seen:
            seen.add(key)
            uniq.append(r)
    keep = non_dominated([[r.losses[n] for n in lengths] for r in uniq])
    front = [uniq[i] for i in keep]
    return sorted(front, key=lambda r: r.losses[lengths[0]])
