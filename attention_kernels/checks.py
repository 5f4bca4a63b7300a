"""Argument checks shared by every kernel (prefill: reference, banded, Triton; decode: reference, Triton split-K).

Each raises ``ValueError`` naming the offending tensor, shape or dtype, and returns the geometry it validated.
"""

from __future__ import annotations

import torch

PREFILL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_prefill_args(q, k, v, sink, span) -> tuple[int, int, int, int, int]:
    """Validate prefill inputs shared by every kernel; returns (B, Hq, Hkv, N, D)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v, sink, span)):
        raise ValueError("q, k, v, sink and span must all be tensors")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    b, hq, n, d = q.shape
    bk, hkv, nk, dk = k.shape
    if (bk, nk, dk) != (b, n, d):
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, length or head_dim")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.dtype not in PREFILL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {list(PREFILL_DTYPES)}; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("sink", sink), ("span", span)):
        if t.shape != (hq,) or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of shape ({hq},); got {t.dtype} {tuple(t.shape)}")
    return b, hq, hkv, n, d


def check_decode_args(q, k_cache, v_cache, kv_len) -> tuple[int, int, int, int, int]:
    """Validate decode inputs; returns (B, Hq, Hkv, Lmax, D)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k_cache, v_cache, kv_len)):
        raise ValueError("q, k_cache, v_cache and kv_len must all be tensors")
    if q.ndim != 3 or k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q (B, Hq, D) and k_cache/v_cache (B, Hkv, Lmax, D) of one shape; got "
            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    b, hq, d = q.shape
    bk, hkv, lmax, dk = k_cache.shape
    if (bk, dk) != (b, d):
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if kv_len.shape != (b, hkv) or kv_len.dtype.is_floating_point or kv_len.dtype == torch.bool:
        raise ValueError(f"kv_len must be an integer tensor of shape ({b}, {hkv}); got {kv_len.dtype} {tuple(kv_len.shape)}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"q and caches must be on one device; got {q.device}, {k_cache.device}, {v_cache.device}")
    if q.dtype not in DECODE_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q and caches must share one floating dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    return b, hq, hkv, lmax, d



__all__ = ["check_prefill_args", "check_decode_args", "PREFILL_DTYPES", "DECODE_DTYPES"]
