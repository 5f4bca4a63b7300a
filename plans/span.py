"""Span semantics, defined once for the whole project.

A head with a sink+window pattern keeps ``S`` key tokens per query, the sink included (MoA's definition).
``S`` is chosen once per sequence, from its prompt length N0 (real tokens of the first forward: template and
BOS included, pads excluded) and the plan's ``length_offset``::

    S = span(N0 + length_offset),   span(N) = round_up_to_block(clamp(floor(alpha + beta * N), min_span, max_span))

``span`` is never capped by the prompt length: a 37-token prompt under a 256-span head decodes densely until
the sequence holds 256 tokens. The first ``sink_eff = min(sink, S - 1)`` tokens are the sink and the other
``window = S - sink_eff`` are the most recent ones, the query itself included. Query i (0-based position among
real tokens) sees key j iff::

    j <= i  and  (j < sink_eff  or  i - j < window)

While the sequence holds at most S tokens the head is exactly dense; while decoding, S stays fixed (N0 is the
prompt length), so the decode window is ``S - sink_eff`` recent tokens plus the sink. Density accounting at
length N uses ``min(S, N)`` (:func:`kept_entries`, :func:`decode_density`). Example::

    >>> s = span_at(alpha=64, beta=0.25, n=1024, block=64)
    >>> s, split_span(s, sink=64)
    (320, (64, 256))
"""

from __future__ import annotations

import math

import torch

DENSE_SPAN = 1 << 62  # stands for "unbounded" in integer span tensors


def span_at(
    alpha: float,
    beta: float,
    n: int,
    *,
    min_span: int | None = None,
    max_span: int | None = None,
    block: int = 1,
) -> int:
    """Keys (sink included) a head keeps for a sequence whose rule length is ``n`` (never capped by ``n``)."""
    if n <= 0:
        return 0
    s = math.floor(alpha + beta * n + 1e-9)
    if min_span is not None:
        s = max(s, min_span)
    if max_span is not None:
        s = min(s, max_span)
    if block > 1:
        s = -(-s // block) * block
    return int(max(1, s))


def split_span(span: int, sink: int) -> tuple[int, int]:
    """(sink_eff, window) for a span: the sink is clamped so the window keeps at least the query."""
    sink_eff = max(0, min(sink, span - 1))
    return sink_eff, span - sink_eff


def split_span_tensor(sink: torch.Tensor, span: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`split_span` on integer tensors of any (broadcastable) shape."""
    span = span.clamp(min=1)
    sink_eff = torch.minimum(sink, span - 1).clamp(min=0)
    return sink_eff, span - sink_eff


def sees(i, j, sink_eff, window):
    """THE visibility rule: query at position i sees key at position j (ints or broadcasting tensors).

    ``sink_eff``/``window`` come from :func:`split_span`; every mask in the project is built from this function.
    """
    return (j <= i) & ((j < sink_eff) | (i - j < window))


def sees_or_selected(i, j, sink_eff, window, selected):
    """Visibility of a head that also keeps content-selected blocks: :func:`sees`, or ``j <= i`` and key j lies in
    a selected block (``selected``: bool for key j, broadcasting like ``j``). Selection never breaks causality."""
    return sees(i, j, sink_eff, window) | ((j <= i) & selected)


def sink_window_mask_mod(sink, window, n: int | None = None):
    """A FlexAttention ``mask_mod`` ``(b, h, q_idx, kv_idx) -> bool tensor`` for sink+window heads, built on :func:`sees`.

    ``sink`` / ``window`` are the effective sink and the window of :func:`split_span` / :func:`split_span_tensor`:
    ints or integer tensors; a tensor with a dimension is per head, indexed by ``h``. With ``n`` (the keys the mask
    covers), a head whose span ``sink + window`` reaches ``n`` is written as sink 0 / window ``n``: the same mask
    (such a head is dense), stated as a plain causal one. Pass the result to
    ``torch.nn.attention.flex_attention.create_block_mask(mod, 1, H, n, n)``; called on index tensors it is the
    mask itself::

        >>> sink_eff, window = split_span_tensor(torch.tensor([1, 64]), torch.tensor([3, 8]))
        >>> mod = sink_window_mask_mod(sink_eff, window, n=4)
        >>> qi, ki = torch.arange(4)[:, None], torch.arange(4)[None, :]
        >>> mod(0, 0, qi, ki).int()
        tensor([[1, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 0],
                [1, 0, 1, 1]], dtype=torch.int32)
        >>> bool(mod(0, 1, qi, ki).equal(qi >= ki))
        True
    """
    sink, window = torch.as_tensor(sink), torch.as_tensor(window)
    if n is not None:
        full = sink + window >= n
        sink, window = torch.where(full, 0, sink), torch.where(full, n, window)
    per_head = sink.dim() > 0 or window.dim() > 0
    if sink.shape != window.shape:
        sink, window = torch.broadcast_tensors(sink, window)

    def mask_mod(b, h, q_idx, kv_idx):
        if per_head:
            return sees(q_idx, kv_idx, sink[h], window[h])
        return sees(q_idx, kv_idx, sink, window)

    return mask_mod


def visible(i, j, sink: int, span: int):
    """Whether query i sees key j for a head of ``span`` keys and ``sink`` sink tokens."""
    sink_eff, window = split_span(span, sink)
    return sees(i, j, sink_eff, window)


def kept_entries(span: int, n: int) -> int:
    """Attention entries computed by one head over a causal prefill of length n: sum_i min(i+1, span)."""
    span = min(span, n)
    return span * (span + 1) // 2 + (n - span) * span


def prefill_density(span: int, n: int) -> float:
    """Kept entries / causal entries for one head at length n."""
    return kept_entries(span, n) / (n * (n + 1) / 2)


def decode_density(span: int, n: int) -> float:
    """KV tokens kept / n for one head after a prefill of length n."""
    return min(span, n) / n


def visibility_mask(n_q: int, n_k: int, sink: torch.Tensor, span: torch.Tensor, q_offset: int | None = None):
    """Bool mask (..., n_q, n_k) for per-head integer ``sink``/``span`` tensors of any batch shape.

    Queries are the last ``n_q`` positions of ``n_k`` keys unless ``q_offset`` is given.
    """
    off = n_k - n_q if q_offset is None else q_offset
    i = torch.arange(off, off + n_q, device=span.device)[:, None]
    j = torch.arange(n_k, device=span.device)[None, :]
    sink_eff, window = split_span_tensor(sink, span)
    return sees(i, j, sink_eff[..., None, None], window[..., None, None])
