"""The plan: a versioned, declarative description of every head's attention pattern (JSON on disk).

A plan lists, per layer, one pattern per head; heads are the model's query heads or its KV heads
(``granularity``). Span semantics live in :mod:`plans.span`; this module only stores the rules.

    >>> p = SinkWindowPattern(sink=64, alpha=0, beta=0.25)
    >>> p.span(4096)
    1024
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Annotated, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from plans.defaults import DEFAULT_SINK
from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.span import DENSE_SPAN, decode_density, prefill_density, span_at

PLAN_FORMAT_VERSION = 1
MAX_TOKENS = 2**31 - 1  # bound on every token count in a plan (sink, spans, block, offsets, lengths): int32 range


def tool_version() -> str:
    try:
        return metadata.version("attention-compressor")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


Operator = Literal["softmax", "relu_softmax"]  # the operator field of dense / sink_window patterns
HEAD_OPERATORS = ("softmax", "relu_softmax", "linear")  # what a query head computes (Plan.operators)
COST_KINDS = ("softmax", "sink_window", "relu_softmax", "linear")  # cost entries: operator x key set (search costs)
OPERATOR_HELP = "softmax (standard) or relu_softmax (relu(s)/sum relu(s), MPCViT) over the same key set"


class DensePattern(BaseModel):
    """Full causal attention."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["dense"] = "dense"
    operator: Operator = Field("softmax", description=OPERATOR_HELP)

    def span(self, n: int) -> int:
        return n

    @property
    def sink_tokens(self) -> int:
        return 0


class SinkWindowPattern(BaseModel):
    """``sink`` first tokens plus a recent window, ``S`` tokens in all (the sink included).

    ``S = span(N0 + length_offset)`` with ``span(N) = round_up(clamp(floor(alpha + beta*N), min_span, max_span),
    block)`` for a sequence whose prompt holds N0 real tokens; never capped by N0 and fixed while decoding. Query i
    sees key j iff ``j <= i and (j < sink_eff or i - j < S - sink_eff)``, ``sink_eff = min(sink, S - 1)``
    (:mod:`plans.span`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # alpha/beta: finite numbers only
    kind: Literal["sink_window"] = "sink_window"
    operator: Operator = Field("softmax", description=OPERATOR_HELP)
    sink: int = Field(64, ge=0, le=MAX_TOKENS, description="sink tokens (inside the span)")
    alpha: float = Field(ge=-MAX_TOKENS, le=MAX_TOKENS,
                         description="additive span term, tokens (may be negative, as in MoA); |alpha| < 2^31")
    beta: float = Field(0.0, ge=0.0, le=1.0, description="span grows by beta tokens per input token")
    min_span: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_span: int | None = Field(None, ge=1, le=MAX_TOKENS)
    block: int = Field(1, ge=1, le=MAX_TOKENS, description="span is rounded up to a multiple of this")

    @model_validator(mode="after")
    def _check(self):
        if self.min_span is not None and self.max_span is not None and self.min_span > self.max_span:
            raise ValueError(f"min_span {self.min_span} > max_span {self.max_span}")
        if self.beta == 0 and self.alpha < 1 and not self.min_span:
            raise ValueError(f"span is never positive: alpha={self.alpha}, beta=0 (a negative span)")
        return self

    def span(self, n: int) -> int:
        return span_at(self.alpha, self.beta, n, min_span=self.min_span, max_span=self.max_span, block=self.block)

    def raw_span(self, n: int) -> float:
        return self.alpha + self.beta * n

    @property
    def sink_tokens(self) -> int:
        return self.sink


class LinearPattern(BaseModel):
    """MPCViT's scaling attention, causal: ``o_i = sum_{j<=i} (q_i.k_j * scale) v_j / (i + 1)``.

    It reassociates as ``q_i (sum_j k_j^T v_j) / (i+1)``: O(N D^2) prefill, a D x D state per head to decode.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["linear"] = "linear"

    def span(self, n: int) -> int:
        return n

    @property
    def sink_tokens(self) -> int:
        return 0


HeadPattern = Annotated[Union[DensePattern, SinkWindowPattern, LinearPattern], Field(discriminator="kind")]


class LayerPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")
    heads: list[HeadPattern]


_Length = Annotated[int, Field(ge=1, le=MAX_TOKENS)]  # an input length, tokens
_Fraction = Annotated[float, Field(ge=0, le=1)]  # a predicted density (rounding may give 0 at huge lengths)


class Budget(BaseModel):
    """One budget constraint: density (prefill entries or KV tokens) or latency, at one length or all."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: Literal["density", "kv_density", "latency_ms"]
    value: float = Field(gt=0, le=1e9, description="a fraction in (0, 1], or milliseconds for latency_ms")
    length: int | None = Field(None, ge=1, le=MAX_TOKENS, description="None: at every target length")

    @model_validator(mode="after")
    def _check_fraction(self):
        if self.kind != "latency_ms" and self.value > 1:
            raise ValueError(f"value = {self.value!r}: a {self.kind} budget is a fraction in (0, 1]")
        return self


class Predictions(BaseModel):
    """What the search predicted and measured for this plan; empty for hand-made plans."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    density: dict[_Length, _Fraction] = Field(default_factory=dict, description="prefill density per length")
    kv_density: dict[_Length, _Fraction] = Field(default_factory=dict)
    loss: dict[_Length, float] = Field(default_factory=dict, description="predicted masked influence per length")
    latency_ms: dict[_Length, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    solver: dict = Field(default_factory=dict)
    validation: dict = Field(default_factory=dict)


class Plan(BaseModel):
    """A per-layer, per-head attention plan for one model geometry.

    Each sink_window head keeps ``S = span(N0 + length_offset)`` tokens for a sequence with an N0-token prompt,
    never capped by N0 and fixed while decoding; the head is exactly dense while the sequence holds <= S tokens."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format_version: int = Field(PLAN_FORMAT_VERSION, ge=1)
    tool_version: str = Field(default_factory=tool_version)
    source: str = Field("hand", description="hand | uniform | search | import:moa | import:duo ...")
    model: ModelIdentity
    granularity: Literal["query_head", "kv_head"] = "kv_head"
    length_offset: int = Field(
        0, ge=0, le=MAX_TOKENS, description=("tokens added to the prompt length N0 before evaluating span rules: S = span(N0 + length_offset), "
                     "never capped by N0, fixed while decoding (MoA run time: 1024)")
    )
    lengths: list[_Length] = Field(default_factory=list, description="input lengths the plan targets")
    budgets: list[Budget] = Field(default_factory=list)
    predicted: Predictions = Field(default_factory=Predictions)
    layers: list[LayerPlan]

    @model_validator(mode="after")
    def _check_shape(self):
        m = self.model
        for f in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "max_positions"):
            v = getattr(m, f)
            if v is not None and v < 1:
                raise ValueError(f"model.{f} = {v!r}: must be >= 1")
        if m.num_heads % m.num_kv_heads:
            raise ValueError(
                f"model.num_heads = {m.num_heads} is not a multiple of model.num_kv_heads = {m.num_kv_heads}")
        n_heads = self.heads_per_layer
        if len(self.layers) != self.model.num_layers:
            raise ValueError(f"plan has {len(self.layers)} layers but model.num_layers is {self.model.num_layers}")
        for li, layer in enumerate(self.layers):
            if len(layer.heads) != n_heads:
                raise ValueError(
                    f"layers[{li}] has {len(layer.heads)} heads, expected {n_heads} ({self.granularity} granularity)"
                )
            for hi, p in enumerate(layer.heads):
                for n in self.lengths:
                    if isinstance(p, SinkWindowPattern) and p.raw_span(n + self.length_offset) <= 0 and not p.min_span:
                        raise ValueError(f"layers[{li}].heads[{hi}]: negative span {p.raw_span(n):g} at N={n}")
        return self

    # -- geometry ---------------------------------------------------------------------------------------
    @property
    def heads_per_layer(self) -> int:
        return self.model.num_heads if self.granularity == "query_head" else self.model.num_kv_heads

    def pattern(self, layer: int, q_head: int):
        """The pattern that governs query head ``q_head`` of ``layer``."""
        h = q_head if self.granularity == "query_head" else q_head // self.model.group_size
        return self.layers[layer].heads[h]

    def spans(self, layer: int, n: int) -> torch.Tensor:
        """int64 [Hq]: keys kept per query head at input length n (DENSE_SPAN for dense heads)."""
        nr = n + self.length_offset
        out = []
        for h in range(self.model.num_heads):
            p = self.pattern(layer, h)
            out.append(DENSE_SPAN if isinstance(p, (DensePattern, LinearPattern)) else p.span(nr))
        return torch.tensor(out, dtype=torch.int64)

    def sinks(self, layer: int) -> torch.Tensor:
        """int64 [Hq]: sink tokens per query head (0 for dense)."""
        return torch.tensor([self.pattern(layer, h).sink_tokens for h in range(self.model.num_heads)], dtype=torch.int64)

    def is_dense(self) -> bool:
        return all(isinstance(p, DensePattern) and p.operator == "softmax" for layer in self.layers for p in layer.heads)

    def operators(self, layer: int) -> list[str]:
        """Per query head: "softmax", "relu_softmax" or "linear"."""
        out = []
        for h in range(self.model.num_heads):
            p = self.pattern(layer, h)
            out.append("linear" if isinstance(p, LinearPattern) else p.operator)
        return out

    # -- densities (averaged over query heads; GQA groups share) -----------------------------------------
    def density(self, n: int) -> float:
        """Prefill density at length n: computed entries / causal entries, averaged over all query heads."""
        vals = [prefill_density(min(int(s), n), n) for li in range(len(self.layers)) for s in self.spans(li, n)]
        return float(sum(vals) / len(vals))

    def kv_density(self, n: int) -> float:
        """KV tokens kept / n after a prefill of n, per KV head (the widest query head of its group)."""
        g = self.model.group_size
        vals = []
        for li in range(len(self.layers)):
            s = self.spans(li, n)
            for kv in range(self.model.num_kv_heads):
                vals.append(decode_density(min(int(s[kv * g : (kv + 1) * g].max()), n), n))
        return float(sum(vals) / len(vals))

    def describe_span(self, layer: int, head: int, n: int) -> str:
        p = self.layers[layer].heads[head]
        if isinstance(p, LinearPattern):
            return "linear"
        tag = "" if p.operator == "softmax" else " relu"
        if isinstance(p, DensePattern):
            return "dense" + tag
        return f"{p.span(n + self.length_offset)}" + tag


def uniform_plan(identity: ModelIdentity, span: int, sink: int = DEFAULT_SINK, granularity="kv_head", lengths=()) -> Plan:
    """StreamingLLM baseline: every head keeps ``sink`` + recent tokens, ``span`` in all."""
    pat = SinkWindowPattern(sink=sink, alpha=span, beta=0.0)
    n = identity.num_heads if granularity == "query_head" else identity.num_kv_heads
    return Plan(
        model=identity, granularity=granularity, source="uniform", lengths=list(lengths),
        layers=[LayerPlan(heads=[pat] * n) for _ in range(identity.num_layers)],
    )


def span_for_density(density: float, n: int) -> int:
    """Smallest span whose prefill density at length n is >= ``density``."""
    if not 0 < density <= 1:
        raise CompressError(f"density must be in (0, 1], got {density}")
    target = density * n * (n + 1) / 2
    # kept(s) = s(s+1)/2 + (n-s)s = s*n - s^2/2 + s/2 ; solve s^2/2 - s(n+1/2) + target = 0
    s = (n + 0.5) - math.sqrt(max((n + 0.5) ** 2 - 2 * target, 0.0))
    return max(1, min(n, math.ceil(s - 1e-9)))
