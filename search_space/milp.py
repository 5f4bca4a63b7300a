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
reachable cost. A lower bound that cannot be met together with everything else is dropped (reported in
``MilpResult.lower_relaxed``): it only exists to make the plan use its budget.
"""

from __future__ import annotations

import itertools
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
    lower_relaxed: bool = False
    n_vars: int = 0
    n_constraints: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("optimal", "time_limit", "greedy")

    def summary(self) -> dict:
        return {
            "name": self.solver, "status": self.status, "objective": self.objective,
            "mip_gap": self.mip_gap, "time_s": round(self.time_s, 4), "lower_relaxed": self.lower_relaxed,
            "n_vars": self.n_vars, "n_constraints": self.n_constraints,
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
    """CompressError for a budget below the cheapest reachable cost; clamp lower bounds to the reachable max."""
    for r in rows:
        lo = r.min_total()
        if lo > r.upper * (1 + 1e-9) + 1e-12:
            at = f" at N={r.length}" if r.length is not None else ""
            raise CompressError(
                f"budget {r.key}{at} is infeasible: the cheapest assignment of the candidates costs "
                f"{r.show(lo)} but the budget allows {r.show(r.upper)}; raise the budget or add smaller spans"
            )
        hi = r.max_total()
        if r.lower and r.lower > hi:
            r.lower = hi


def evaluate_assignment(
    assignment: np.ndarray, loss: Mapping[int, np.ndarray], rows: Sequence[CostRow], weights: Mapping | None = None
) -> tuple[dict, dict, float]:
    """(raw loss per length, cost per row in display units, normalised objective)."""
    idx = np.arange(len(assignment))
    losses = {n: float(np.asarray(l)[idx, assignment].sum()) for n, l in loss.items()}
    obj = float(objective_vector(loss, weights)[idx, assignment].sum())
    costs = {r.key: r.total(assignment) / r.display_scale for r in rows}
    return losses, costs, obj


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
    mip_rel_gap: float = 1e-4,
    linking: str = "aggregated",
    relax_lower: bool = True,
    presolve: bool = False,
) -> MilpResult:
    """Optimal candidate per head under every budget, with at most K distinct candidates per layer.

    ``loss[N]`` and ``cost[key]`` are [H, C] arrays (H heads in decision order, C candidates); ``budgets[key]``
    is the upper bound of ``cost[key]`` summed over heads (or pass ``cost`` as a list of :class:`CostRow`).
    ``layer_of_head`` [H] gives each head's layer (needed for K). ``loss_bounds[N]`` caps a length's raw loss
    (epsilon-constraint scans). ``linking``: ``aggregated`` (``sum_{h in l} x[h,c] <= n_l y[l,c]``, small) or
    ``disaggregated`` (``x[h,c] <= y[l,c]``, a tighter LP relaxation, many more rows).
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
    use_k = K is not None and layer_of_head is not None and K < C
    if K is not None and K < 1:
        raise CompressError(f"K must be >= 1, got {K}")

    obj = objective_vector(loss, objective_weights)

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
    relaxed = False
    has_lower = any(r.lower for r in rows if r.group is None)
    if res.x is None and res.status == 2 and relax_lower and has_lower:
        res, n_vars, n_cons = run(False, time_limit - (time.perf_counter() - t0))
        relaxed = True
    elapsed = time.perf_counter() - t0
    if res.x is None:
        if res.status == 2:
            what = ", ".join(f"{r.key} <= {r.show(r.upper)}" for r in rows)
            kmsg = f" with at most K={K} distinct candidates per layer" if use_k else ""
            bmsg = f" and loss bounds {dict(loss_bounds)}" if loss_bounds else ""
            raise CompressError(f"the budgets cannot be met together{kmsg}{bmsg}: {what}")
        status = "time_limit" if res.status == 1 else "error"
        return MilpResult(
            assignment=np.zeros(H, dtype=np.int64), status=f"{status} (no feasible solution)", objective=float("nan"),
            mip_gap=None, time_s=elapsed, lower_relaxed=relaxed, n_vars=n_vars, n_constraints=n_cons, message=res.message,
        )
    x = np.asarray(res.x[: H * C]).reshape(H, C)
    assignment = x.argmax(1).astype(np.int64)
    losses, costs, objective = evaluate_assignment(assignment, loss, rows, objective_weights)
    status = {0: "optimal", 1: "time_limit"}.get(res.status, f"status {res.status}")
    gap = getattr(res, "mip_gap", None)
    return MilpResult(
        assignment=assignment, status=status, objective=objective, mip_gap=None if gap is None else float(gap),
        time_s=elapsed, losses=losses, costs=costs, lower_relaxed=relaxed, n_vars=n_vars, n_constraints=n_cons,
        message=str(res.message),
    )


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
