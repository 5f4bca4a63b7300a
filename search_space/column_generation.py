"""Dantzig-Wolfe column generation for the per-head assignment with at most K distinct candidates per layer.

A column is one layer's assignment; its coefficients are exact (group maxima included). Pricing
(:mod:`search_space.layer_pricing`) enumerates the K-subsets of candidates per layer, so the Lagrangian (Farley)
bound ``LP + sum_l min(0, reduced cost_l)`` is a valid lower bound of the full MILP and the returned gap is
certified. Then the integer master over the generated columns (HiGHS), and, while the incumbent is not within
the tolerance of the bound, an extended master restricted by reduced costs to the plans that could beat it.

:func:`solve_colgen` answers a :class:`ColgenOutcome`; :mod:`search_space.milp` turns it into a MilpResult and
decides what a missing plan means (it drops lower bounds only on this module's proof of infeasibility).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from plans.errors import CompressError
from search_space.cost_rows import CostRow
from search_space.layer_pricing import LayerPricing


class ColgenOutcome(NamedTuple):
    assignment: np.ndarray | None  # [H] candidate per head, None when no plan was found
    status: str  # optimal | feasible | infeasible (proven) | no_plan (nothing found, nothing proven)
    gap: float | None  # certified relative gap
    lower_bound: float
    info: dict  # counters and bounds, the solver's message


def max_value(obj: np.ndarray) -> float:
    """The largest objective value any assignment can have (every head at its worst candidate)."""
    return float(obj.max(1).sum())


def _no_plan_status(complete_infeasible: bool, lb: float, obj: np.ndarray, info: dict) -> str:
    """``infeasible`` only with a proof that no assignment meets the constraints, else ``no_plan``.

    Proofs: the master holds every column (K=1) and is infeasible, or the certified lower bound exceeds the
    largest value any assignment can have (so no assignment is feasible: with big-M slacks the Lagrangian bound
    of an infeasible master grows with the penalty, and the extended master's bound is its cut when it is empty).
    """
    top = max_value(obj)
    if complete_infeasible:
        info["infeasible_proof"] = "the master holds every column and is infeasible"
    elif np.isfinite(lb) and lb > top + 1e-6 * max(1.0, abs(top)):
        info["infeasible_proof"] = f"certified lower bound {lb:.6g} > largest objective of any plan {top:.6g}"
    else:
        return "no_plan"
    return "infeasible"


@dataclass
class _ExtendedColumns:
    """The extended master's variables: ``u[l, T]`` (layer l takes subset T, heads with one choice left fixed)
    then free ``x[h, T, c]``; their objective, budget-row coefficients and meaning."""

    conv: list  # per layer: its u indices
    c_obj: list = field(default_factory=list)
    a_cols: list = field(default_factory=list)
    kind: list = field(default_factory=list)  # ("u", li, T, fixed choice per head) | ("x", li, T, h, c)
    eq_rows: list = field(default_factory=list)  # (u index, [x indices]) one per (head, subset) with a choice left


def solve_colgen(
    obj: np.ndarray,
    rows: Sequence[CostRow],
    layer_of_head: np.ndarray,
    K: int,
    time_limit: float,
    mip_rel_gap: float,
    with_lower: bool,
    max_iters: int = 300,
) -> ColgenOutcome:
    """Column generation over per-layer assignments, then the integer master with HiGHS (see the module)."""
    return ColumnGeneration(obj, rows, layer_of_head, K, time_limit, mip_rel_gap, with_lower, max_iters).run()


class ColumnGeneration:
    """One column-generation solve of objective ``obj`` [H, C] under ``rows``, K candidates per layer at most.

    :meth:`run` goes through: initial columns, the LP master with pricing until no column improves (the
    Lagrangian bound), enrichment of the column pool, then rounds of the integer master and the extended master.
    """

    def __init__(self, obj: np.ndarray, rows: Sequence[CostRow], layer_of_head: np.ndarray, K: int,
                 time_limit: float, mip_rel_gap: float, with_lower: bool, max_iters: int = 300):
        self.t0 = time.perf_counter()
        self.obj, self.rows, self.K = obj, rows, K
        self.time_limit, self.mip_rel_gap, self.max_iters = time_limit, mip_rel_gap, max_iters
        self.H, self.C = obj.shape
        grp_rows = [r for r in rows if r.group is not None]
        group = grp_rows[0].group if grp_rows else None  # all group rows share the KV grouping
        self.L = [LayerPricing(np.flatnonzero(layer_of_head == l), self.C, K, group) for l in np.unique(layer_of_head)]
        self.nL = len(self.L)
        self.complete = K == 1 and all(lay.n > 1 for lay in self.L)  # K=1: the master can hold every column
        # rows scaled to upper = 1
        self.R = len(rows)
        self.ups = np.array([r.upper if r.upper > 0 else 1.0 for r in rows])
        self.lows = np.array([(r.lower or 0.0) if (with_lower and r.group is None) else 0.0 for r in rows]) / self.ups
        self.has_low = self.lows > 0
        self.add_cost = [r.cost / u for r, u in zip(rows, self.ups) if r.group is None]
        self.add_idx = [i for i, r in enumerate(rows) if r.group is None]
        self.grp_idx = [i for i, r in enumerate(rows) if r.group is not None]
        # per group row: [C] member-independent lower envelope of the cost
        self.grp_cost_min = [rows[i].cost.min(0) / self.ups[i] for i in self.grp_idx]
        # the column pool
        self.cols_layer: list[int] = []
        self.cols_obj: list[float] = []
        self.cols_coef: list[np.ndarray] = []
        self.cols_assign: list[np.ndarray] = []
        self._seen: set = set()
        # LP master state: bounds, duals, the last LP answer
        self.lb = -np.inf
        self.lp_val = np.inf
        self.iters = 0
        self.mu = np.zeros(self.R)
        self.pi = None
        self.lp = None
        self.certified = False
        self.cg_time = 0.0
        # integer master state
        self.master_gap = mip_rel_gap
        self.S_final = self.g_final = None
        self.can_extend = False
        self.ext_info: dict = {}
        self.best = None  # (value, assignment, master result)
        self.rm = None  # the last integer master's answer
        self.rounds = 0
        self.ext_ub = np.inf  # incumbent value at the last extended-master attempt

    def _left(self) -> float:
        return self.time_limit - (time.perf_counter() - self.t0)

    # ------------------------------------------------------------------------------------------ columns, pricing
    def add_column(self, li: int, a: np.ndarray) -> bool:
        """Add layer ``li``'s assignment ``a`` to the pool (False when it is there already)."""
        key = (li, a.tobytes())
        if key in self._seen:
            return False
        self._seen.add(key)
        hs = self.L[li].heads
        coef = np.zeros(self.R)
        for j, i in enumerate(self.add_idx):
            coef[i] = self.add_cost[j][hs, a].sum()
        for i in self.grp_idx:
            r = self.rows[i]
            pc = r.cost[hs, a] / self.ups[i]
            g = r.group[hs]
            coef[i] = sum(pc[g == x].max() for x in np.unique(g))
        self.cols_layer.append(li)
        self.cols_obj.append(float(self.obj[hs, a].sum()))
        self.cols_coef.append(coef)
        self.cols_assign.append(a)
        return True

    def scores(self, mu: np.ndarray):
        """per-head additive score and member-independent group term for duals mu (+ upper, - lower)."""
        S = self.obj.copy()
        for j, i in enumerate(self.add_idx):
            if mu[i] != 0:
                S += mu[i] * self.add_cost[j]
        g = None
        if self.grp_idx:
            g = np.zeros(self.C)
            for j, i in enumerate(self.grp_idx):
                g += max(mu[i], 0.0) * self.grp_cost_min[j]
        return S, g

    def price_all(self, mu: np.ndarray, top: int = 1):
        """Per layer (best value, [assignments of the ``top`` best subsets]) at duals ``mu``, and exact?"""
        S, g = self.scores(mu)
        out, exact = [], True
        for lay in self.L:
            v, assigns, ex = lay.price(S[lay.heads], g, top)
            out.append((v, assigns))
            exact &= ex
        return out, exact

    def _initial_columns(self) -> None:
        """A sweep of multipliers from "loss only" to "cost only", and the always-affordable column per layer."""
        lam_grid = [0.0] + list(np.geomspace(1e-3, 1e3, 7))
        for lam in lam_grid:
            mu = np.full(self.R, lam)
            priced, _ = self.price_all(mu)
            for li, (_, assigns) in enumerate(priced):
                for a in assigns:
                    self.add_column(li, a)
        # every head at its cheapest candidate in combined scaled cost
        cheap = np.zeros((self.H, self.C))
        for j in range(len(self.add_idx)):
            cheap += self.add_cost[j]
        for gm in self.grp_cost_min:
            cheap += gm[None, :]
        for li, lay in enumerate(self.L):
            v, assigns, _ = lay.price(cheap[lay.heads] * 1e6 + self.obj[lay.heads], None)
            self.add_column(li, assigns[0])

    # ------------------------------------------------------------------------------------------ the LP master
    def _master_lp(self, big_m: float):
        """The LP over the pool with big-M slacks on every row (never infeasible)."""
        R, has_low = self.R, self.has_low
        n = len(self.cols_obj)
        coef = np.array(self.cols_coef).T  # [R, n]
        # variables: z (n), s_up (R), s_lo (R)
        c = np.concatenate([self.cols_obj, np.full(R, big_m), np.full(R, big_m)])
        A_ub = np.vstack([
            np.hstack([coef, -np.eye(R), np.zeros((R, R))]),
            np.hstack([-coef[has_low], np.zeros((has_low.sum(), R)), -np.eye(R)[has_low]]),
        ])
        b_ub = np.concatenate([np.ones(R), -self.lows[has_low]])
        A_eq = np.zeros((self.nL, n + 2 * R))
        A_eq[np.array(self.cols_layer), np.arange(n)] = 1.0
        res = linprog(c, A_ub=sparse.csr_matrix(A_ub), b_ub=b_ub, A_eq=sparse.csr_matrix(A_eq), b_eq=np.ones(self.nL),
                      bounds=(0, None), method="highs")
        if res.status != 0:
            raise CompressError(f"column generation: master LP failed ({res.message})")
        return res

    def _generate(self) -> None:
        """Column generation proper: LP master, pricing, new columns, until none improves; the certified bound."""
        R = self.R
        big_m = 1e3 * max(1.0, float(np.abs(self.obj).max(1).sum()))
        exact_all = True
        while True:
            self.iters += 1
            res = self._master_lp(big_m)
            self.lp_val = float(res.fun)
            m_ub = res.ineqlin.marginals
            self.pi = res.eqlin.marginals
            mu = -m_ub[:R].copy()
            if self.has_low.any():
                mu[self.has_low] -= -m_ub[R:]
            self.mu = mu
            priced, exact = self.price_all(mu)
            # reduced cost of the best column per layer (pricing value includes the group term lower envelope)
            rcs = np.array([v - self.pi[li] for li, (v, _) in enumerate(priced)])
            if exact:
                self.lb = max(self.lb, self.lp_val + float(np.minimum(rcs, 0).sum()))
            exact_all = exact
            added = 0
            for li, (v, assigns) in enumerate(priced):
                if rcs[li] < -1e-9:
                    added += self.add_column(li, assigns[0])
            if added == 0 or self.iters >= self.max_iters or time.perf_counter() - self.t0 > 0.6 * self.time_limit:
                break
            if exact and self.lp_val - self.lb <= 1e-7 * max(1.0, abs(self.lp_val)):
                break
        self.lp = res
        self.certified = exact_all
        if not exact_all and np.isfinite(self.lp_val):  # certify the bound with exact per-layer MILP pricing
            b = self._exact_pricing_bound(*self.scores(self.mu))
            self.lb, self.certified = (max(self.lb, b), True) if b is not None else (self.lb, False)
        self.cg_time = time.perf_counter() - self.t0

    def _exact_pricing_bound(self, S: np.ndarray, g: np.ndarray | None) -> float | None:
        """The Lagrangian bound with every layer priced exactly by its K-median MILP (None when one fails)."""
        vals = []
        for li, lay in enumerate(self.L):
            v = lay.price_exact_milp(S[lay.heads], g, max(0.5, 0.3 * self._left() / (len(self.L) - li)))
            if v is None:
                return None
            vals.append(v - self.pi[li])
        return self.lp_val + float(np.minimum(vals, 0).sum())

    def _enrich(self) -> None:
        """Top subsets at the final duals, perturbed duals, and one-head moves around the LP support."""
        for scale in (0.8, 0.9, 0.95, 0.98, 1.02, 1.05, 1.1, 1.2):
            priced, _ = self.price_all(self.mu * scale, top=3)
            for li, (_, assigns) in enumerate(priced):
                for a in assigns:
                    self.add_column(li, a)
        if self.complete:  # K=1: every layer has only C possible columns; with all of them the master is the full problem
            for li, lay in enumerate(self.L):
                for cnd in range(self.C):
                    self.add_column(li, np.full(lay.n, cnd, dtype=np.int64))
        z = self.lp.x[: len(self.lp.x) - 2 * self.R]
        support = [k for k in range(len(z)) if z[k] > 1e-6]
        for k in support:
            li, a = self.cols_layer[k], self.cols_assign[k]
            T = np.unique(a)
            for h in range(len(a)):
                for cnd in T:
                    if cnd != a[h]:
                        b = a.copy(); b[h] = cnd
                        self.add_column(li, b)

    # ------------------------------------------------------------------------------------------ the integer master
    def _prepare_master(self) -> None:
        # the master's own gap is measured against its LP bound, which is >= the Lagrangian bound: ask for what is
        # left of the tolerance once the CG bound's distance is accounted for
        lp_val, lb = self.lp_val, self.lb
        cg_slack = max(0.0, (lp_val - lb) / max(abs(lp_val), 1e-12)) if np.isfinite(lb) else 0.0
        self.master_gap = max(0.2 * self.mip_rel_gap, 0.9 * self.mip_rel_gap - cg_slack)
        if not self.certified:
            self.lb = -np.inf
        self.S_final, self.g_final = self.scores(self.mu)
        # the reduced-cost filtered extended master (exact) needs additive rows and enumerated K-subsets
        self.can_extend = (self.certified and not self.grp_idx and all(lay.subsets is not None for lay in self.L)
                           and np.isfinite(lp_val))

    def _master_milp(self, limit: float):
        """The integer master over the pool (HiGHS' answer)."""
        n = len(self.cols_obj)
        coef = np.array(self.cols_coef).T
        lo_b = np.where(self.has_low, self.lows, -np.inf)
        A = sparse.vstack([sparse.csr_matrix(coef), sparse.csr_matrix(
            (np.ones(n), (np.array(self.cols_layer), np.arange(n))), shape=(self.nL, n))])
        lo = np.concatenate([lo_b, np.ones(self.nL)])
        hi = np.concatenate([np.ones(self.R), np.ones(self.nL)])
        return milp(np.array(self.cols_obj), integrality=np.ones(n), bounds=Bounds(0, 1),
                    constraints=LinearConstraint(A, lo, hi),
                    options={"time_limit": max(limit, 0.5), "mip_rel_gap": self.master_gap, "disp": False})

    def _neighbours(self, li: int, a: np.ndarray) -> None:
        """Columns that swap one candidate of the layer's set for another, heads re-priced at the final duals."""
        lay = self.L[li]
        T = list(np.unique(a))
        for i in range(len(T)):
            for cnd in range(self.C):
                if cnd in T:
                    continue
                T2 = np.array(sorted(T[:i] + [cnd] + T[i + 1 :]))
                _, Ts, V, caps = lay.values(self.S_final[lay.heads], self.g_final, T2[None, :])
                self.add_column(li, lay.assign(0, Ts, V, caps))

    def _master_rounds(self) -> None:
        """Integer master, then (per new incumbent) a short extended-master try, then neighbour columns; repeat."""
        H, obj = self.H, self.obj
        while True:
            left = self._left()
            rm = self.rm = self._master_milp(min(left, max(2.0, 0.5 * left)))
            self.rounds += 1
            if rm.x is None:
                break
            chosen = np.flatnonzero(np.round(rm.x).astype(bool))
            assignment = np.zeros(H, dtype=np.int64)
            for k in chosen:
                assignment[self.L[self.cols_layer[k]].heads] = self.cols_assign[k]
            val = float(obj[np.arange(H), assignment].sum())
            if self.best is None or val < self.best[0] - 1e-12:
                self.best = (val, assignment, rm)
            gap = (self.best[0] - self.lb) / max(abs(self.best[0]), 1e-12) if np.isfinite(self.lb) else None
            if self.complete or (gap is not None and gap <= self.mip_rel_gap) or self.rounds >= 8:
                break
            left = self._left()
            if self.can_extend and self.best[0] < self.ext_ub - 1e-12 and left > 1.0:
                # a short try per new incumbent (the model shrinks as the incumbent improves), the rest at the end
                self.ext_ub = self.best[0]
                better, self.lb, done = self._try_extended(max(1.0, 0.15 * left))
                self.best = better or self.best
                if done or (self.best[0] - self.lb) / max(abs(self.best[0]), 1e-12) <= self.mip_rel_gap:
                    break
            if time.perf_counter() - self.t0 > 0.7 * self.time_limit:
                break
            n_before = len(self.cols_obj)
            for k in chosen:
                self._neighbours(self.cols_layer[k], self.cols_assign[k])
            tighter = max(self.master_gap / 4, 1e-5)
            if len(self.cols_obj) == n_before and (rm.status != 0 or tighter == self.master_gap):
                break
            self.master_gap = tighter  # the master stopped at its own tolerance: ask it for more next round

    def _close_gap(self) -> None:
        """The remaining time on the extended master: a first plan, or the gap left open."""
        left = self._left()
        if self.best is None and not self.complete and self.can_extend and left > 0.5:
            # the restricted master holds no integer plan, which proves nothing (its columns are a heuristic subset:
            # with lower bounds the few plans that meet them are often missing). The extended master with a cut
            # above every plan's value keeps every plan: it finds one, or its infeasibility proves there is none.
            self.ext_info["ext_every_plan"] = True
            self.best, self.lb, _ = self._try_extended(max(0.9 * left, 1.0), cut=max_value(self.obj) + 1.0)
        if self.best is not None and self.can_extend and self.ext_info.get("ext_status") not in (0, 2):
            left = self._left()
            if (self.best[0] - self.lb) / max(abs(self.best[0]), 1e-12) > self.mip_rel_gap and left > 1.0:
                better, self.lb, _ = self._try_extended(0.9 * left)  # the remaining time on the gap
                self.best = better or self.best

    # ------------------------------------------------------------------------------------------ the extended master
    def _try_extended(self, limit: float, cut: float | None = None):
        """One extended-master attempt from the incumbent (or over every plan below ``cut``): (new incumbent or
        None, new lower bound, done?)."""
        out = self._extended_master(self.best[0] if self.best else cut, limit, cut)
        self.ext_info["ext_calls"] = self.ext_info.get("ext_calls", 0) + 1
        if out is None:
            return None, self.lb, True
        a_x, v_x, b_x = out
        improves = a_x is not None and (not self.best or v_x < self.best[0] - 1e-12)
        better = (v_x, a_x, self.best[2] if self.best else self.rm) if improves else None
        return better, max(self.lb, b_x), self.ext_info.get("ext_status") in (0, 2)

    def _extended_master(self, ub: float, limit: float, cut: float | None = None):
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
        for li, lay in enumerate(self.L):
            v, *_ = lay.values(self.S_final[lay.heads], None, lay.subsets)
            vals_T.append(v)
            minrc.append(float(v.min()) - self.pi[li])
        lb_f = self.lp_val + float(np.minimum(minrc, 0.0).sum())
        cut = ub - 0.9 * self.mip_rel_gap * abs(ub) if cut is None else cut
        delta = cut - lb_f
        if not delta > 0:
            return None, ub, cut
        tol = 1e-9 * max(1.0, abs(ub))
        scaled = [self.rows[i].cost / self.ups[i] for i in range(self.R)]
        cols = self._extended_columns(vals_T, minrc, delta + tol, scaled)
        if cols is None:
            return None
        r, n_rows = self._solve_extended(cols, cut, limit)
        self.ext_info.update({"ext_vars": len(cols.c_obj), "ext_rows": n_rows, "ext_status": int(r.status),
                              "ext_time_s": round(time.perf_counter() - tl0, 3)})
        dual = getattr(r, "mip_dual_bound", None)
        bound = min(cut, float(dual)) if dual is not None and np.isfinite(dual) else lb_f
        if r.status == 2:  # nothing beats cut
            bound = cut
        a = None if r.x is None else self._decode_extended(cols, r.x, scaled)
        if a is None:
            return None, ub, max(bound, lb_f)
        return a, float(self.obj[np.arange(self.H), a].sum()), max(bound, lb_f)

    def _extended_columns(self, vals_T, minrc, room: float, scaled) -> _ExtendedColumns | None:
        """The kept subsets and head choices (reduced-cost excess within ``room``); None past 300,000 variables."""
        cols = _ExtendedColumns(conv=[[] for _ in self.L])
        for li, lay in enumerate(self.L):
            Sl = self.S_final[lay.heads]
            keep = np.flatnonzero(vals_T[li] - self.pi[li] - min(minrc[li], 0.0) <= room)
            for b in keep:
                T = lay.subsets[b]
                slack = room - (vals_T[li][b] - self.pi[li] - min(minrc[li], 0.0))
                self._add_subset(cols, li, lay, Sl[:, T], T, slack, scaled)
                if len(cols.c_obj) > 300000:
                    return None
        return cols

    def _add_subset(self, cols: _ExtendedColumns, li: int, lay: LayerPricing, ST: np.ndarray, T: np.ndarray,
                    slack: float, scaled) -> None:
        """Layer ``li`` taking subset T: its u variable, and an x per head choice within ``slack`` of the best."""
        obj = self.obj
        dl = ST - ST.min(1, keepdims=True)
        allowed = dl <= slack
        fixed = np.where(allowed.sum(1) == 1, T[ST.argmin(1)], -1)
        hs_fixed = np.flatnonzero(fixed >= 0)
        gh = lay.heads[hs_fixed]
        ui = len(cols.c_obj)
        cols.conv[li].append(ui)
        cols.c_obj.append(float(obj[gh, fixed[hs_fixed]].sum()))
        cols.a_cols.append(np.array([m[gh, fixed[hs_fixed]].sum() for m in scaled]))
        cols.kind.append(("u", li, T, fixed))
        for h in np.flatnonzero(fixed < 0):
            xs = []
            for j in np.flatnonzero(allowed[h]):
                g = lay.heads[h]
                xs.append(len(cols.c_obj))
                cols.c_obj.append(float(obj[g, T[j]]))
                cols.a_cols.append(np.array([m[g, T[j]] for m in scaled]))
                cols.kind.append(("x", li, T, h, int(T[j])))
            cols.eq_rows.append((ui, xs))

    def _solve_extended(self, cols: _ExtendedColumns, cut: float, limit: float):
        """HiGHS on the extended master: budgets, choice rows, one subset per layer, ``objective <= cut``."""
        n = len(cols.c_obj)
        nL, conv, eq_rows = self.nL, cols.conv, cols.eq_rows
        Acost = np.array(cols.a_cols).T  # [R, n]
        ri, ci, vv = [], [], []
        for k, (ui, xs) in enumerate(eq_rows):  # sum_c x[h, T, c] - u[l, T] = 0
            ri += [k] * (len(xs) + 1); ci += xs + [ui]; vv += [1.0] * len(xs) + [-1.0]
        E = sparse.csr_matrix((vv, (ri, ci)), shape=(len(eq_rows), n))
        Cv = sparse.csr_matrix(
            (np.ones(sum(map(len, conv))), (np.concatenate([[li] * len(u) for li, u in enumerate(conv)]).astype(int),
                                            np.concatenate(conv).astype(int))), shape=(nL, n))
        A = sparse.vstack([sparse.csr_matrix(Acost), E, Cv, sparse.csr_matrix(np.array(cols.c_obj)[None, :])],
                          format="csr")
        lo = np.concatenate([np.where(self.has_low, self.lows, -np.inf), np.zeros(len(eq_rows)), np.ones(nL), [-np.inf]])
        hi = np.concatenate([np.ones(self.R), np.zeros(len(eq_rows)), np.ones(nL), [cut]])
        r = milp(np.array(cols.c_obj), integrality=np.ones(n), bounds=Bounds(0, 1),
                 constraints=LinearConstraint(A, lo, hi),
                 options={"time_limit": max(limit, 0.5), "mip_rel_gap": 0.9 * self.mip_rel_gap, "disp": False})
        return r, int(A.shape[0])

    def _decode_extended(self, cols: _ExtendedColumns, x: np.ndarray, scaled) -> np.ndarray | None:
        """The plan of an extended-master solution, None when it leaves a head out or breaks a budget."""
        H = self.H
        x = np.round(x).astype(bool)
        a = np.full(H, -1, dtype=np.int64)
        for k in np.flatnonzero(x):
            kd = cols.kind[k]
            if kd[0] == "u":
                lay = self.L[kd[1]]
                hs = np.flatnonzero(kd[3] >= 0)
                a[lay.heads[hs]] = kd[3][hs]
            else:
                a[self.L[kd[1]].heads[kd[3]]] = kd[4]
        if (a < 0).any():
            return None
        tot = np.array([m[np.arange(H), a].sum() for m in scaled])
        if (tot > 1 + 1e-7).any() or (tot < np.where(self.has_low, self.lows, -np.inf) - 1e-7).any():
            return None
        return a

    # ------------------------------------------------------------------------------------------ the whole solve
    def run(self) -> ColgenOutcome:
        self._initial_columns()
        self._generate()
        self._enrich()
        self._prepare_master()
        self._master_rounds()
        self._close_gap()
        return self._outcome()

    def _outcome(self) -> ColgenOutcome:
        lb, best = self.lb, self.best
        info = {"method": "colgen", "columns": len(self.cols_obj), "cg_iterations": self.iters,
                "cg_time_s": round(self.cg_time, 3), "master_rounds": self.rounds, "lp_bound": self.lp_val,
                "lagrangian_bound": lb if np.isfinite(lb) else None, "bound_certified": bool(self.certified),
                "complete_master": self.complete, **self.ext_info}
        if best is None:
            status = _no_plan_status(self.complete and self.rm.status == 2, lb, self.obj, info)
            return ColgenOutcome(None, status, None, lb, info)
        val, assignment, rm = best
        gap = max((val - lb) / max(abs(val), 1e-12), 0.0) if np.isfinite(lb) else None
        if self.complete and rm.status == 0 and getattr(rm, "mip_gap", None) is not None:
            gap = float(rm.mip_gap) if gap is None else min(gap, float(rm.mip_gap))
        status = "optimal" if gap is not None and gap <= self.mip_rel_gap else "feasible"
        return ColgenOutcome(assignment, status, gap, lb, info)
