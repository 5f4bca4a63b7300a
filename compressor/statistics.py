"""Confidence intervals and paired tests for fidelity results: Wilson intervals, exact McNemar, pooled McNemar.

Every evaluated item is scored for every method on the *same* prompts, so two methods are compared item by
item (paired): only the discordant items (one method right, the other wrong) carry information about which is
better. :func:`mcnemar_exact` is the exact conditional test on those; :func:`mcnemar_pooled` pools several cells
(lengths, depths, tasks) into one test.

Rows written to ``fidelity.json``: :meth:`CellResult.to_row` (one per model x task x length x depth x method) and
:meth:`Comparison.to_row` (one per plan-vs-baseline test over some axis).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from scipy.stats import binomtest

BEYOND_MODEL_THRESHOLD = 0.8
"""Dense accuracy below which a cell is "beyond the model": no method can be judged against it there."""


# ----------------------------------------------------------------------------------------------------------
# one proportion


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes in ``n`` trials (scipy's ``binomtest(...).proportion_ci``,
    ``method="wilson"``, no continuity correction). With ``n == 0`` there is no information: returns ``(0.0, 1.0)``,
    the whole range (never NaN, so rows stay JSON-serialisable)."""
    correct, n = int(correct), int(n)
    if n < 0 or not 0 <= correct <= max(n, 0):
        raise ValueError(f"wilson_interval needs 0 <= correct <= n, got correct={correct}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def beyond_model(dense_correct: int, n: int, threshold: float = BEYOND_MODEL_THRESHOLD) -> bool:
    """True when dense answers fewer than ``threshold`` of the cell's items (``dense_correct / n < threshold``):
    the task is beyond the model there, and a compressed method's score in that cell says little. A cell with
    ``n == 0`` is beyond the model too (nothing shows the model can do it)."""
    if n <= 0:
        return True
    return dense_correct / n < threshold


def threshold_decided(correct: int, n: int, threshold: float = BEYOND_MODEL_THRESHOLD, min_n: int = 10,
                      confidence: float = 0.95) -> bool:
    """True once ``n >= min_n`` items place the cell's accuracy on one side of ``threshold``: the Wilson interval
    (:func:`wilson_interval`) lies entirely below it (beyond the model) or entirely at or above it (within).

    Used to stop measuring a cell of a survey (``benchmarks/dense_models.py``) whose side of the threshold is
    settled, so the CPU time goes to the undecided cells. Stopping on the data makes the interval of a stopped cell
    slightly optimistic; a survey states that it stopped this way. Raises ValueError as :func:`wilson_interval`."""
    if n < max(min_n, 1):
        return False
    low, high = wilson_interval(correct, n, confidence)
    return high < threshold or low >= threshold


# ----------------------------------------------------------------------------------------------------------
# paired comparisons


@dataclass(frozen=True)
class McNemarResult:
    """Paired outcome counts of methods A and B over ``n`` items and the exact two-sided McNemar p-value.

    ``diff`` = accuracy(A) - accuracy(B) = (a_only - b_only) / n (0.0 when n == 0). ``p_value`` =
    ``binomtest(a_only, a_only + b_only, 0.5).pvalue``; 1.0 when there are no discordant pairs."""

    n: int
    both: int
    a_only: int
    b_only: int
    neither: int
    diff: float
    p_value: float

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only


def mcnemar_from_counts(both: int, a_only: int, b_only: int, neither: int) -> McNemarResult:
    """The exact McNemar test from a paired 2x2 table (A right & B right, A only, B only, neither)."""
    counts = (int(both), int(a_only), int(b_only), int(neither))
    if min(counts) < 0:
        raise ValueError(f"McNemar counts must be non-negative, got {counts}")
    both, a_only, b_only, neither = counts
    n = both + a_only + b_only + neither
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    diff = (a_only - b_only) / n if n else 0.0
    return McNemarResult(n=n, both=both, a_only=a_only, b_only=b_only, neither=neither, diff=diff,
                         p_value=min(1.0, p))


def _table(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> tuple[int, int, int, int]:
    a, b = [bool(x) for x in a_correct], [bool(x) for x in b_correct]
    if len(a) != len(b):
        raise ValueError(f"paired results need the same items: {len(a)} vs {len(b)} outcomes")
    both = sum(x and y for x, y in zip(a, b))
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    return both, a_only, b_only, len(a) - both - a_only - b_only


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemarResult:
    """Exact (binomial) two-sided McNemar test of A vs B on the same items, ``a_correct[i]`` / ``b_correct[i]``
    being the outcomes on item i. Under H0 (A and B equally good) each discordant item is A's with probability
    1/2, so ``a_only ~ Binomial(a_only + b_only, 1/2)``."""
    return mcnemar_from_counts(*_table(a_correct, b_correct))


def mcnemar_pooled(pairs_per_cell: Iterable[tuple[Sequence[bool], Sequence[bool]]]) -> McNemarResult:
    """The pooled exact McNemar test over several cells: ``pairs_per_cell`` holds one ``(a_correct, b_correct)``
    pair of paired outcome lists per cell; the concordant / discordant counts are summed over the cells and the
    exact test is run on the summed table. Valid because items are independent and, under H0 (A and B
    exchangeable on every item), each discordant item is A's with probability 1/2 whatever its cell, so the summed
    ``a_only`` is Binomial(total discordant, 1/2); for matched pairs this is also what the Mantel-Haenszel test
    over the cells reduces to. ``diff`` is the accuracy difference over all pooled items."""
    total = [0, 0, 0, 0]
    for a_correct, b_correct in pairs_per_cell:
        for i, c in enumerate(_table(a_correct, b_correct)):
            total[i] += c
    return mcnemar_from_counts(*total)


# ----------------------------------------------------------------------------------------------------------
# fidelity.json rows


@dataclass
class CellResult:
    """One cell of the fidelity grid: how often ``method`` answered ``task`` at ``n_tokens`` / ``depth`` on
    ``model``. ``density`` is the prefill attention density at ``n_tokens``, ``kv_density`` the kept fraction of
    the KV cache; ``ci95`` is the Wilson 95% interval of ``correct / n`` (computed when not given). ``depth`` is
    None for tasks without one (the words tasks)."""

    model: str
    task: str
    n_tokens: int
    depth: float | None
    method: str
    density: float
    kv_density: float
    correct: int
    n: int
    ci95: tuple[float, float] | None = field(default=None)

    def __post_init__(self):
        if self.ci95 is None:
            self.ci95 = wilson_interval(self.correct, self.n, 0.95)
        else:
            self.ci95 = (float(self.ci95[0]), float(self.ci95[1]))

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    def to_row(self) -> dict:
        """The ``fidelity.json`` row ``{model, task, n_tokens, depth, method, density, kv_density, correct, n,
        ci95}`` (ci95 as a two-element list)."""
        return {"model": self.model, "task": self.task, "n_tokens": int(self.n_tokens),
                "depth": None if self.depth is None else float(self.depth), "method": self.method,
                "density": float(self.density), "kv_density": float(self.kv_density), "correct": int(self.correct),
                "n": int(self.n), "ci95": [float(self.ci95[0]), float(self.ci95[1])]}


@dataclass(frozen=True)
class Comparison:
    """A plan vs a baseline (e.g. the uniform sink+window plan at the same density) over ``cells`` cells pooled
    along ``axis`` (a label such as ``"all"``, ``"task=niah_single"`` or ``"n_tokens=4096"``): the accuracy
    difference plan - baseline and the pooled exact McNemar p-value."""

    plan: str
    baseline: str
    axis: str
    cells: int
    diff: float
    p_value: float
    scope: str = "pooled"
    n: int = 0

    @classmethod
    def from_pairs(cls, plan: str, baseline: str, axis: str,
                   pairs_per_cell: Sequence[tuple[Sequence[bool], Sequence[bool]]], scope: str = "pooled") -> Comparison:
        """``pairs_per_cell``: per cell, (plan outcomes, baseline outcomes) on the same items; ``axis`` is the cost
        axis held fixed (prefill_density, kv_density, latency, or none for dense); ``scope`` which cells are pooled."""
        pairs = list(pairs_per_cell)
        r = mcnemar_pooled(pairs)
        return cls(plan=plan, baseline=baseline, axis=axis, cells=len(pairs), diff=r.diff, p_value=r.p_value,
                   scope=scope, n=r.n)

    def to_row(self) -> dict:
        """The ``fidelity.json`` row ``{plan, baseline, axis, cells, diff, p_value}`` (+ ``scope``, ``n`` items)."""
        return {"plan": self.plan, "baseline": self.baseline, "axis": self.axis, "cells": int(self.cells),
                "diff": float(self.diff), "p_value": float(self.p_value), "scope": self.scope, "n": int(self.n)}
