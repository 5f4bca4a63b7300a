"""Operator selection from gates (MPCViT's discretisation, DuoAttention's thresholding) and operator cost entries.

    prof = load_profile("out/gates")                   # compressor.gate_profile.run_gates(..., pair="softmax_vs_linear")
    plan = select_operators(prof, 0.25)                # top 25% of heads by gate keep softmax, the rest go linear
    plan = select_operators(prof, cost_budget=0.4, length=4096)   # or: total cost <= 40% of all-softmax at N=4096

Every head is ranked by its gate (all layers together, as MPCViT; ties by position); the top heads keep the
expensive operator (dense softmax) and the rest get the pair's cheap one:

=====================  ===================================================================
pair                   cheap pattern
=====================  ===================================================================
``full_vs_window``     ``SinkWindowPattern(sink, alpha=span)`` (the gates' window)
``softmax_vs_relu``    ``DensePattern(operator="relu_softmax")``
``softmax_vs_linear``  ``LinearPattern()``
=====================  ===================================================================

Costs (:data:`OPERATOR_COSTS`) are analytic cost entries: multiply-adds of ONE query head's causal prefill at
length N with head dim D -- ``2 D x kept_entries`` for softmax-type operators (QK^T and PV over the kept
entries; dense kept = N(N+1)/2, sink_window kept = :func:`plans.span.kept_entries`), the same for relu_softmax,
and ``2 N D^2 + 2 D x N (C + 1) / 2`` for linear attention (state update and read-out, plus the intra-chunk
causal part with C = attention_kernels.cheap_operators.DEFAULT_CHUNK rows). :func:`measure_operator_costs` times the real
operators on this device instead and returns ``{operator: {N: ms}}`` (usable as ``cost_table``).
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.schema import COST_KINDS, DensePattern, LayerPlan, LinearPattern, Plan, Predictions, SinkWindowPattern
from plans.span import kept_entries
from profilers.gates import DEFAULT_WINDOW, PAIRS

OPERATORS = COST_KINDS  # the cost-entry vocabulary (plans.schema.COST_KINDS): softmax, sink_window, relu_softmax, linear
CHEAP_PATTERN_OF_PAIR = dict(zip(PAIRS, ("sink_window", "relu_softmax", "linear")))  # the cheap side of each gate pair


# ------------------------------------------------------------------------------------------------ cost entries
def _chunk() -> int:
    from attention_kernels.cheap_operators import DEFAULT_CHUNK

    return DEFAULT_CHUNK


def _softmax_cost(n: int, head_dim: int, span: int | None = None) -> float:
    return 2.0 * head_dim * kept_entries(n, n)


def _window_cost(n: int, head_dim: int, span: int | None = None) -> float:
    return 2.0 * head_dim * kept_entries(n if span is None else min(int(span), n), n)


def _linear_cost(n: int, head_dim: int, span: int | None = None) -> float:
    c = min(_chunk(), n)
    return 2.0 * n * head_dim * head_dim + 2.0 * head_dim * n * (c + 1) / 2


OPERATOR_COSTS: dict[str, Callable[..., float]] = {
    "softmax": _softmax_cost,  # dense causal softmax: 2 D * N(N+1)/2
    "sink_window": _window_cost,  # softmax over sink + window: 2 D * kept_entries(span, N)
    "relu_softmax": _window_cost,  # same key set and work as softmax (span=None: dense)
    "linear": _linear_cost,  # 2 N D^2 + intra-chunk 2 D N (C+1)/2
}
"""Cost entries: ``OPERATOR_COSTS[op](N, head_dim, span=None)`` -> multiply-adds of one query head's prefill."""


def _table_ms(row: dict, n: int) -> float:
    """ms at length n from a measured row {N: ms}: linear inside, power law (last two points) outside."""
    xs = sorted(int(x) for x in row)
    ys = [float(row[x] if x in row else row[str(x)]) for x in xs]
    if n in xs:
        return ys[xs.index(n)]
    if len(xs) == 1:
        return ys[0] * n / xs[0]
    if xs[0] < n < xs[-1]:
        return float(np.interp(n, xs, ys))
    (x0, y0), (x1, y1) = ((xs[0], ys[0]), (xs[1], ys[1])) if n < xs[0] else ((xs[-2], ys[-2]), (xs[-1], ys[-1]))
    if y0 <= 0 or y1 <= 0:
        return max(0.0, y1 * n / x1)
    p = math.log(y1 / y0) / math.log(x1 / x0)
    return y1 * (n / x1) ** p


def operator_cost(op: str, n: int, head_dim: int, span: int | None = None, cost_table: dict | None = None) -> float:
    """Cost of one query head running ``op`` at length n: the analytic entry, or measured ms from ``cost_table``
    ({op: {N: ms}}, see :func:`measure_operator_costs`; sink_window rows are taken as measured at the same span)."""
    if op not in OPERATOR_COSTS:
        raise CompressError(f"unknown operator {op!r} (known: {', '.join(OPERATORS)})")
    if cost_table is not None:
        if op not in cost_table or not cost_table[op]:
            raise CompressError(f"cost table has no row for operator {op!r}")
        return _table_ms(cost_table[op], int(n))
    return float(OPERATOR_COSTS[op](int(n), int(head_dim), span))


def pattern_operator(pattern) -> tuple[str, int | None]:
    """(cost entry name, span or None) of a plan head pattern; span is evaluated by the caller at N."""
    if isinstance(pattern, LinearPattern):
        return "linear", None
    if isinstance(pattern, DensePattern):
        return ("softmax" if pattern.operator == "softmax" else "relu_softmax"), None
    return ("sink_window" if pattern.operator == "softmax" else "relu_softmax"), -1


def pattern_cost(pattern, n: int, head_dim: int, cost_table: dict | None = None) -> float:
    """Cost of one query head following ``pattern`` at input length n."""
    op, span = pattern_operator(pattern)
    if span is not None:
        span = pattern.span(n)
    return operator_cost(op, n, head_dim, span, cost_table)


def plan_cost(plan: Plan, n: int, cost_table: dict | None = None) -> float:
    """Summed cost of every query head of ``plan`` at length n (+ plan.length_offset)."""
    nr = n + plan.length_offset
    return sum(pattern_cost(plan.pattern(li, h), nr, plan.model.head_dim, cost_table)
               for li in range(plan.model.num_layers) for h in range(plan.model.num_heads))


# ------------------------------------------------------------------------------------------------ selection
def _gates_of(source, granularity: str | None, identity: ModelIdentity | None, pair, window):
    """(gates [L, H] for the target granularity, identity, granularity, pair, window, lengths)."""
    lengths: list[int] = []
    if hasattr(source, "meta") and hasattr(source, "tensors"):  # a Profile
        from profilers.gates import profile_gates

        g = profile_gates(source)
        identity = identity or source.meta.model
        pair = pair or g["pair"]
        window = window or g["window"]
        granularity = granularity or g["granularity"]
        lengths = list(source.meta.lengths)
        gates = g["kv"] if granularity == "kv_head" else g["q"]
        return torch.as_tensor(gates, dtype=torch.float64), identity, granularity, pair, tuple(window), lengths
    if isinstance(source, dict):
        identity = identity or source.get("identity")
        pair = pair or source.get("pair")
        window = window or source.get("window")
        granularity = granularity or source.get("granularity", "kv_head")
        gates = source["kv"] if granularity == "kv_head" else source["q"]
        source = torch.as_tensor(gates)
    if identity is None:
        raise CompressError("select_operators: gates given as a tensor need the model identity")
    g = torch.as_tensor(source, dtype=torch.float64)
    granularity = granularity or "kv_head"
    L, Hq, Hkv = identity.num_layers, identity.num_heads, identity.num_kv_heads
    if g.ndim != 2 or g.shape[0] != L or g.shape[1] not in (Hq, Hkv):
        raise CompressError(f"gates have shape {tuple(g.shape)}, expected [{L}, {Hkv} or {Hq}]")
    if granularity == "kv_head" and g.shape[1] == Hq and Hq != Hkv:
        g = g.view(L, Hkv, Hq // Hkv).amax(-1)
    elif granularity == "query_head" and g.shape[1] == Hkv and Hq != Hkv:
        g = g.repeat_interleave(Hq // Hkv, dim=1)
    return g, identity, granularity, pair or "full_vs_window", tuple(window or DEFAULT_WINDOW), lengths


def cheap_pattern(pair: str, window=DEFAULT_WINDOW):
    """The cheap head pattern of a gates pair."""
    if pair == "full_vs_window":
        return SinkWindowPattern(sink=int(window[0]), alpha=float(window[1]), beta=0.0)
    if pair == "softmax_vs_relu":
        return DensePattern(operator="relu_softmax")
    if pair == "softmax_vs_linear":
        return LinearPattern()
    raise CompressError(f"unknown gate pair {pair!r} (choose from {', '.join(CHEAP_PATTERN_OF_PAIR)})")


@dataclass(frozen=True)
class GateInfo:
    """What a gates source may not say itself, for :func:`select_operators`; a field given here overrides the
    source's own.

    ``identity``: the model the gates were profiled on (needed for a gates tensor). ``pair``: the gates pair
    (:data:`CHEAP_PATTERN_OF_PAIR`; default ``full_vs_window``). ``window``: (sink, window) tokens of the cheap
    sink+window pattern (default :data:`DEFAULT_WINDOW`).
    """

    identity: ModelIdentity | None = None
    pair: str | None = None
    window: tuple[int, int] | None = None


def select_operators(
    source,
    expensive_fraction: float | None = None,
    *,
    cost_budget: float | None = None,
    length: int | None = None,
    cost_table: dict | None = None,
    granularity: str | None = None,
    info: GateInfo = GateInfo(),
) -> Plan:
    """Plan keeping the highest-gate heads on dense softmax and giving the rest the pair's cheap operator.

    ``source``: a gates Profile (:func:`compressor.gate_profile.run_gates`), the dict of
    :func:`profilers.gates.profile_gates` (plus ``info.identity``), or a gates tensor [L, Hkv or Hq] (pass
    ``info`` with identity, pair, window). Exactly one budget:

    * ``expensive_fraction`` in [0, 1]: round(fraction x heads) decision heads stay expensive (MPCViT's mu);
    * ``cost_budget`` in (0, 1]: greedily by gate, as many expensive heads as keep the plan's total cost at
      ``length`` (default: the largest profiled length) <= budget x the all-dense cost, using the analytic
      :data:`OPERATOR_COSTS` or the measured ``cost_table``.

    ``granularity`` defaults to the gates' own (KV gates for query heads repeat; query gates for KV heads take
    the group maximum)."""
    if (expensive_fraction is None) == (cost_budget is None):
        raise CompressError("select_operators: give exactly one of expensive_fraction and cost_budget")
    gates, ident, gran, pair, window, lengths = _gates_of(source, granularity, info.identity, info.pair, info.window)
    if gran not in ("kv_head", "query_head"):
        raise CompressError(f"granularity must be kv_head or query_head, got {gran!r}")
    cheap = cheap_pattern(pair, window)
    dense = DensePattern()
    L, H = gates.shape
    total = L * H
    flat = gates.reshape(-1)
    order = sorted(range(total), key=lambda i: (-float(flat[i]), i))  # by gate, ties by position
    per_head = 1 if gran == "query_head" else ident.group_size  # query heads per decision head
    n = int(length or (max(lengths) if lengths else 4096))
    solver: dict = {"method": "gates", "pair": pair, "granularity": gran, "total_heads": total}
    if expensive_fraction is not None:
        if not 0.0 <= expensive_fraction <= 1.0:
            raise CompressError(f"expensive_fraction must be in [0, 1], got {expensive_fraction}")
        k = int(math.floor(expensive_fraction * total + 0.5))
        keep = set(order[:k])
        solver.update(budget="expensive_fraction", expensive_fraction=float(expensive_fraction))
    else:
        if not 0.0 < cost_budget <= 1.0:
            raise CompressError(f"cost_budget must be in (0, 1] (a fraction of the all-dense cost), got {cost_budget}")
        ce = per_head * pattern_cost(dense, n, ident.head_dim, cost_table)
        cc = per_head * pattern_cost(cheap, n, ident.head_dim, cost_table)
        limit = cost_budget * total * ce
        spent = total * cc
        if spent > limit + 1e-9 * limit:
            raise CompressError(
                f"cost_budget {cost_budget:g} is below the all-{CHEAP_PATTERN_OF_PAIR[pair]} cost "
                f"({spent / (total * ce):.4g} of dense at N={n})")
        keep = set()
        for i in order:
            if spent + (ce - cc) <= limit * (1 + 1e-12):
                keep.add(i)
                spent += ce - cc
        solver.update(budget="cost_budget", cost_budget=float(cost_budget), length=n,
                      cost_units="ms" if cost_table is not None else "multiply-adds")
    layers = [LayerPlan(heads=[dense if li * H + h in keep else cheap for h in range(H)]) for li in range(L)]
    kept_gates = [float(flat[i]) for i in keep]
    solver.update(expensive_heads=len(keep), threshold=min(kept_gates) if kept_gates else None)
    plan = Plan(model=ident, granularity=gran, source="gates", lengths=sorted(set(lengths) | {n}) if lengths else [n],
                layers=layers, predicted=Predictions(solver=solver))
    plan.predicted.solver["relative_cost"] = {
        m: plan_cost(plan, m, cost_table) / (L * ident.num_heads * pattern_cost(dense, m, ident.head_dim, cost_table))
        for m in plan.lengths
    }
    return plan


# ------------------------------------------------------------------------------------------------ measurement
def _sync(device) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_operator_costs(
    lengths: Sequence[int] = (1024, 2048),
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    *,
    device: str = "cpu",
    window: tuple[int, int] = DEFAULT_WINDOW,
    operators: Sequence[str] = OPERATORS,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, dict[int, float]]:
    """Median ms (after one warm-up) of ONE query head's causal prefill for each operator at each length:
    ``softmax`` and ``sink_window`` (``window=(sink, span)``) through attention_kernels.dispatch.sparse_attention (the
    reference when dispatch is missing), ``relu_softmax`` and ``linear`` through attention_kernels.cheap_operators.
    Returns ``{operator: {N: ms}}`` (a ``cost_table`` for :func:`select_operators`)."""
    from attention_kernels.cheap_operators import linear_attention, relu_softmax_attention

    try:
        from attention_kernels.dispatch import sparse_attention
    except ImportError:  # pragma: no cover - dispatch is part of the tree
        from attention_kernels.reference import reference_attention as sparse_attention
    for op in operators:
        if op not in OPERATORS:
            raise CompressError(f"unknown operator {op!r} (known: {', '.join(OPERATORS)})")
    gen = torch.Generator().manual_seed(seed)
    scale = head_dim ** -0.5
    out: dict[str, dict[int, float]] = {op: {} for op in operators}
    for n in lengths:
        n = int(n)
        q, k, v = (torch.randn(1, 1, n, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
        sink, span = int(window[0]), min(int(window[1]), n)
        calls = {
            "softmax": lambda: sparse_attention(q, k, v, torch.tensor([0], device=device),
                                                torch.tensor([n], device=device), scale),
            "sink_window": lambda: sparse_attention(q, k, v, torch.tensor([min(sink, span - 1)], device=device),
                                                    torch.tensor([span], device=device), scale),
            "relu_softmax": lambda: relu_softmax_attention(q, k, v, None, scale),
            "linear": lambda: linear_attention(q, k, v, scale),
        }
        for op in operators:
            times = []
            with torch.no_grad():
                for r in range(repeats + 1):
                    _sync(device)
                    t0 = time.perf_counter()
                    calls[op]()
                    _sync(device)
                    if r:
                        times.append((time.perf_counter() - t0) * 1e3)
            out[op][n] = float(np.median(times))
    return out


def measurement_info(device: str = "cpu") -> str:
    """A short description of where :func:`measure_operator_costs` ran (for a bench table's caption)."""
    if device != "cpu":
        return str(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


__all__ = [
    "OPERATOR_COSTS", "OPERATORS", "operator_cost", "pattern_cost", "plan_cost", "cheap_pattern",
    "GateInfo", "select_operators", "measure_operator_costs", "measurement_info",
]
