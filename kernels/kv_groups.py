"""Per-head bounded KV storage for decoding with a plan: pure tensor code, one class per group kind.

A layer's KV heads are stored in groups, each a contiguous ``(B, Hg, L, D)`` tensor (in the manner of
transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer``, one class per retention policy):

* :class:`DenseGroup` keeps every token (a KV head with any dense query head);
* :class:`BoundedGroup` keeps its sink tokens plus the recent window the next query can still see
  (``sink_eff + window - 1`` slots), compacted every ``EVICT_SLACK`` steps;
* :class:`LinearGroup` keeps a D x D state instead of tokens (every query head of the KV head is linear).

Slots carry real token positions (``pos``, -1 = empty); RoPE is applied before caching, so slot order does not
matter. :class:`PlanKV` is one layer's store: it builds the groups from a prefill (:meth:`PlanKV.store`), appends
new tokens, attends new queries over what each group kept and evicts. The HF ``Cache`` around it lives in
``compressor/hf/plan_cache.py``. The visibility rule is :func:`plans.span.sees`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.cheap_operators import (
    LinearState,
    linear_attention,
    linear_decode_step,
    relu_softmax_attention,
)
from kernels.reference import masked_attention, repeat_kv
from plans.span import sees

EVICT_SLACK = 32  # decode steps between compactions of a bounded group


@dataclass(frozen=True)
class AttendSpec:
    """What one attend call needs beyond the queries: per-query-head pattern and the model's call features.

    sink_q/window_q (B, Hq); relu_heads/linear_heads: query heads with those operators; softcap, s_aux (Hq,),
    dropout and native_window as in :func:`kernels.reference.masked_attention` / :func:`kernels.reference.pattern_mask`.
    """

    sink_q: torch.Tensor
    window_q: torch.Tensor
    scale: float | None = None
    native_window: int | None = None
    relu_heads: frozenset = frozenset()
    linear_heads: frozenset = frozenset()
    softcap: float | None = None
    s_aux: torch.Tensor | None = None
    dropout: float = 0.0


@dataclass
class DenseGroup:
    """KV heads ``kv`` (Hg,) that keep every token: k/v (B, Hg, L, D), pos (B, Hg, L) real positions."""

    kv: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor

    def query_heads(self, n_rep: int) -> torch.Tensor:
        return (self.kv[:, None] * n_rep + torch.arange(n_rep, device=self.kv.device)).flatten()

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def index_batch(self, fn) -> None:
        self.k, self.v, self.pos = fn(self.k), fn(self.v), fn(self.pos)

    def append(self, keys: torch.Tensor, values: torch.Tensor, new_pos: torch.Tensor) -> None:
        """keys/values (B, Hkv, q, D) of the whole layer, new_pos (B, q)."""
        self.k = torch.cat([self.k, keys.index_select(1, self.kv)], dim=2)
        self.v = torch.cat([self.v, values.index_select(1, self.kv)], dim=2)
        self.pos = torch.cat([self.pos, new_pos[:, None, :].expand(-1, self.kv.numel(), -1)], dim=2)

    def attend(self, query: torch.Tensor, q_pos: torch.Tensor, spec: AttendSpec, n_rep: int) -> torch.Tensor:
        """Queries (B, Hq, q, D) of the whole layer at real positions q_pos (B, q) -> (B, Hqg, q, D) for this group."""
        qi = self.query_heads(n_rep)
        pos = self.pos.repeat_interleave(n_rep, dim=1)  # (B, Hqg, L)
        kp, qp = pos[:, :, None, :], q_pos[:, None, :, None]
        valid = kp >= 0
        ok = valid & sees(qp, kp, spec.sink_q.index_select(1, qi)[:, :, None, None],
                          spec.window_q.index_select(1, qi)[:, :, None, None])
        if spec.native_window is not None:
            ok = ok & (qp - kp < spec.native_window)
        ok = ok | (~ok.any(-1, keepdim=True) & valid)  # padding query rows: any valid key, never NaN
        qg, kg, vg = query.index_select(1, qi), repeat_kv(self.k, n_rep), repeat_kv(self.v, n_rep)
        o = masked_attention(qg, kg, vg, ok, spec.scale, softcap=spec.softcap,
                             s_aux=None if spec.s_aux is None else spec.s_aux.index_select(0, qi), dropout=spec.dropout)
        for r, h in enumerate(qi.tolist()):
            if h in spec.relu_heads:
                o[:, r] = relu_softmax_attention(qg[:, r : r + 1], kg[:, r : r + 1], vg[:, r : r + 1], ok[:, r : r + 1],
                                                 spec.scale)[:, 0]
            elif h in spec.linear_heads:  # a keep-all group: slots are in token order, queries are the last ones
                o[:, r] = linear_attention(qg[:, r : r + 1], kg[:, r : r + 1], vg[:, r : r + 1], spec.scale,
                                           k_valid=pos[:, r] >= 0)[:, 0]
        return o

    def evict(self, sink_kv: torch.Tensor, window_kv: torch.Tensor, cur: torch.Tensor, force: bool = False) -> None:
        """A dense group never evicts."""


@dataclass
class BoundedGroup(DenseGroup):
    """KV heads that keep their sink plus the recent window; ``cap`` = the most slots a sample needs."""

    cap: int = 0

    def evict(self, sink_kv: torch.Tensor, window_kv: torch.Tensor, cur: torch.Tensor, force: bool = False) -> None:
        """Drop slots no future query can see: not a sink and older than every window of the KV head.

        sink_kv/window_kv (B, Hkv) per KV head of the layer (widest query head), cur (B,) the newest real position.
        While decoding, the group is compacted only once it holds ``EVICT_SLACK`` slots beyond its capacity, so the
        gather runs every EVICT_SLACK steps instead of every step (the mask already hides stale slots)."""
        if not force and self.pos.shape[-1] < self.cap + EVICT_SLACK:
            return
        s = sink_kv.index_select(1, self.kv)[:, :, None]
        w = window_kv.index_select(1, self.kv)[:, :, None]
        pos = self.pos
        keep = (pos >= 0) & ((pos < s) | (pos >= cur[:, None, None] + 2 - w))
        n_keep = int(keep.sum(-1).max()) if keep.numel() else 0
        if n_keep == pos.shape[-1] and bool(keep.all()):
            return
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :n_keep]
        self.pos = torch.where(keep.gather(-1, order), pos.gather(-1, order), torch.full_like(order, -1))
        gi = order[..., None].expand(-1, -1, -1, self.k.shape[-1])
        self.k, self.v = self.k.gather(2, gi), self.v.gather(2, gi)


@dataclass
class LinearGroup:
    """KV heads whose query heads are all linear: a D x D :class:`LinearState` instead of tokens."""

    kv: torch.Tensor
    state: LinearState
    pending: tuple | None = None  # (k, v, valid) appended, consumed by attend

    query_heads = DenseGroup.query_heads

    def nbytes(self) -> int:
        return self.state.nbytes()

    def index_batch(self, fn) -> None:
        self.state = LinearState(fn(self.state.S), fn(self.state.count))

    def append(self, keys, values, new_pos) -> None:
        self.pending = (keys.index_select(1, self.kv), values.index_select(1, self.kv), new_pos >= 0)

    def attend(self, query, q_pos, spec: AttendSpec, n_rep: int) -> torch.Tensor:
        k_new, v_new, valid_new = self.pending
        self.pending = None
        o, self.state = linear_decode_step(self.state, query.index_select(1, self.query_heads(n_rep)), k_new, v_new,
                                           spec.scale, k_valid=valid_new)
        return o.to(query.dtype)

    def evict(self, sink_kv, window_kv, cur, force: bool = False) -> None:
        """A linear group holds no tokens."""


class PlanKV:
    """One layer's kept K/V under a plan: groups of KV heads, real-token counts, per-query-head patterns.

    n_rep = query heads per KV head. State per sequence (batch rows): ``n_real`` (B,) real tokens seen,
    ``sink_q``/``window_q`` (B, Hq) the pattern fixed at the prompt length.
    """

    def __init__(self, n_rep: int):
        self.n_rep = n_rep
        self.groups: list[DenseGroup | BoundedGroup | LinearGroup] = []
        self.n_real: torch.Tensor | None = None
        self.sink_q: torch.Tensor | None = None
        self.window_q: torch.Tensor | None = None

    @property
    def has_states(self) -> bool:
        return bool(self.groups)

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)

    def clear(self) -> None:
        self.groups, self.n_real, self.sink_q, self.window_q = [], None, None, None

    def index_batch(self, fn) -> None:
        """Apply ``fn`` to the batch dimension of every tensor (beam reorder, repeat, select)."""
        for g in self.groups:
            g.index_batch(fn)
        for name in ("n_real", "sink_q", "window_q"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def kv_limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sink, window) per KV head (B, Hkv): the widest query head of each group."""
        b, hq = self.sink_q.shape
        return (self.sink_q.view(b, hq // self.n_rep, self.n_rep).amax(-1),
                self.window_q.view(b, hq // self.n_rep, self.n_rep).amax(-1))

    def store(self, keys, values, k_pos, sink_q, window_q, dense_kv: torch.Tensor, linear_kv: torch.Tensor | None = None):
        """Keep a prefill's keys/values (B, Hkv, N, D) at real positions k_pos (B, N) (-1 = pad).

        sink_q/window_q (B, Hq) per query head; dense_kv (Hkv,) bool marks KV heads that never evict;
        linear_kv (Hkv,) bool marks KV heads whose query heads are all linear: they keep only a D x D state.
        """
        b, hkv = keys.shape[:2]
        self.sink_q, self.window_q = sink_q, window_q
        self.n_real = (k_pos >= 0).sum(-1)
        pos = k_pos[:, None, :].expand(b, hkv, -1)
        sink_kv, window_kv = self.kv_limits()
        caps: list[int | None] = [-1 if bool(dense_kv[h]) else int((sink_kv[:, h] + window_kv[:, h]).max())
                                  for h in range(hkv)]
        self.groups = []
        if linear_kv is not None and bool(linear_kv.any()):
            idx = linear_kv.nonzero().flatten().to(keys.device)
            self.groups.append(LinearGroup(idx, LinearState.from_prefill(keys.index_select(1, idx),
                                                                         values.index_select(1, idx), k_pos >= 0)))
            caps = [None if bool(linear_kv[h]) else c for h, c in enumerate(caps)]
        for cap in sorted({c for c in caps if c is not None}):
            idx = torch.tensor([h for h in range(hkv) if caps[h] == cap], device=keys.device)
            parts = (idx, keys.index_select(1, idx), values.index_select(1, idx), pos.index_select(1, idx).contiguous())
            self.groups.append(DenseGroup(*parts) if cap < 0 else BoundedGroup(*parts, cap=cap))
        self.evict(force=True)

    def append(self, keys, values, new_pos) -> None:
        """Add new tokens (B, Hkv, q, D) with real positions new_pos (B, q) to every group."""
        self.n_real = self.n_real + (new_pos >= 0).sum(-1)
        for g in self.groups:
            g.append(keys, values, new_pos)

    def attend(self, query, q_pos, spec: AttendSpec) -> torch.Tensor:
        """Attention of new queries (B, Hq, q, D) at real positions q_pos (B, q) over the kept slots -> (B, Hq, q, D)."""
        out = torch.empty_like(query)
        for g in self.groups:
            out[:, g.query_heads(self.n_rep)] = g.attend(query, q_pos, spec, self.n_rep)
        return out

    def evict(self, force: bool = False) -> None:
        sink_kv, window_kv = self.kv_limits()
        for g in self.groups:
            g.evict(sink_kv, window_kv, self.n_real - 1, force)


__all__ = ["AttendSpec", "DenseGroup", "BoundedGroup", "LinearGroup", "PlanKV", "EVICT_SLACK"]
