"""The reference (oracle) attention: per-head sink+window masking over dense SDPA.

Slow and memory-hungry (it builds the (B, Hq, q, k) mask) but obviously right; tests compare every fast
kernel against it and `COMPRESS_ATTENTION=reference` selects it at run time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attention_kernels.checks import check_decode_args
from attention_kernels.options import KeyPositions, ScoreOptions
from plans.span import sees, sees_or_selected, split_span_tensor, visibility_mask


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv*n_rep, L, D), HF's contiguous grouping (query head h uses KV head h // n_rep)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def pattern_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor,
    sink: torch.Tensor,
    span: torch.Tensor,
    native_window: int | None = None,
    allowed: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool (B, H, q, k): query at real position q_pos sees key at real position k_pos under (sink, span).

    ``selected`` (B, H, k) bool marks keys a head keeps by content selection (visible to every later query,
    :func:`plans.span.sees_or_selected`; None: none).

    q_pos (B, q), k_pos (B, k) are positions among real tokens; k_valid (B, k) marks real keys;
    sink/span are (B, H) or (H,) int tensors. ``native_window`` (a model's own sliding window, HF semantics
    i - j < native_window) and ``allowed`` (B or 1, 1, q, k) bool (a custom mask from the caller) are intersected
    with the pattern. Rows with no visible key (padding queries) may see every real key, so SDPA never produces NaN.
    """
    b = q_pos.shape[0]
    sink = sink.expand(b, -1) if sink.ndim == 1 else sink
    span = span.expand(b, -1) if span.ndim == 1 else span
    sink_eff, window = split_span_tensor(sink, span)
    i, j = q_pos[:, None, :, None], k_pos[:, None, None, :]
    se, w = sink_eff[:, :, None, None], window[:, :, None, None]
    seen = sees(i, j, se, w) if selected is None else sees_or_selected(i, j, se, w, selected[:, :, None, :])
    ok = k_valid[:, None, None, :] & seen
    if native_window is not None:
        ok = ok & (i - j < native_window)
    if allowed is not None:
        ok = ok & allowed
    empty = ~ok.any(-1, keepdim=True)
    return ok | (empty & k_valid[:, None, None, :])


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    score: ScoreOptions = ScoreOptions(),
) -> torch.Tensor:
    """Softmax attention of q (B, H, q, D) over k/v (B, H, k, D) (already repeated) under a bool ``mask``
    (B, H, q, k) -> (B, H, q, D).

    The model features of transformers' eager functions (:class:`attention_kernels.options.ScoreOptions`):
    ``softcap`` (Gemma2: ``cap * tanh(s / cap)`` on the logits before masking), ``s_aux`` (H,) learned
    attention-sink logits (gpt-oss: one extra column in the softmax denominator, dropped afterwards), ``dropout``
    on the probabilities (training only; HF passes 0 in eval); ``native_window`` is not read here (it is part of
    ``mask``). Without softcap and s_aux this is one ``F.scaled_dot_product_attention`` call.
    """
    if score.softcap is None and score.s_aux is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=score.dropout)
    return attention_probabilities(q, k, mask, scale, score) @ v


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float | None = None,
                            score: ScoreOptions = ScoreOptions()) -> torch.Tensor:
    """The softmax weights (B, H, q, k) of q (B, H, q, D) over k (B, H, k, D) under a bool ``mask`` (B, H, q, k),
    as transformers' eager attention returns them (0 where masked; ``score`` as in :func:`masked_attention`,
    whose output is these weights times v)."""
    softcap, s_aux, dropout = score.softcap, score.s_aux, score.dropout
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    if s_aux is not None:
        b, h, nq, _ = s.shape
        s = torch.cat([s, s_aux.to(s.dtype).reshape(1, h, 1, 1).expand(b, h, nq, 1)], dim=-1)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    if s_aux is not None:
        p = p[..., :-1]
    if dropout:
        p = F.dropout(p, p=dropout, training=True)
    return p


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    span: torch.Tensor,
    scale: float | None = None,
    *,
    positions: KeyPositions = KeyPositions(),
    score: ScoreOptions = ScoreOptions(),
) -> torch.Tensor:
    """q (B, Hq, q, D), k/v (B, Hkv, k, D) un-repeated -> (B, Hq, q, D).

    ``positions.selected`` (B, Hkv, k) bool: keys each KV head keeps by content selection, shared by its query
    heads (:func:`pattern_mask`).

    Without ``positions``, queries are the last q of k contiguous tokens (plain causal prefill / decode).
    ``positions.allowed`` and ``score`` (native window, softcap, s_aux, dropout): see :func:`pattern_mask` and
    :func:`masked_attention`.
    """
    q_pos, k_pos, k_valid = positions.q_pos, positions.k_pos, positions.k_valid
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    if k_valid is None:
        k_valid = torch.ones(b, nk, dtype=torch.bool, device=q.device)
    if k_pos is None:
        k_pos = torch.arange(nk, device=q.device).expand(b, nk)
    if q_pos is None:
        q_pos = k_pos[:, nk - nq :]
    n_rep = hq // k.shape[1]
    selected = positions.selected
    if selected is not None:
        selected = repeat_kv(selected[..., None], n_rep)[..., 0].to(q.device)
    mask = pattern_mask(q_pos, k_pos, k_valid, sink.to(q.device), span.to(q.device), score.native_window,
                        positions.allowed, selected)
    return masked_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, scale, score)


def decode_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Plain-torch decode (fp32 matmul + masked softmax): q (B, Hq, D) -> (B, Hq, D).

    Only slots below the batch's largest ``kv_len`` are read; those past a head's own length must be finite.
    A head with ``kv_len == 0`` returns zeros.
    """
    b, hq, hkv, lmax, d = check_decode_args(q, k_cache, v_cache, kv_len)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    kv_len = kv_len.to(q.device)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    lim = min(int(kv_len.max()), lmax) if kv_len.numel() else 0
    if lim <= 0 or hq == 0:
        return q.new_zeros(q.shape)
    k, v = k_cache[:, :, :lim].to(cdt), v_cache[:, :, :lim].to(cdt)
    qg = q.reshape(b, hkv, hq // hkv, d).to(cdt)
    s = torch.matmul(qg, k.transpose(-1, -2)) * scale  # (B, Hkv, G, lim)
    valid = torch.arange(lim, device=q.device) < kv_len[:, :, None, None]
    s = s.masked_fill_(~valid, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num_(0.0)
    return torch.matmul(p, v).reshape(b, hq, d).to(q.dtype)


__all__ = ["decode_reference", "reference_attention", "masked_attention", "pattern_mask", "repeat_kv", "visibility_mask"]
