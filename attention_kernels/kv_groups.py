"""Per-head bounded KV storage for decoding with a plan: pure tensor code, one class per group kind.

A layer's KV heads are stored in groups, each a contiguous ``(B, Hg, L, D)`` tensor (in the manner of
transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer``, one class per retention policy):

* :class:`DenseGroup` keeps every token (a KV head with any dense query head);
* :class:`RingGroup` keeps its sink tokens plus the recent window as a ring (``sink_eff + window`` slots, a new
  token overwrites the one leaving the window), so a decode step reads only kept tokens;
* :class:`LinearGroup` keeps a D x D state instead of tokens (every query head of the KV head is linear).

Slots carry real token positions (``pos``, -1 = empty); RoPE is applied before caching, so slot order does not
matter. :class:`PlanKV` is one layer's store: it builds the groups from a prefill (:meth:`PlanKV.store`), appends
new tokens and attends new queries over what each group kept. A decode step (one new token, softmax heads, no
softcap / attention-sink logits / native window) goes through :func:`attention_kernels.dispatch.decode_attention` over the
kept slots only; everything else through the masked path of :meth:`DenseGroup.attend`. The HF ``Cache`` around it lives in
``compressor/hf/plan_cache.py``. The visibility rule is :func:`plans.span.sees`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_kernels.cheap_operators import (
    LinearState,
    linear_attention,
    linear_decode_step,
    relu_softmax_attention,
)
from attention_kernels.reference import masked_attention, repeat_kv
from attention_kernels.options import ScoreOptions
from plans.span import sees

@dataclass(frozen=True)
class AttendSpec:
    """What one attend call needs beyond the queries: per-query-head pattern and the model's call features.

    sink_q/window_q (B, Hq); relu_heads/linear_heads: query heads with those operators; softcap, s_aux (Hq,),
    dropout and native_window as in :func:`attention_kernels.reference.masked_attention` / :func:`attention_kernels.reference.pattern_mask`.
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

    def plain_decode(self, query: torch.Tensor, heads: frozenset) -> bool:
        """Whether query heads ``heads`` can take the kept-slot decode path: one new token (query (B, Hq, 1, D)),
        softmax operators, and none of softcap / attention-sink logits / dropout / a native window."""
        return (query.shape[2] == 1 and self.softcap is None and self.s_aux is None and not self.dropout
                and self.native_window is None and not (heads & (self.relu_heads | self.linear_heads)))


def _decode(query: torch.Tensor, qi: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor,
            scale: float | None) -> torch.Tensor:
    """Query heads ``qi`` of a one-token query (B, Hq, 1, D) over slots k/v (B, Hg, L, D), of which the first
    ``kv_len`` (B, Hg) are valid, through :func:`attention_kernels.dispatch.decode_attention` -> (B, Hqg, 1, D)."""
    from attention_kernels.dispatch import decode_attention

    return decode_attention(_heads(query, qi)[:, :, 0], k, v, kv_len, scale)[:, :, None]


def _heads(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, ...) restricted to heads ``idx`` (sorted, distinct) along dim 1: ``t`` itself (no copy) when
    ``idx`` is every head, as for a layer whose KV heads form one group (the decode step's common case)."""
    return t if idx.numel() == t.shape[1] else t.index_select(1, idx)


def _extend(t: torch.Tensor, n: int, fill) -> torch.Tensor:
    """``t`` (B, Hg, L, ...) with ``n`` more slots filled with ``fill`` along dim 2."""
    return torch.cat([t, t.new_full((*t.shape[:2], n, *t.shape[3:]), fill)], dim=2)


@dataclass
class DenseGroup:
    """KV heads ``kv`` (Hg,) that keep every token: k/v (B, Hg, L, D), pos (B, Hg, L) real positions."""

    kv: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor

    def query_heads(self, n_rep: int) -> torch.Tensor:
        """Query heads (Hqg,) of this group's KV heads (computed once per group)."""
        cached = self.__dict__.get("_qi")
        if cached is None or cached[0] != n_rep:
            qi = (self.kv[:, None] * n_rep + torch.arange(n_rep, device=self.kv.device)).flatten()
            cached = self.__dict__["_qi"] = (n_rep, qi, frozenset(qi.tolist()))
        return cached[1]

    def query_head_set(self, n_rep: int) -> frozenset:
        self.query_heads(n_rep)
        return self.__dict__["_qi"][2]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def index_batch(self, fn) -> None:
        self.k, self.v, self.pos = fn(self.k), fn(self.v), fn(self.pos)

    def append(self, keys: torch.Tensor, values: torch.Tensor, new_pos: torch.Tensor) -> None:
        """keys/values (B, Hkv, q, D) of the whole layer, new_pos (B, q)."""
        self.k = torch.cat([self.k, _heads(keys, self.kv)], dim=2)
        self.v = torch.cat([self.v, _heads(values, self.kv)], dim=2)
        self.pos = torch.cat([self.pos, new_pos[:, None, :].expand(-1, self.kv.numel(), -1)], dim=2)

    def attend(self, query: torch.Tensor, q_pos: torch.Tensor, spec: AttendSpec, n_rep: int) -> torch.Tensor:
        """Queries (B, Hq, q, D) of the whole layer at real positions q_pos (B, q) -> (B, Hqg, q, D) for this group.

        A decode step whose query heads all see every slot (no padding slot, dense patterns, softmax, none of
        softcap / attention-sink logits / dropout / native window) is one :func:`attention_kernels.dispatch.decode_attention`
        call without a mask; anything else builds the :func:`plans.span.sees` mask over the group's slots."""
        qi = self.query_heads(n_rep)
        if (spec.plain_decode(query, self.query_head_set(n_rep)) and bool((self.pos >= 0).all())
                and bool((spec.window_q.index_select(1, qi) > q_pos).all())):
            kv_len = torch.full(self.pos.shape[:2], self.pos.shape[-1], device=query.device)
            return _decode(query, qi, self.k, self.v, kv_len, spec.scale)
        pos = self.pos.repeat_interleave(n_rep, dim=1)  # (B, Hqg, L)
        kp, qp = pos[:, :, None, :], q_pos[:, None, :, None]
        valid = kp >= 0
        ok = valid & sees(qp, kp, spec.sink_q.index_select(1, qi)[:, :, None, None],
                          spec.window_q.index_select(1, qi)[:, :, None, None])
        if spec.native_window is not None:
            ok = ok & (qp - kp < spec.native_window)
        ok = ok | (~ok.any(-1, keepdim=True) & valid)  # padding query rows: any valid key, never NaN
        qg, kg, vg = query.index_select(1, qi), repeat_kv(self.k, n_rep), repeat_kv(self.v, n_rep)
        s_aux = None if spec.s_aux is None else spec.s_aux.index_select(0, qi)
        o = masked_attention(qg, kg, vg, ok, spec.scale, ScoreOptions(softcap=spec.softcap, s_aux=s_aux,
                                                                      dropout=spec.dropout))
        for r, h in enumerate(qi.tolist()):
            if h in spec.relu_heads:
                o[:, r] = relu_softmax_attention(qg[:, r : r + 1], kg[:, r : r + 1], vg[:, r : r + 1], ok[:, r : r + 1],
                                                 spec.scale)[:, 0]
            elif h in spec.linear_heads:  # a keep-all group: slots are in token order, queries are the last ones
                o[:, r] = linear_attention(qg[:, r : r + 1], kg[:, r : r + 1], vg[:, r : r + 1], spec.scale,
                                           k_valid=pos[:, r] >= 0)[:, 0]
        return o


@dataclass
class RingGroup:
    """Bounded KV heads stored as a ring: exactly the slots the next query can see, nothing more.

    KV head h of sequence b keeps its ``sink`` (B, Hg) first tokens at slots ``p`` and the rest at slot
    ``sink + (p - sink) mod window`` (``window`` (B, Hg)), so ``sink + window`` slots hold every key a query can
    see under :func:`plans.span.sees` (its sinks and the ``window`` most recent positions, itself included) and a
    new token overwrites the one that just left the window: no compaction, no stale slot. After a decode step's
    write the valid slots of a head are the prefix ``[0, min(n_real, sink + window))``, so the attention reads only
    kept tokens through :func:`attention_kernels.dispatch.decode_attention` (CPU SDPA or the Triton split-K kernel).

    k/v (B, Hg, L, D) with ``L <= max(sink + window)`` (grown on demand), pos (B, Hg, L) real positions (-1 empty);
    ``uniform``: every query head of each KV head has the KV head's (sink, window), the condition of the fast path.
    Other calls (several new tokens, softcap, attention-sink logits, dropout, a native window, non-softmax
    operators) attend over ring + new tokens with the masked path of :class:`DenseGroup`, then write.
    """

    kv: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor
    uniform: bool
    pending: tuple | None = None  # (k, v, pos) of the new tokens, (B, Hg, q, D) / (B, Hg, q)

    query_heads = DenseGroup.query_heads
    query_head_set = DenseGroup.query_head_set

    def __post_init__(self):
        # one (sink, window) for every sequence and KV head of the group: a decode write is plain int arithmetic
        self.same = (self.sink.numel() > 0 and bool((self.sink == self.sink.flatten()[0]).all())
                     and bool((self.window == self.window.flatten()[0]).all()))
        self.s0 = int(self.sink.flatten()[0]) if self.same else None
        self.w0 = int(self.window.flatten()[0]) if self.same else None

    @classmethod
    def from_prefill(cls, kv, keys, values, pos, sink, window, uniform: bool) -> RingGroup:
        """keys/values (B, Hg, N, D) at real positions pos (B, Hg, N) (-1 pad); keeps what position n_real sees."""
        g = cls(kv, keys[:, :, :0], values[:, :, :0], pos[:, :, :0], sink, window, uniform)
        n_real = (pos >= 0).sum(-1, keepdim=True)
        g._write(keys, values, pos, horizon=n_real)
        return g

    def slot(self, p: torch.Tensor) -> torch.Tensor:
        """Ring slot of real positions p (B, Hg, q)."""
        s, w = self.sink[..., None], self.window[..., None]
        return torch.where(p < s, p, s + (p - s).remainder(w))

    def _write(self, keys, values, p, horizon) -> None:
        """Write new tokens (B, Hg, q, D) at positions p (B, Hg, q); only those a query at ``horizon`` (B, Hg, 1)
        or later can see are written (so no two written tokens share a slot)."""
        s, w = self.sink[..., None], self.window[..., None]
        keep = (p >= 0) & ((p < s) | (p > horizon - w))
        slot = torch.where(keep, self.slot(p.clamp(min=0)), -1)
        need = int(slot.max()) + 1 if slot.numel() else 0
        if need > self.k.shape[2]:  # grow (at most to sink + window)
            cap = int((self.sink + self.window).max())
            length = min(cap, max(need, 2 * self.k.shape[2], 64))
            grow = length - self.k.shape[2]
            self.k, self.v, self.pos = _extend(self.k, grow, 0), _extend(self.v, grow, 0), _extend(self.pos, grow, -1)
        if p.shape[-1] == 1 and bool(keep.all()):  # a decode step: one in-place scatter per tensor
            gi = slot[..., None].expand(-1, -1, -1, self.k.shape[-1])
            self.k.scatter_(2, gi, keys.to(self.k.dtype))
            self.v.scatter_(2, gi, values.to(self.v.dtype))
            self.pos.scatter_(2, slot, p)
            return
        spare = self.k.shape[2]  # one spare slot takes every token not written
        slot = torch.where(keep, slot, spare)
        gi = slot[..., None].expand(-1, -1, -1, self.k.shape[-1])
        self.k = _extend(self.k, 1, 0).scatter_(2, gi, keys.to(self.k.dtype))[:, :, :spare]
        self.v = _extend(self.v, 1, 0).scatter_(2, gi, values.to(self.v.dtype))[:, :, :spare]
        self.pos = _extend(self.pos, 1, -1).scatter_(2, slot, p)[:, :, :spare]

    def _decode_one(self, query, p: int, k_new, v_new, qi, scale) -> torch.Tensor:
        """One sequence, one new token at position p, one (sink, window) for the group: write its slot, attend over
        the valid prefix of the ring (``min(p + 1, sink + window)`` slots, all of them visible)."""
        from attention_kernels.dispatch import decode_attention_prefix

        s, w = self.s0, self.w0
        slot = p if p < s else s + (p - s) % max(w, 1)
        if slot >= self.k.shape[2]:
            self._write(k_new, v_new, torch.full_like(k_new[..., 0], p, dtype=torch.long), horizon=p)
        else:  # in place, one slot: select + copy_ (no advanced indexing)
            self.k.select(2, slot).copy_(k_new.select(2, 0))
            self.v.select(2, slot).copy_(v_new.select(2, 0))
            self.pos.select(2, slot).fill_(p)
        valid = min(p + 1, s + w, self.k.shape[2])
        return decode_attention_prefix(_heads(query, qi)[:, :, 0], self.k, self.v, valid, scale)[:, :, None]

    def _decode_per_query_head(self, query, q_pos, qi, spec: AttendSpec, n_rep: int) -> torch.Tensor:
        """A decode step (query (B, Hq, 1, D)) of a group whose query heads keep narrower patterns than their KV
        head's ring (which holds the widest): the n_rep query heads of a KV head are n_rep rows of one SDPA call
        over the ring, each row masked by its own :func:`plans.span.sees` — no copy of the ring, no repeat_kv.
        -> (B, Hqg, 1, D)."""
        b, hg, d = query.shape[0], self.kv.numel(), query.shape[-1]
        sink = spec.sink_q.index_select(1, qi).view(b, hg, n_rep, 1)
        window = spec.window_q.index_select(1, qi).view(b, hg, n_rep, 1)
        kp = self.pos[:, :, None, :]  # (B, Hg, 1, L)
        ok = (kp >= 0) & sees(q_pos.view(b, 1, 1, 1), kp, sink, window)  # (B, Hg, n_rep, L)
        qg = _heads(query, qi)[:, :, 0].reshape(b, hg, n_rep, d)
        out = torch.nn.functional.scaled_dot_product_attention(qg, self.k, self.v, attn_mask=ok, scale=spec.scale)
        return out.reshape(b, hg * n_rep, 1, d)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def index_batch(self, fn) -> None:
        self.k, self.v, self.pos, self.sink, self.window = (fn(self.k), fn(self.v), fn(self.pos), fn(self.sink),
                                                            fn(self.window))

    def append(self, keys: torch.Tensor, values: torch.Tensor, new_pos: torch.Tensor) -> None:
        """keys/values (B, Hkv, q, D) of the whole layer, new_pos (B, q): held until :meth:`attend`."""
        self.pending = (_heads(keys, self.kv), _heads(values, self.kv), new_pos)

    def attend(self, query: torch.Tensor, q_pos: torch.Tensor, spec: AttendSpec, n_rep: int) -> torch.Tensor:
        """Queries (B, Hq, q, D) of the whole layer at real positions q_pos (B, q) -> (B, Hqg, q, D)."""
        k_new, v_new, p_new = self.pending
        self.pending = None
        qi = self.query_heads(n_rep)
        simple = self.uniform and spec.plain_decode(query, self.query_head_set(n_rep))
        if simple and self.same and q_pos.shape[0] == 1:  # one sequence: int arithmetic
            p = int(q_pos[0, 0])
            if p >= 0:
                return self._decode_one(query, p, k_new, v_new, qi, spec.scale)
        p_new = p_new[:, None, :].expand(-1, self.kv.numel(), -1)  # (B, Hg, q)
        if (not self.uniform and spec.plain_decode(query, self.query_head_set(n_rep))
                and bool((q_pos >= 0).all())):  # query heads of a KV head with their own (sink, window)
            self._write(k_new, v_new, p_new, horizon=p_new)
            return self._decode_per_query_head(query, q_pos, qi, spec, n_rep)
        if simple and bool((q_pos >= 0).all()):
            self._write(k_new, v_new, p_new, horizon=p_new)
            kv_len = torch.minimum(q_pos + 1, self.sink + self.window).clamp(max=self.k.shape[2])
            return _decode(query, qi, self.k, self.v, kv_len, spec.scale)
        seen = DenseGroup(self.kv, torch.cat([self.k, k_new.to(self.k.dtype)], 2),
                          torch.cat([self.v, v_new.to(self.v.dtype)], 2), torch.cat([self.pos, p_new], 2))
        out = seen.attend(query, q_pos, spec, n_rep)
        self._write(k_new, v_new, p_new, horizon=p_new.amax(-1, keepdim=True) + 1)
        return out


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
        self.pending = (_heads(keys, self.kv), _heads(values, self.kv), new_pos >= 0)

    def attend(self, query, q_pos, spec: AttendSpec, n_rep: int) -> torch.Tensor:
        k_new, v_new, valid_new = self.pending
        self.pending = None
        o, self.state = linear_decode_step(self.state, query.index_select(1, self.query_heads(n_rep)), k_new, v_new,
                                           spec.scale, k_valid=valid_new)
        return o.to(query.dtype)


class PlanKV:
    """One layer's kept K/V under a plan: groups of KV heads, real-token counts, per-query-head patterns.

    n_rep = query heads per KV head. State per sequence (batch rows): ``n_real`` (B,) real tokens seen,
    ``sink_q``/``window_q`` (B, Hq) the pattern fixed at the prompt length.
    """

    def __init__(self, n_rep: int):
        self.n_rep = n_rep
        self.groups: list[DenseGroup | RingGroup | LinearGroup] = []
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

        sink_q/window_q (B, Hq) per query head; dense_kv (Hkv,) bool marks KV heads that keep every token;
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
        q_pattern = (sink_q.view(b, hkv, self.n_rep), window_q.view(b, hkv, self.n_rep))
        uniform = [bool((q_pattern[0][:, h] == sink_kv[:, h, None]).all() and (q_pattern[1][:, h] == window_kv[:, h, None]).all())
                   for h in range(hkv)]
        dense = [h for h in range(hkv) if caps[h] == -1]
        if dense:
            idx = torch.tensor(dense, device=keys.device)
            self.groups.append(DenseGroup(idx, keys.index_select(1, idx), values.index_select(1, idx),
                                          pos.index_select(1, idx).contiguous()))
        for cap, uni in sorted({(c, uniform[h]) for h, c in enumerate(caps) if c is not None and c >= 0}):
            idx = torch.tensor([h for h in range(hkv) if caps[h] == cap and uniform[h] == uni], device=keys.device)
            self.groups.append(RingGroup.from_prefill(idx, keys.index_select(1, idx), values.index_select(1, idx),
                                                      pos.index_select(1, idx), sink_kv.index_select(1, idx),
                                                      window_kv.index_select(1, idx), uni))

    def append(self, keys, values, new_pos) -> None:
        """Add new tokens (B, Hkv, q, D) with real positions new_pos (B, q) to every group."""
        self.n_real += (new_pos >= 0).sum(-1)
        for g in self.groups:
            g.append(keys, values, new_pos)

    def attend(self, query, q_pos, spec: AttendSpec) -> torch.Tensor:
        """Attention of new queries (B, Hq, q, D) at real positions q_pos (B, q) over the kept slots -> (B, Hq, q, D)."""
        if len(self.groups) == 1:  # one group holds every head, in order: no scatter into an output
            return self.groups[0].attend(query, q_pos, spec, self.n_rep)
        out = torch.empty_like(query)
        for g in self.groups:
            out[:, g.query_heads(self.n_rep)] = g.attend(query, q_pos, spec, self.n_rep)
        return out


__all__ = ["AttendSpec", "DenseGroup", "RingGroup", "LinearGroup", "PlanKV"]
