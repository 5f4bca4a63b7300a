"""Pricing one layer: the best set of at most K candidates for the layer's heads and each head's choice in it.

For per-head scores ``S[h, c]`` (loss plus priced budget costs) a layer's value for a K-subset T is
``sum_h min_{c in T} S[h, c]`` (plus, with GQA groups, each group's widest member's term). Column generation
(:mod:`search_space.column_generation`) prices with it exactly, enumerating K-subsets up to :data:`MAX_ENUM` per
layer; the greedy solver (:mod:`search_space.greedy`) with its heuristic (greedy + 1-swap) only.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

MAX_ENUM = 20000  # K-subsets per layer enumerated exactly in pricing (K=3 over 48 candidates: 17,296)
_subset_cache: dict = {}


def _subsets(C: int, k: int) -> np.ndarray | None:
    if math.comb(C, k) > MAX_ENUM:
        return None
    key = (C, k)
    if key not in _subset_cache:
        _subset_cache[key] = np.array(list(itertools.combinations(range(C), k)), dtype=np.int64).reshape(-1, k)
    return _subset_cache[key]


class LayerPricing:
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

    def values(self, S: np.ndarray, gterm: np.ndarray | None, subsets: np.ndarray):
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

    def assign(self, b: int, Ts: np.ndarray, V: np.ndarray, caps) -> np.ndarray:
        """Each head's candidate within subset ``b`` of a :meth:`values` answer."""
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
            val, Ts, V, caps = self.values(S, gterm, self.subsets)
            order = np.argsort(val)[:top] if top > 1 else [int(val.argmin())]
            return float(val[order[0]]), [self.assign(b, Ts, V, caps) for b in order], True
        # greedy + 1-swap local search (K-median heuristic) when K-subsets are too many to enumerate
        T: list[int] = []
        for _ in range(self.k):
            rest = np.array([c for c in range(self.C) if c not in T])
            cand = np.array([T + [c] for c in rest])
            val, *_ = self.values(S, gterm, cand)
            T.append(int(rest[val.argmin()]))
        best, *_ = self.values(S, gterm, np.array([T]))
        best = float(best[0])
        for _ in range(5):
            improved = False
            for i in range(self.k):
                rest = np.array([c for c in range(self.C) if c not in T])
                cand = np.array([T[:i] + [c] + T[i + 1 :] for c in rest])
                val, *_ = self.values(S, gterm, cand)
                j = int(val.argmin())
                if val[j] < best - 1e-12:
                    best, T, improved = float(val[j]), list(cand[j]), True
            if not improved:
                break
        val, Ts, V, caps = self.values(S, gterm, np.array([T]))
        return float(val[0]), [self.assign(0, Ts, V, caps)], False

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
