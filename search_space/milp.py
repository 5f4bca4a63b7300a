"""The exact per-head assignment: a 0/1 MILP solved with HiGHS (scipy.optimize.milp), MoA's formulation.

Variables ``x[h, c]`` (head h takes candidate c), ``y[l, c]`` (layer l uses candidate c) and, for a budget whose
cost is a GQA group's widest member, one continuous ``w[g]`` per group::

    min   sum_N  weight_N * (loss_N . x) / scale_N               scale_N = sum_h max_c loss_N[h, c]
    s.t.  sum_c x[h, c] = 1                                      every head takes one candidate
          lower_b <= sum_{h,c} cost_b[h, c] x[h, c] <= upper_b   every budget b (lower_b = lower_fraction * upper_b)
          w[g] >= sum_c cost_b[h, c] x[h, c]  (h in g),  sum_g w[g] <= upper_b      group-max budgets
          x[h, c] <= y[layer(h), c],  sum_c y[l, c] <= K          at most K distinct candidates per layer
          loss_N . x <= eps_N                                    (epsilon-constraint Pareto scans only)

:func:`solve_milp` validates the budgets, merges interchangeable candidates and picks the path: the K=1
per-layer model (:mod:`search_space.milp_k1`), column generation (:mod:`search_space.column_generation`) or the
direct model (:mod:`search_space.milp_direct`); it turns each path's answer into a :class:`MilpResult`.

A budget that no assignment can meet raises CompressError naming the budget, its length and the cheapest
reachable cost. The lower bounds are dropped only on a proof that no assignment meets them together with
everything else (HiGHS' infeasibility verdict on the full model, or a column-generation certificate, never a
restricted master that merely lacks the right columns); the result then says so (``MilpResult.lower_relaxed``
and ``lower_relaxed_reason``). They only exist to make the plan use its budget.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

import numpy as np

from plans.errors import CompressError
from search_space.column_generation import solve_colgen
from search_space.cost_rows import (
    CostRow, SolverInput, budgets_unmet, check_budgets, distinct_candidates, evaluate_assignment, objective_vector,
)
from search_space.milp_direct import build_direct_model
from search_space.milp_k1 import groups_within_layers, per_layer_problem


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
    K: int | None = None  # the per-layer limit the search asked for (set by search_space.problem.solve_problem)
    no_solution: bool = False  # the solver stopped without any feasible assignment (``assignment`` is a placeholder)

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


LOWER_DROPPED = "no assignment meets the lower bounds together with the other constraints: "


@dataclass(frozen=True)
class MilpOptions:
    """How :func:`solve_milp` solves (the problem itself is a :class:`~search_space.cost_rows.SolverInput`).

    ``time_limit``: seconds for the whole solve. ``mip_rel_gap``: HiGHS' relative MIP gap at which a plan counts
    as optimal. ``linking``: ``aggregated`` (``sum_{h in l} x[h,c] <= n_l y[l,c]``, small) or ``disaggregated``
    (``x[h,c] <= y[l,c]``, a tighter LP relaxation, many more rows). ``relax_lower``: drop the lower bounds once
    no assignment can meet them (else such a problem raises). ``presolve``: HiGHS presolve, off by default: it
    stalls for minutes on this model (many parallel columns).

    ``method``: ``direct`` (the formulation above in one HiGHS call), ``colgen`` (column generation over
    per-layer assignments with exactly priced K-subsets, then the integer master; the gap is certified by the
    Lagrangian bound) or ``auto`` (colgen when the K limit binds and the problem has more than 1,500 x
    variables: the direct model's LP is slow and weak there, see benchmarks/milp_bench.py).
    """

    time_limit: float = 60.0
    mip_rel_gap: float = 1e-3
    linking: str = "aggregated"
    relax_lower: bool = True
    presolve: bool = False
    method: str = "auto"


def solve_milp(inp: SolverInput, options: MilpOptions = MilpOptions()) -> MilpResult:
    """Optimal candidate per head of ``inp`` under every budget, with at most ``inp.K`` distinct candidates per
    layer, solved as ``options`` say."""
    t0 = time.perf_counter()
    opt = options
    loss = {n: np.asarray(l, dtype=np.float64) for n, l in inp.loss.items()}
    if not loss:
        raise CompressError("solve_milp: no loss matrices")
    H, C = next(iter(loss.values())).shape
    rows = inp.rows()
    for r in rows:
        if r.cost.shape != (H, C):
            raise CompressError(f"solve_milp: cost {r.key} has shape {r.cost.shape}, loss has {(H, C)}")
    check_budgets(rows)
    K, layer_of_head = inp.K, inp.layer_of_head
    # the K limit binds only when a layer has more heads than K and there are more than K candidates
    use_k = (
        K is not None and layer_of_head is not None and K < C
        and int(np.bincount(np.unique(layer_of_head, return_inverse=True)[1]).max()) > K
    )
    if K is not None and K < 1:
        raise CompressError(f"K must be >= 1, got {K}")
    # candidates with the same loss and cost for every head are interchangeable: solve over one of each (fewer
    # variables, and no symmetric copies of every solution for the branch and bound), then map back
    keep = distinct_candidates(loss, rows)
    if len(keep) < C:
        sub = solve_milp(
            replace(inp, loss={n: l[:, keep] for n, l in loss.items()}, budgets=None, groups=None,
                    cost=[CostRow(**{**r.__dict__, "cost": r.cost[:, keep]}) for r in rows]),
            replace(opt, time_limit=opt.time_limit - (time.perf_counter() - t0)),
        )
        return _merged_back(sub, keep, t0)

    inp = replace(inp, loss=loss, cost=rows, budgets=None, groups=None)
    # K=1 collapses every layer to one choice; a group-max row whose group spans layers is not linear in those
    # choices (its members may differ), so such rows take the general model
    if use_k and K == 1 and all(groups_within_layers(r.group, layer_of_head) for r in rows if r.group is not None):
        return _solve_k1(inp, rows, opt, t0)
    obj = objective_vector(loss, inp.objective_weights)
    if opt.method not in ("auto", "direct", "colgen"):
        raise CompressError(f"unknown MILP method {opt.method!r}: use auto, direct or colgen")
    if use_k and (opt.method == "colgen" or (opt.method == "auto" and H * C > 1500)):
        res = _colgen_path(inp, rows, obj, opt, t0)
        if res is not None:
            return res
        # column generation found no plan and proved nothing: the direct model below decides (it finds a plan or
        # proves that the lower bounds, or the budgets themselves, cannot be met)
    return _solve_direct(inp if use_k else replace(inp, layer_of_head=None, K=None), rows, obj, opt, t0)


def _merged_back(sub: MilpResult, keep: np.ndarray, t0: float) -> MilpResult:
    """The answer over the distinct candidates ``keep``, mapped back to the original candidate indices."""
    sub.assignment = keep[sub.assignment]
    sub.time_s = time.perf_counter() - t0
    if sub.message.startswith("{"):
        sub.message = json.dumps({**json.loads(sub.message), "distinct_candidates": int(len(keep))})
    return sub


def _solve_direct(inp: SolverInput, rows: list[CostRow], obj: np.ndarray, opt: MilpOptions, t0: float) -> MilpResult:
    """The direct model in one HiGHS call (``inp.layer_of_head`` and ``inp.K`` None when the K limit does not
    bind; ``inp.loss`` float64, ``rows`` made, ``obj`` the objective and ``t0`` the solve's start)."""
    H, C = obj.shape
    loss, K, loss_bounds, objective_weights = inp.loss, inp.K, inp.loss_bounds, inp.objective_weights

    def run(with_lower: bool, limit: float):
        model = build_direct_model(obj, rows, loss, layer_of_head=inp.layer_of_head, K=K, linking=opt.linking,
                                   loss_bounds=loss_bounds, with_lower=with_lower)
        return model.solve(limit, opt.mip_rel_gap, opt.presolve), model.n_vars, model.n_constraints

    res, n_vars, n_cons = run(True, opt.time_limit)
    relaxed, reason = False, ""
    has_lower = any(r.lower for r in rows if r.group is None)
    if res.x is None and res.status == 2 and opt.relax_lower and has_lower:
        # HiGHS proved the full model (lower bounds included) infeasible: only now are the lower bounds dropped
        res, n_vars, n_cons = run(False, opt.time_limit - (time.perf_counter() - t0))
        relaxed, reason = True, LOWER_DROPPED + "HiGHS proved the full model with the lower bounds infeasible"
    elapsed = time.perf_counter() - t0
    if res.x is None:
        if res.status == 2:
            raise budgets_unmet(rows, K, loss_bounds)
        status = "time_limit" if res.status == 1 else "error"
        return MilpResult(
            assignment=np.zeros(H, dtype=np.int64), status=f"{status} (no feasible solution)", objective=float("nan"),
            mip_gap=None, time_s=elapsed, lower_relaxed=relaxed, lower_relaxed_reason=reason, n_vars=n_vars,
            n_constraints=n_cons, message=res.message, no_solution=True,
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


def _colgen_path(inp: SolverInput, rows: list[CostRow], obj: np.ndarray, opt: MilpOptions,
                 t0: float) -> MilpResult | None:
    """The column-generation solve of :func:`solve_milp`, or None when it found no plan and proved nothing
    (arguments as for :func:`_solve_direct`, with the K limit binding).

    The restricted master only holds the generated columns, so "no integer plan among them" proves nothing about
    the whole problem. The lower bounds are dropped only on a proof that no assignment meets them (see
    :func:`search_space.column_generation.solve_colgen`); without a proof the caller's direct model decides, which
    finds the plan or proves the infeasibility itself (this used to drop the lower bounds of a feasible problem
    instead).
    """
    H, C = obj.shape
    loss, layer_of_head, K, loss_bounds = inp.loss, inp.layer_of_head, inp.K, inp.loss_bounds
    time_limit, mip_rel_gap, relax_lower = opt.time_limit, opt.mip_rel_gap, opt.relax_lower
    cg_rows = list(rows) + [
        CostRow(key=f"loss@{nlen}", cost=loss[nlen], upper=float(eps), lower=0.0)
        for nlen, eps in (loss_bounds or {}).items()
    ]
    has_lower = any(r.lower for r in rows if r.group is None)
    with_lower, reason = True, ""
    a, status, gap, lb, info = solve_colgen(obj, cg_rows, layer_of_head, K, time_limit - (time.perf_counter() - t0),
                                            mip_rel_gap, True)
    if a is None and status == "infeasible" and has_lower and relax_lower:
        with_lower, reason = False, LOWER_DROPPED + f"column generation proved it ({info.get('infeasible_proof')})"
        a, status, gap, lb, info = solve_colgen(obj, cg_rows, layer_of_head, K,
                                                time_limit - (time.perf_counter() - t0), mip_rel_gap, False)
    if a is None:
        if status == "infeasible" and (with_lower is False or not has_lower or not relax_lower):
            raise budgets_unmet(rows, K, loss_bounds)  # proven: nothing meets the constraints left
        return None
    left = time_limit - (time.perf_counter() - t0)
    if status != "optimal" and H * C <= 20000 and left > 1.0:
        # small problem, gap not closed: the direct model's branch and bound, bound shared
        d_rows = rows if with_lower else [CostRow(**{**r.__dict__, "lower": 0.0}) for r in rows]
        try:
            d = solve_milp(replace(inp, cost=d_rows), MilpOptions(
                time_limit=min(left, max(5.0, 0.5 * left)), mip_rel_gap=mip_rel_gap, linking="disaggregated",
                relax_lower=False, method="direct",
            ))
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
    losses, costs, objective = evaluate_assignment(a, loss, rows, inp.objective_weights)
    return MilpResult(
        assignment=a, status=status, objective=objective, mip_gap=gap, time_s=time.perf_counter() - t0,
        losses=losses, costs=costs, solver="highs-colgen", lower_relaxed=not with_lower, lower_relaxed_reason=reason,
        n_vars=info["columns"], n_constraints=len(cg_rows) + len(np.unique(layer_of_head)), message=json.dumps(info),
    )


def _solve_k1(inp: SolverInput, rows: list[CostRow], opt: MilpOptions, t0: float) -> MilpResult:
    """K=1: every head of a layer takes the layer's candidate, so the exact model has one choice per layer."""
    lp = per_layer_problem(inp.loss, rows, inp.layer_of_head, inp.objective_weights)
    r = solve_milp(
        SolverInput(lp.loss, lp.rows, None, layer_of_head=None, K=None, objective_weights=lp.weights,
                    loss_bounds=inp.loss_bounds),
        replace(opt, method="direct", linking="aggregated"),
    )
    a = lp.lift(r.assignment) if r.ok and not r.no_solution else np.zeros(len(inp.layer_of_head), dtype=np.int64)
    losses, costs, objective = evaluate_assignment(a, inp.loss, rows, lp.head_weights)
    return MilpResult(
        assignment=a, status=r.status, objective=objective if r.ok else float("nan"), mip_gap=r.mip_gap,
        time_s=time.perf_counter() - t0, losses=losses, costs=costs, solver="highs-milp (K=1 per layer)",
        lower_relaxed=r.lower_relaxed, lower_relaxed_reason=r.lower_relaxed_reason, n_vars=r.n_vars,
        n_constraints=r.n_constraints, message=r.message, no_solution=r.no_solution,
    )
