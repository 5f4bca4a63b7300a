"""Decode step on the CPU (or any device without Triton): one SDPA call over the valid slots only.

The query heads of a KV head attend as one (B, Hkv, G, D) block against that head's slots (no ``repeat_kv``
copy), and only slots below the batch's largest ``kv_len`` are read; the mask is skipped when every head holds
the same number of valid slots (a ring that is full, a dense group without padding). This is the CPU backend of
:func:`attention_kernels.dispatch.decode_attention`; :func:`attention_kernels.reference.decode_reference` is its oracle.

    >>> q = torch.randn(1, 6, 16); k = torch.randn(1, 2, 40, 16); v = torch.randn(1, 2, 40, 16)
    >>> sdpa_decode(q, k, v, torch.tensor([[40, 25]])).shape
    torch.Size([1, 6, 16])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attention_kernels.checks import check_decode_args


def sdpa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: torch.Tensor,
                scale: float | None = None) -> torch.Tensor:
    """q (B, Hq, D), caches (B, Hkv, Lmax, D), kv_len (B, Hkv) valid slots (a prefix of each head's slots)
    -> (B, Hq, D) in q's dtype. A head with ``kv_len == 0`` returns zeros. Raises ValueError on bad shapes."""
    b, hq, hkv, lmax, d = check_decode_args(q, k_cache, v_cache, kv_len)
    kv_len = kv_len.to(q.device).clamp(0, lmax)
    lim = int(kv_len.max()) if kv_len.numel() else 0
    if lim == 0 or hq == 0:
        return q.new_zeros(q.shape)
    qg = q.reshape(b, hkv, hq // hkv, d)
    k, v = k_cache[:, :, :lim], v_cache[:, :, :lim]
    if bool((kv_len == lim).all()):
        return F.scaled_dot_product_attention(qg, k, v, scale=scale).reshape(b, hq, d)
    mask = torch.arange(lim, device=q.device) < kv_len[:, :, None, None]  # (B, Hkv, 1, lim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return torch.where(kv_len[:, :, None, None] > 0, out, 0.0).reshape(b, hq, d)


__all__ = ["sdpa_decode"]
