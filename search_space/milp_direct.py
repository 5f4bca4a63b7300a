"""The direct formulation of the per-head assignment: one HiGHS MILP (scipy.optimize.milp), MoA's model.

Variables ``x[h, c]`` (head h takes candidate c), ``y[l, c]`` (layer l uses candidate c, only when the K limit
binds) and one continuous ``w[g]`` per GQA group of every group-max row; the constraint blocks, in this order:
one candidate per head, additive budgets (with their lower bounds when asked), group-max budgets, the K limit
(aggregated ``sum_{h in l} x[h,c] <= n_l y[l,c]`` or disaggregated ``x[h,c] <= y[l,c]`` linking, then
``sum_c y[l,c] <= K``) and the epsilon caps on raw losses. :mod:`search_space.milp` decides when to use it and
what its answer means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from search_space.cost_rows import CostRow


@dataclass
class _Blocks:
    """Constraint rows collected block by block: ``lo <= block @ v <= hi``."""

    blocks: list = field(default_factory=list)
    lo: list = field(default_factory=list)
    hi: list = field(default_factory=list)

    def add(self, block, lo, hi) -> None:
        self.blocks.append(block); self.lo.append(lo); self.hi.append(hi)


@dataclass
class DirectModel:
    """``min c.v  s.t.  lo <= A v <= hi,  0 <= v <= ub``, ``integrality`` 1 for the binaries."""

    c: np.ndarray
    A: sparse.csr_matrix
    lo: np.ndarray
    hi: np.ndarray
    integrality: np.ndarray
    ub: np.ndarray

    @property
    def n_vars(self) -> int:
        return len(self.c)

    @property
    def n_constraints(self) -> int:
        return self.A.shape[0]

    def solve(self, time_limit: float, mip_rel_gap: float, presolve: bool):
        """HiGHS' answer (scipy's OptimizeResult)."""
        return milp(
            self.c, integrality=self.integrality, bounds=Bounds(np.zeros(len(self.c)), self.ub),
            constraints=LinearConstraint(self.A, self.lo, self.hi),
            options={"time_limit": max(time_limit, 0.1), "mip_rel_gap": mip_rel_gap, "presolve": presolve, "disp": False},
        )


def build_direct_model(
    obj: np.ndarray,
    rows: Sequence[CostRow],
    loss: Mapping[int, np.ndarray],
    *,
    layer_of_head: np.ndarray | None,
    K: int | None,
    linking: str,
    loss_bounds: Mapping[int, float] | None,
    with_lower: bool,
) -> DirectModel:
    """The model for objective ``obj`` [H, C]; ``layer_of_head`` only when the K limit binds (else None)."""
    H, C = obj.shape
    layers = np.unique(layer_of_head) if layer_of_head is not None else np.array([], dtype=int)
    n_x, n_y = H * C, len(layers) * C
    group_rows = [r for r in rows if r.group is not None]
    g_ids = [np.unique(r.group) for r in group_rows]
    n_w = sum(len(g) for g in g_ids)
    n = n_x + n_y + n_w
    c = np.zeros(n)
    c[:n_x] = obj.ravel()
    blk = _Blocks()
    # one candidate per head
    blk.add(sparse.csr_matrix((np.ones(n_x), (np.repeat(np.arange(H), C), np.arange(n_x))), shape=(H, n)),
            np.ones(H), np.ones(H))
    # additive budgets
    for r in rows:
        if r.group is not None:
            continue
        blk.add(sparse.csr_matrix(np.concatenate([r.cost.ravel(), np.zeros(n_y + n_w)])[None, :]),
                [r.lower if with_lower and r.lower else -np.inf], [r.upper])
    _group_budgets(blk, group_rows, g_ids, H, C, n, n_x + n_y)
    if layer_of_head is not None:
        _k_limit(blk, layer_of_head, layers, K, H, C, n, linking)
    # epsilon constraints on raw losses
    for nlen, eps in (loss_bounds or {}).items():
        row = np.zeros(n); row[:n_x] = loss[nlen].ravel()
        blk.add(sparse.csr_matrix(row[None, :]), [-np.inf], [float(eps)])
    return DirectModel(
        c=c, A=sparse.vstack(blk.blocks, format="csr"),
        lo=np.concatenate([np.asarray(x, float) for x in blk.lo]),
        hi=np.concatenate([np.asarray(x, float) for x in blk.hi]),
        integrality=np.concatenate([np.ones(n_x + n_y), np.zeros(n_w)]),
        ub=np.concatenate([np.ones(n_x + n_y), np.full(n_w, np.inf)]),
    )


def _group_budgets(blk: _Blocks, group_rows, g_ids, H: int, C: int, n: int, w0: int) -> None:
    """Group-max budgets: ``w_g - cost_h . x_h >= 0`` for h in g, ``sum_g w_g <= upper``."""
    n_x = H * C
    for r, gs in zip(group_rows, g_ids):
        gpos = {int(g): w0 + i for i, g in enumerate(gs)}
        ri = np.concatenate([np.repeat(np.arange(H), C), np.arange(H)])
        ci = np.concatenate([np.arange(n_x), [gpos[int(g)] for g in r.group]])
        vals = np.concatenate([-r.cost.ravel(), np.ones(H)])
        blk.add(sparse.csr_matrix((vals, (ri, ci)), shape=(H, n)), np.zeros(H), np.full(H, np.inf))
        row = np.zeros(n); row[w0:w0 + len(gs)] = 1.0
        blk.add(sparse.csr_matrix(row[None, :]), [-np.inf], [r.upper])
        w0 += len(gs)


def _k_limit(blk: _Blocks, layer_of_head, layers, K: int, H: int, C: int, n: int, linking: str) -> None:
    """At most K distinct candidates per layer: x linked to y (``linking``), ``sum_c y[l, c] <= K``."""
    lid = {int(l): i for i, l in enumerate(layers)}
    n_x, n_y = H * C, len(layers) * C
    lh = np.array([lid[int(l)] for l in layer_of_head])
    if linking == "disaggregated":
        ri = np.arange(n_x)
        xi = np.arange(n_x)
        yi = n_x + lh[np.repeat(np.arange(H), C)] * C + np.tile(np.arange(C), H)
        m = sparse.csr_matrix(
            (np.concatenate([np.ones(n_x), -np.ones(n_x)]), (np.concatenate([ri, ri]), np.concatenate([xi, yi]))),
            shape=(n_x, n),
        )
        blk.add(m, np.full(n_x, -np.inf), np.zeros(n_x))
    else:
        n_l = np.bincount(lh, minlength=len(layers)).astype(float)
        rx = lh[np.repeat(np.arange(H), C)] * C + np.tile(np.arange(C), H)
        ry = np.arange(n_y)
        m = sparse.csr_matrix(
            (np.concatenate([np.ones(n_x), -np.repeat(n_l, C)]), (np.concatenate([rx, ry]), np.concatenate([np.arange(n_x), n_x + ry]))),
            shape=(n_y, n),
        )
        blk.add(m, np.full(n_y, -np.inf), np.zeros(n_y))
    m = sparse.csr_matrix(
        (np.ones(n_y), (np.repeat(np.arange(len(layers)), C), n_x + np.arange(n_y))), shape=(len(layers), n)
    )
    blk.add(m, np.full(len(layers), -np.inf), np.full(len(layers), float(K)))
