"""Mask to key layout: where each query and key of one attention call sits in its sequence.

Our mask builder (registered in ``AttentionMaskInterface`` under the plan's implementation name) turns HF's mask
arguments (2D padding mask, query offset, key-slot offset and length from the cache) into a :class:`KeyLayout` of
real positions, so the attention function never needs a (q, kv) mask for padding, static or sliding caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import sdpa_mask

from plans.errors import CompressError


@dataclass(frozen=True)
class KeyLayout:
    """Real positions of one attention call's queries and key slots (per sample), from the mask builder.

    q_pos (B, q) and k_pos (B, kv): positions among the sequence's real tokens (pads excluded), -1 for a pad
    or a slot not written yet (static caches); ``q_start``: absolute index of the first query in its sequence
    (0 = this call starts the sequence); ``written``: key slots holding tokens (the rest are empty cache slots);
    ``allowed`` (B, 1, q, kv) bool or None: a mask the caller adds on top of causality (packed sequences,
    modality overlays), materialised only in those cases, intersected with the plan; ``source``: "builder" (our
    mask builder, positions derived from the padding mask), "plain" (no mask: a causal call whose queries are the
    last q keys) or "custom" (a 4D mask the caller made).
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_start: int
    written: int
    allowed: torch.Tensor | None = None
    source: str = "builder"


def key_layout_mask(batch_size, q_length=None, kv_length=None, attention_mask=None, **kw):
    """Registered in AttentionMaskInterface: key validity (B, 1, 1, kv) bool carrying a :class:`KeyLayout` as
    ``.compress_layout``, or None for a plain causal call (no padding, every key slot written, no offsets).

    The pattern itself (causal, sink, windows, a native sliding window) is applied by the attention function
    from real positions, so no (q, kv) mask is built except where HF adds a mask function of its own (packed
    sequences, modality overlays, compiled decode), which is materialised as stock sdpa would and intersected.
    ``kw``: the rest of transformers' mask-interface keywords (``q_offset``, ``kv_offset``, ``mask_function``,
    ``allow_is_causal_skip``, ``device``, ...).
    """
    q_offset, kv_offset = kw.get("q_offset", 0), kw.get("kv_offset", 0)
    mask_function, allow_is_causal_skip = kw.get("mask_function"), kw.get("allow_is_causal_skip", True)
    if attention_mask is not None and (attention_mask.ndim != 2 or attention_mask.shape[0] not in (1, batch_size)):
        raise CompressError(f"compress attention: a mask of shape {tuple(attention_mask.shape)} for a batch of "
                            f"{batch_size}; expected a 2D padding mask ({batch_size}, kv) or a 4D (B|1, 1|Hq, q|1, kv) "
                            "mask")
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    total = q_offset + q_length  # tokens in the sequence once this call is done (pads included)
    am = None if attention_mask is None else attention_mask.to(torch.bool)
    plain = (am is None or bool(am[:, :total].all())) and kv_offset == 0 and kv_length == total
    if plain and allow_is_causal_skip:
        return None
    device = kw.get("device") or (am.device if am is not None else None)
    if am is None:
        am = torch.ones(batch_size, total, dtype=torch.bool, device=device)
    elif am.shape[-1] < total:  # HF may pass the 2D mask shorter than the sequence: the rest is real
        am = torch.cat([am, am.new_ones(am.shape[0], total - am.shape[-1])], dim=-1)
    am = am[:, :total].expand(batch_size, total)
    pos = torch.where(am, am.long().cumsum(-1) - 1, -1)
    written = max(0, min(kv_length, total - kv_offset))
    k_pos = torch.full((batch_size, kv_length), -1, dtype=torch.long, device=am.device)
    k_pos[:, :written] = pos[:, kv_offset : kv_offset + written]
    allowed = None
    if not allow_is_causal_skip:  # a mask function beyond causal + padding: let HF evaluate it
        allowed = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, **{k: v for k, v in kw.items() if k in ("device", "use_vmap")})
    out = (k_pos >= 0)[:, None, None, :]
    out.compress_layout = KeyLayout(q_pos=pos[:, q_offset:total], k_pos=k_pos, q_start=q_offset, written=written,
                                    allowed=allowed)
    return out


def _packed_positions(layout: KeyLayout, position_ids) -> KeyLayout:
    """Packed documents (``position_ids`` that restart inside a row, HF's packing format): each token's position is
    its ``position_ids`` entry, so every document keeps its own sinks and window; other layouts unchanged.

    Only for a call that starts its sequences (queries == keys) with an extra mask from HF (the packed-sequence
    mask that keeps documents apart); ``position_ids`` of another shape (e.g. multimodal 3D rotary ids) are not
    positions in this sense and leave the layout as it is."""
    if (layout.allowed is None or position_ids is None or position_ids.ndim != 2 or layout.q_start != 0
            or layout.q_pos.shape != layout.k_pos.shape or position_ids.shape[-1] != layout.k_pos.shape[-1]):
        return layout
    pos = position_ids.to(layout.k_pos.device).long().expand_as(layout.k_pos)
    real = layout.k_pos >= 0
    restarts = ((pos[:, 1:] < pos[:, :-1]) & real[:, 1:] & real[:, :-1]).any()
    if not bool(restarts):
        return layout
    pos = torch.where(real, pos, -1)
    return KeyLayout(q_pos=pos, k_pos=pos, q_start=0, written=layout.written, allowed=layout.allowed,
                     source=layout.source)


def custom_mask(attention_mask: torch.Tensor, b: int, hq: int, nq: int, nk: int) -> torch.Tensor:
    """A caller's 4D mask as (B, 1, q, kv) bool (True = may attend), for every shape stock sdpa/eager honour the
    same way.

    Accepted: bool, or additive float whose entries are 0 (attend) or at most half the dtype's minimum / -inf
    (blocked); dims broadcastable to (B, Hq, q, kv) with every head alike. Raises CompressError naming the mask for
    anything else: other ranks, a kv length that is not the call's, per-head masks that differ between heads (the
    plan's kernels take one key set per sample), or an additive mask with finite biases (not a key set at all)."""
    shape = tuple(attention_mask.shape)
    if attention_mask.ndim != 4 or shape[-1] != nk or shape[0] not in (1, b) or shape[1] not in (1, hq) \
            or shape[2] not in (1, nq):
        raise CompressError(f"compress attention: a mask of shape {shape} for a call of batch {b}, {hq} query heads, "
                            f"{nq} queries and {nk} keys; expected a 2D padding mask or a 4D (B|1, 1|Hq, q|1, kv) mask")
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    elif attention_mask.is_floating_point():
        blocked = attention_mask <= torch.finfo(attention_mask.dtype).min / 2
        if bool(((attention_mask != 0) & ~blocked).any()):
            raise CompressError("compress attention: an additive 4D mask with finite biases (entries other than 0 and "
                                "-inf / the dtype's minimum) adds scores rather than choosing keys; a plan cannot "
                                "honour it — pass a bool mask, or run the model without the plan")
        allowed = ~blocked
    else:
        raise CompressError(f"compress attention: a 4D mask of dtype {attention_mask.dtype}; expected bool or float")
    if shape[1] > 1:
        if not bool((allowed == allowed[:, :1]).all()):
            raise CompressError("compress attention: a 4D mask that differs between heads; the plan takes one mask "
                                "for all heads of a sample")
        allowed = allowed[:, :1]
    return allowed.expand(b, 1, nq, nk)


def call_layout(attention_mask, query, key, position_ids=None) -> KeyLayout:
    """The :class:`KeyLayout` of one call: from our mask builder, a plain causal call, or a caller's 4D mask.

    A 4D mask given by the caller (bool, or additive float) is intersected with the plan. Its real keys are the
    slots the mask lets a token see of itself (queries == keys: the diagonal; with a past: the slots the newest
    query sees), so pads a 4D mask hides are pads here too — not counted in N0 nor in positions. Positions are
    the call's ``position_ids`` for real tokens when queries and keys are the same tokens (packed documents then
    keep their own sinks), else the count of real slots before each one.
    """
    b, nq, nk = query.shape[0], query.shape[2], key.shape[2]
    layout = getattr(attention_mask, "compress_layout", None)
    if layout is not None:
        return _packed_positions(layout, position_ids)
    dev = query.device
    if attention_mask is None:
        k_pos = torch.arange(nk, device=dev).expand(b, nk)
        return KeyLayout(q_pos=k_pos[:, nk - nq :], k_pos=k_pos, q_start=nk - nq, written=nk, source="plain")
    allowed = custom_mask(attention_mask, b, query.shape[1], nq, nk)
    real = allowed[:, 0].diagonal(dim1=-2, dim2=-1) if nq == nk else allowed[:, 0, -1, :]  # (B, kv)
    k_pos = torch.where(real, real.long().cumsum(-1) - 1, -1)
    if position_ids is not None and nq == nk:
        k_pos = torch.where(real, position_ids.to(dev).long().expand(b, nk), -1)
    return KeyLayout(q_pos=k_pos[:, nk - nq :], k_pos=k_pos, q_start=nk - nq, written=nk, allowed=allowed,
                     source="custom")
