"""The search stage's arguments: what `compress search` (and `compress run`) hand to
:func:`search_space.search.search`, with their defaults in one place. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from search_space.candidates import Candidate
    from search_space.costs import LatencyTable


@dataclass(frozen=True)
class SearchArgs:
    """How a plan is searched (see :func:`search`).

    ``granularity``: kv_head | query_head; ``K``: at most K distinct configs per layer; ``sinks``: sink choices
    (None: the profiled sink sizes); ``lengths``: target lengths where the budgets hold (None: the profiled
    lengths); ``solver``: milp (HiGHS) | greedy; ``time_limit``: seconds per MILP; ``latency_table``: a measured
    :class:`search_space.costs.LatencyTable` (or its JSON file) for ``latency@`` budgets; ``trials`` > 0 runs the
    Optuna study (:func:`search_space.study.run_study`) with ``seed``, ``storage`` (an Optuna RDB URL), ``study_name``
    and ``resume``; ``grid``: the candidate grid ("auto" or candidates); ``normalize``: "layer" rescales each layer's
    influence to sum 1 (:func:`profilers.profile_format.normalize_profile`), "none" uses the raw first-order
    influence; ``lower_fraction``, ``objective_weights``: see :func:`search_space.problem.solve_problem`;
    ``keep_dense``: (layer, KV head) pairs kept dense (e.g. the top retrieval heads,
    :func:`search_space.keep_dense.force_dense`), the rest solved around them."""

    granularity: str = "kv_head"
    K: int = 2
    sinks: tuple[int, ...] | None = None
    lengths: tuple[int, ...] | None = None
    solver: str = "milp"
    time_limit: float = 60.0
    latency_table: "LatencyTable | str | Path | None" = None
    trials: int = 0
    seed: int = 0
    storage: str | None = None
    study_name: str | None = None
    resume: bool = False
    grid: "str | Sequence[Candidate]" = "auto"
    normalize: str = "layer"
    lower_fraction: float = 0.9
    objective_weights: dict | None = None
    keep_dense: tuple[tuple[int, int], ...] = ()


__all__ = ["SearchArgs"]
