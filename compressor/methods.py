"""The methods every comparison runs on identical items: dense, each plan, and StreamingLLM's uniform sink + window
plan matched to each plan at equal cost — one list for `compress eval`, `compress run`, `compress bench` and the
fidelity benchmarks.

    for m in methods_at({"0.25": plan}, 4096, axes=("prefill_density",)):
        with plan_applied(model, m.plan):   # None: dense
            ...

Equal cost at the cell's length N, on one axis the row names:

* ``prefill_density``: the uniform span whose prefill density equals the plan's (:func:`plans.schema.span_for_density`);
* ``kv_density``: the uniform span whose kept KV tokens ÷ N equal the plan's KV density (``round(kv_density · N)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from plans.defaults import DEFAULT_SINK
from plans.errors import CompressError
from plans.schema import Plan, span_for_density, uniform_plan

AXES = ("prefill_density", "kv_density")


@dataclass(frozen=True)
class Method:
    """One row of a comparison: dense (``plan`` None), a plan, or a uniform baseline matched to plan ``of`` on
    ``axis``."""

    name: str
    plan: Plan | None
    axis: str | None = None
    of: str | None = None


def uniform_matched(plan: Plan, n: int, axis: str) -> Plan:
    """StreamingLLM's uniform plan matched to ``plan`` at length ``n`` on ``axis`` (prefill_density | kv_density).
    The sink is the plan's largest sink (:data:`plans.defaults.DEFAULT_SINK` when it has none), at most span − 1
    so the window keeps at least one token. Raises CompressError for an unknown axis."""
    sinks = [h.sink_tokens for layer in plan.layers for h in layer.heads if h.sink_tokens] or [DEFAULT_SINK]
    if axis == "prefill_density":
        span = span_for_density(plan.density(n), n)
    elif axis == "kv_density":
        span = max(1, min(n, round(plan.kv_density(n) * n)))
    else:
        raise CompressError(f"unknown cost axis {axis!r} (one of {', '.join(AXES)})")
    return uniform_plan(plan.model, span, sink=min(max(sinks), max(span - 1, 0)), lengths=[n])


def uniform_label(name: str, n_plans: int, axis: str | None = None) -> str:
    """The name of plan ``name``'s uniform baseline: ``uniform`` for a single plan on one axis, else
    ``uniform[name]`` (one axis) or ``uniform[name|axis]`` (several axes)."""
    if axis is not None:
        return f"uniform[{name}|{axis}]"
    return "uniform" if n_plans == 1 else f"uniform[{name}]"


def methods_at(plans: dict[str, Plan], n: int, axes: tuple[str, ...] | None = AXES) -> list[Method]:
    """dense, each plan, and per plan its uniform baselines at length ``n``: one per axis in ``axes`` (named
    ``uniform[name|axis]``), or, with a single axis, one named by :func:`uniform_label` without the axis; no
    baselines for ``axes`` None or empty."""
    axes = tuple(axes or ())
    out = [Method("dense", None)]
    for name, p in plans.items():
        out.append(Method(name, p))
        for axis in axes:
            label = uniform_label(name, len(plans), axis if len(axes) > 1 else None)
            out.append(Method(label, uniform_matched(p, n, axis), axis, name))
    return out


__all__ = ["AXES", "Method", "methods_at", "uniform_label", "uniform_matched"]
