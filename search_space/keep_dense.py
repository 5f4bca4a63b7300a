"""The DuoAttention plan shape inside the search: a set of KV heads kept dense, the rest chosen by the solver.

DuoAttention (Xiao et al. 2024) keeps retrieval heads at full KV and gives streaming heads a sink + recent window.
Here the heads to keep dense come from a ranking (retrieval scores, :mod:`profilers.retrieval`), and

* :func:`force_dense` makes them dense in a built :class:`~search_space.problem.SearchProblem` (every other
  candidate of a kept head gets a loss larger than any whole assignment's, so the MILP/greedy solvers never choose it; the budget rows
  and the K-per-layer limit are untouched, so the rest is solved exactly as before, around them);
* :func:`keep_dense_plan` builds the plain shape (kept heads dense, every other head one sink + window span);
* :func:`largest_keep_dense` is the largest k for which that plain shape meets every density / KV-density budget
  at every target length: the solver is then guaranteed a feasible point with those k heads dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from plans.defaults import DEFAULT_SINK
from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.schema import Budget, DensePattern, LayerPlan, Plan, SinkWindowPattern
from search_space.budgets import expand_budgets
from search_space.problem import SearchProblem

FORBIDDEN_FACTOR = 1e3  # a forbidden candidate's loss: this times (1 + the largest total loss any assignment has)


def decision_heads(problem: SearchProblem, kv_heads: Sequence[tuple[int, int]]) -> np.ndarray:
    """Decision-head indices of the given (layer, KV head) pairs (every query head of the group at query_head
    granularity). Raises CompressError for a pair outside the model."""
    heads_kv = problem.heads // problem.group_size if problem.granularity == "query_head" else problem.heads
    out = []
    for layer, h in kv_heads:
        if not (0 <= layer < problem.n_layers and 0 <= h < heads_kv):
            raise CompressError(f"kept-dense head (layer {layer}, KV head {h}) is outside the model "
                                f"({problem.n_layers} layers x {heads_kv} KV heads)")
        if problem.granularity == "query_head":
            g = problem.group_size
            out.extend(layer * problem.heads + h * g + j for j in range(g))
        else:
            out.append(layer * problem.heads + h)
    return np.array(sorted(set(out)), dtype=np.int64)


def force_dense(problem: SearchProblem, kv_heads: Sequence[tuple[int, int]]) -> SearchProblem:
    """A copy of ``problem`` in which the given KV heads can only take the dense candidate.

    Raises CompressError when the candidate list has no dense candidate."""
    dense = [i for i, c in enumerate(problem.candidates) if c.kind == "dense"]
    if not dense:
        raise CompressError("the candidate grid has no dense candidate; cannot keep heads dense")
    idx = decision_heads(problem, kv_heads)
    loss = {}
    for n, m in problem.loss.items():
        m = m.copy()
        if len(idx):  # finite and moderate: HiGHS loses precision with huge objective coefficients
            forbidden = FORBIDDEN_FACTOR * (1.0 + float(m.max(axis=1).sum()))
            keep = m[idx, dense[0]].copy()
            m[idx, :] = forbidden
            m[idx, dense[0]] = keep
        loss[n] = m
    return dataclasses.replace(problem, loss=loss)


def check_kept_dense(plan: Plan, kv_heads: Sequence[tuple[int, int]]) -> None:
    """Raise CompressError unless every kept (layer, KV head) is dense in ``plan`` (every query head of the group at
    query_head granularity). A solver cannot keep them dense when that leaves no feasible assignment under the
    budgets: it then trades the penalty of :func:`force_dense` for feasibility."""
    g = plan.model.num_heads // plan.model.num_kv_heads if plan.granularity == "query_head" else 1
    bad = [(layer, h) for layer, h in kv_heads
           if any(plan.layers[layer].heads[h * g + j].kind != "dense" for j in range(g))]
    if bad:
        raise CompressError(f"{len(bad)} of the {len(kv_heads)} heads to keep dense cannot stay dense under the "
                            "budgets; keep fewer heads dense or raise the budgets")


def keep_dense_plan(identity: ModelIdentity, kv_heads: Sequence[tuple[int, int]], span: int | Sequence[int],
                    sink: int = DEFAULT_SINK, lengths: Sequence[int] = ()) -> Plan:
    """KV-head plan: the given (layer, KV head) pairs dense, every other head ``sink`` + window, ``span`` in all
    (one span for every layer, or one per layer). Raises CompressError for a span < 2, a sink outside
    [0, span) or a per-layer list of the wrong length."""
    spans = [int(span)] * identity.num_layers if isinstance(span, (int, np.integer)) else [int(x) for x in span]
    if len(spans) != identity.num_layers:
        raise CompressError(f"keep_dense_plan: {len(spans)} spans for {identity.num_layers} layers")
    for w in spans:
        if w < 2 or sink < 0 or sink >= w:
            raise CompressError(f"keep_dense_plan: need span >= 2 and 0 <= sink < span, got span {w}, sink {sink}")
    kept = set(map(tuple, kv_heads))
    layers = [LayerPlan(heads=[DensePattern() if (li, h) in kept else SinkWindowPattern(sink=sink, alpha=spans[li],
                                                                                        beta=0.0)
                               for h in range(identity.num_kv_heads)])
              for li in range(identity.num_layers)]
    return Plan(model=identity, granularity="kv_head", source="retrieval", lengths=list(lengths), layers=layers)


def meets(plan: Plan, budgets: Sequence[Budget], lengths: Sequence[int]) -> bool:
    """Whether ``plan`` meets every density / KV-density budget at its lengths (latency budgets: CompressError)."""
    for b, n in expand_budgets(budgets, lengths):
        if b.kind == "density":
            value = plan.density(n)
        elif b.kind == "kv_density":
            value = plan.kv_density(n)
        else:
            raise CompressError(f"keeping heads dense by rank supports density and KV-density budgets, not {b.kind}")
        if value > b.value + 1e-9:
            return False
    return True


def largest_keep_dense(identity: ModelIdentity, ranked: Sequence[tuple[int, int]], budgets: Sequence[Budget],
                       lengths: Sequence[int], span: int | Sequence[int], sink: int = DEFAULT_SINK) -> int:
    """The largest k such that ``keep_dense_plan(ranked[:k], span, sink)`` meets every budget at every length
    (0 when even the all-local plan does not; the density of the shape grows with k, so bisection is exact)."""
    lo, hi = 0, len(ranked)
    if not meets(keep_dense_plan(identity, [], span, sink, lengths), budgets, lengths):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if meets(keep_dense_plan(identity, ranked[:mid], span, sink, lengths), budgets, lengths):
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_keep_dense_plan(identity: ModelIdentity, ranked: Sequence[tuple[int, int]], budgets: Sequence[Budget],
                        lengths: Sequence[int], span: int | Sequence[int], sink: int = DEFAULT_SINK) -> Plan:
    """:func:`keep_dense_plan` with the first :func:`largest_keep_dense` heads of ``ranked`` dense and ``budgets``
    recorded. Raises CompressError when even no dense head meets the budgets (the local span is too wide)."""
    k = largest_keep_dense(identity, ranked, budgets, lengths, span, sink)
    plan = keep_dense_plan(identity, ranked[:k], span, sink, lengths)
    if not meets(plan, budgets, lengths):
        raise CompressError(f"even with no head dense, span {span} exceeds the budgets at lengths {list(lengths)}; "
                            "lower --local-span or raise the budget")
    plan.budgets = list(budgets)
    return plan
