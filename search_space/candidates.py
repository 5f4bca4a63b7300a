"""Candidate head configs: MoA's elastic (alpha, beta) grid, a block-multiple grid, and dense.

A candidate is one pattern a head may take; its span at input length N follows :mod:`plans.span`
(``span(N) = clamp(alpha + beta*N)``, sink inside the span). Grids keep only candidates whose span is larger
than the sink at every target length (so the window keeps at least one token beyond the sink and the
profile's masked loss is defined), and always start with ``dense``.

    >>> g = moa_grid([2048, 4096, 8192], extra_lengths=[12288, 16384])
    >>> len([c for c in g if c.kind == "sink_window"])
    48
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np

from plans.defaults import DEFAULT_BLOCK, DEFAULT_SINK
from plans.errors import CompressError
from plans.schema import DensePattern, SinkWindowPattern
from plans.span import span_at


@dataclass(frozen=True)
class Candidate:
    """One head config the search may assign. ``kind="dense"`` ignores the other fields (span(N) = N).

    The plan-side model of the same thing is :class:`plans.schema.SinkWindowPattern` (or ``DensePattern``);
    :meth:`to_pattern` is the one conversion, made once per head when the plan is written. The search keeps its
    own lightweight candidate because it needs something else from it: a frozen, hashable value that grids of
    hundreds can build, sort and dedupe cheaply (no validation per candidate), whose :meth:`span` is capped by the
    input length n (the kept keys the search costs at length n) where the pattern's run-time span is not, and
    with no ``min_span`` until the plan's shortest target length is known (``to_pattern(floor_length=...)``).
    """

    kind: Literal["dense", "sink_window"] = "sink_window"
    sink: int = 0
    alpha: float = 0.0
    beta: float = 0.0
    block: int = 1

    def span(self, n: int) -> int:
        """Keys kept per query over an input of length n (sink included): ``min(span, n)``; n for dense.

        The search costs a candidate at a given input length, so the kept count is capped by n here; the plan's
        run-time span (:func:`plans.span.span_at`) is not."""
        if self.kind == "dense":
            return int(n)
        return min(int(n), span_at(self.alpha, self.beta, n, block=self.block))

    def raw_span(self, n: int) -> float:
        return float(n) if self.kind == "dense" else self.alpha + self.beta * n

    def to_pattern(self, block: int | None = None, floor_length: int | None = None) -> DensePattern | SinkWindowPattern:
        """The plan pattern (plans.schema) for this candidate; ``block`` overrides the candidate's rounding.

        ``floor_length``: the shortest length the plan targets. The rule ``alpha + beta*N`` was chosen for lengths
        from there up; below it the head keeps its span at that length (``min_span``), so a short prompt is never
        served by a span the search did not choose (a negative alpha would otherwise give a span of 1 at N = 37).
        At every length >= floor_length the spans are unchanged (beta >= 0)."""
        if self.kind == "dense":
            return DensePattern()
        alpha = float(self.alpha)
        blk = int(block if block is not None else self.block)
        min_span = None
        if floor_length is not None:
            min_span = span_at(self.alpha, self.beta, int(floor_length), block=blk)
        return SinkWindowPattern(
            sink=int(self.sink), alpha=int(alpha) if alpha.is_integer() else alpha, beta=float(self.beta),
            block=blk, min_span=min_span,
        )

    @property
    def label(self) -> str:
        if self.kind == "dense":
            return "dense"
        return f"s{self.sink}:{self.alpha:g}+{self.beta:g}N"


DENSE = Candidate(kind="dense")


def _valid(c: Candidate, lengths: Iterable[int]) -> bool:
    """span > sink (and raw span > sink, so block rounding never hides a negative rule) at every length."""
    for n in lengths:
        if c.raw_span(n) <= c.sink or c.span(n) <= c.sink:
            return False
    return True


def _sorted_unique(cands: list[Candidate], lengths: Sequence[int]) -> list[Candidate]:
    n_max = max(lengths)
    seen, out = set(), []
    for c in sorted(cands, key=lambda c: (c.span(n_max), c.sink, c.beta, c.alpha)):
        key = (c.kind, c.sink, c.alpha, c.beta, c.block)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def moa_grid(
    profile_lengths: Sequence[int],
    extra_lengths: Sequence[int] = (),
    block: int = DEFAULT_BLOCK,
    sinks: Sequence[int] = (DEFAULT_SINK,),
    n_betas: int = 9,
    include_dense: bool = True,
) -> list[Candidate]:
    """MoA's ``prepare_config`` grid (anchors §1.5), for each sink size, plus ``dense`` first.

    ``alpha = linspace(-min_len, max_profile, (max_profile + min_len)//1024 + 1)``, ``beta = linspace(0, 1, n_betas)``,
    kept iff ``alpha + beta*max_profile <= max_profile``, ``alpha + beta*max_len <= max_len`` and
    ``alpha + beta*min_len > 0`` (min/max over profile and extra lengths), and (ours) span > sink at every length.
    """
    if not profile_lengths:
        raise CompressError("moa_grid: no profile lengths")
    all_lengths = sorted(set(int(n) for n in [*profile_lengths, *extra_lengths]))
    max_profile = max(profile_lengths)
    min_len, max_len = all_lengths[0], all_lengths[-1]
    alphas = np.linspace(-min_len, max_profile, (max_profile + min_len) // 1024 + 1)
    betas = np.linspace(0, 1, n_betas)
    out: list[Candidate] = []
    for sink in sinks:
        for a in alphas:
            for b in betas:
                a_, b_ = float(a), float(b)
                if a_ + b_ * max_profile <= max_profile and a_ + b_ * max_len <= max_len and a_ + b_ * min_len > 0:
                    c = Candidate("sink_window", int(sink), a_, b_, int(block))
                    if _valid(c, all_lengths):
                        out.append(c)
    out = _sorted_unique(out, all_lengths)
    return ([DENSE] if include_dense else []) + out


def block_grid(
    lengths: Sequence[int],
    block: int = DEFAULT_BLOCK,
    sinks: Sequence[int] = (DEFAULT_SINK,),
    betas: Sequence[float] = tuple(np.linspace(0, 1, 9)),
    alpha_step: int | None = None,
    include_dense: bool = True,
) -> list[Candidate]:
    """A grid for any length range: alphas are multiples of ``block`` (negative allowed) from -min_len to max_len.

    ``alpha_step`` defaults to about max_len/16 rounded up to a block multiple. Kept iff 0 < span <= N and
    span > sink at every length, and the rule does not exceed N at any length (a wider one equals dense there).
    """
    if not lengths:
        raise CompressError("block_grid: no lengths")
    lengths = sorted(set(int(n) for n in lengths))
    n_min, n_max = lengths[0], lengths[-1]
    step = alpha_step or max(block, math.ceil(n_max / 16 / block) * block)
    if step % block:
        raise CompressError(f"block_grid: alpha_step {step} is not a multiple of block {block}")
    lo = -(n_min // step) * step
    alphas = list(range(lo, n_max + 1, step))
    out: list[Candidate] = []
    for sink in sinks:
        for a in alphas:
            for b in betas:
                b = float(b)
                if any(a + b * n > n for n in lengths):
                    continue
                c = Candidate("sink_window", int(sink), float(a), b, int(block))
                if _valid(c, lengths):
                    out.append(c)
    out = _sorted_unique(out, lengths)
    return ([DENSE] if include_dense else []) + out


def dedupe_by_spans(cands: Sequence[Candidate], lengths: Sequence[int]) -> list[Candidate]:
    """Keep one candidate per (kind, sink, spans at every length); the first one wins (order is kept).

    Candidates with the same spans at every target length are interchangeable for the solver.
    """
    seen, out = set(), []
    for c in cands:
        key = (c.kind, c.sink if c.kind != "dense" else 0, tuple(c.span(n) for n in lengths))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def candidate_grid(
    profile_lengths: Sequence[int],
    extra_lengths: Sequence[int] = (),
    *,
    block: int = DEFAULT_BLOCK,
    sinks: Sequence[int] = (DEFAULT_SINK,),
    grid: Literal["auto", "moa", "block"] | Sequence[Candidate] = "auto",
    min_candidates: int = 16,
) -> list[Candidate]:
    """The grid ``search`` uses: MoA's when it is rich enough (``auto``, long profiles), else a block grid;
    or ``grid`` itself when it is a list of candidates (kept iff valid at every length with one of ``sinks``).

    Candidates with identical spans at every target length are merged (the first, MoA-ordered, stays).
    """
    lengths = sorted(set([*profile_lengths, *extra_lengths]))
    if not isinstance(grid, str):  # a custom list of candidates: filter it like the built-in grids
        cands = [c for c in grid if c.kind == "dense" or (c.sink in sinks and _valid(c, lengths))]
        if DENSE not in cands:
            cands = [DENSE] + cands
        cands = dedupe_by_spans(cands, lengths)
        if len(cands) <= 1:
            raise CompressError(f"none of the given candidates fits lengths {lengths} with sinks {list(sinks)}")
        return cands
    if grid not in ("auto", "moa", "block"):
        raise CompressError(f"unknown grid {grid!r}: use auto, moa or block")
    cands: list[Candidate] = []
    if grid in ("auto", "moa"):
        cands = moa_grid(profile_lengths, extra_lengths, block=block, sinks=sinks)
    if grid == "block" or (grid == "auto" and len(cands) - 1 < min_candidates * len(sinks)):
        cands = block_grid(lengths, block=block, sinks=sinks)
    cands = dedupe_by_spans(cands, lengths)
    if len(cands) <= 1:
        raise CompressError(
            f"no sink+window candidate fits lengths {lengths} with sinks {list(sinks)} (span must exceed the sink)"
        )
    return cands
