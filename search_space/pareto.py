"""Pareto filtering: which points no other point dominates (the study's front over loss and latency)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


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
