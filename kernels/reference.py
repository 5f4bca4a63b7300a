"""The reference (oracle) attention: per-head sink+window masking over dense SDPA.

Slow and memory-hungry (it builds the (B, Hq, q, k) mask) but obviously right; tests compare every fast
kernel against it and `COMPRESS_ATTENTION=reference` selects it at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plans.span import split_span_tensor, visibility_mask


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
) -> torch.Tensor:
    """Bool (B, H, q, k): query at real position q_pos sees key at real position k_pos under (sink, span).

    q_pos (B, q), k_pos (B, k) are positions among real tokens; k_valid (B, k) marks real keys;
    sink/span are (B, H) or (H,) int tensors. ``native_window`` (a model's own sliding window, HF semantics
    i - j < native_window) is intersected with the pattern. Rows with no visible key (padding queries) may see every real
    key, so SDPA never produces NaN.
    """
    b = q_pos.shape[0]
    sink = sink.expand(b, -1) if sink.ndim == 1 else sink
    span = span.expand(b, -1) if span.ndim == 1 else span
    sink_eff, window = split_span_tensor(sink, span)
    sink_eff, window = sink_eff[:, :, None, None], window[:, :, None, None]
    d = q_pos[:, None, :, None] - k_pos[:, None, None, :]
    kp = k_pos[:, None, None, :]
    ok = (d >= 0) & k_valid[:, None, None, :] & ((kp < sink_eff) | (d < window))
    if native_window is not None:
        ok = ok & (d < native_window)
    empty = ~ok.any(-1, keepdim=True)
    return ok | (empty & k_valid[:, None, None, :])


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    span: torch.Tensor,
    scale: float | None = None,
    *,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    native_window: int | None = None,
) -> torch.Tensor:
    """q (B, Hq, q, D), k/v (B, Hkv, k, D) un-repeated -> (B, Hq, q, D).

    Without positions, queries are the last q of k contiguous tokens (plain causal prefill / decode).
    """
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    if k_valid is None:
        k_valid = torch.ones(b, nk, dtype=torch.bool, device=q.device)
    if k_pos is None:
        k_pos = torch.arange(nk, device=q.device).expand(b, nk)
    if q_pos is None:
        q_pos = k_pos[:, nk - nq :]
    mask = pattern_mask(q_pos, k_pos, k_valid, sink.to(q.device), span.to(q.device), native_window)
    n_rep = hq // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, scale=scale)


__all__ = ["reference_attention", "pattern_mask", "repeat_kv", "visibility_mask"]
