"""Pick the attention implementation for a call.

``COMPRESS_ATTENTION`` (read on every call) forces one: ``reference`` (the masked-SDPA oracle), ``banded``
(CPU SDPA composition) or ``triton``; unset, empty or ``auto`` means Triton for CUDA tensors and banded on the
CPU. Decode: ``triton`` the split-K kernel, ``banded`` one SDPA call over the valid slots
(:func:`attention_kernels.cpu_decode.sdpa_decode`), ``reference`` the fp32 oracle ``decode_reference``. Triton modules are imported lazily, so ``TRITON_INTERPRET`` can still be set before the
first Triton call.
"""

from __future__ import annotations

import os

import torch

ENV = "COMPRESS_ATTENTION"
CHOICES = ("auto", "reference", "banded", "triton")


def backend(q: torch.Tensor) -> str:
    """The backend a call on ``q`` will use: one of reference / banded / triton."""
    choice = os.environ.get(ENV, "").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "auto":
        return "triton" if q.is_cuda else "banded"
    return choice


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    span: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal sink+window prefill: q (B, Hq, N, D), k/v (B, Hkv, N, D), sink/span (Hq,) -> (B, Hq, N, D)."""
    which = backend(q)
    if which == "reference":
        from attention_kernels.checks import check_prefill_args
        from attention_kernels.reference import reference_attention

        check_prefill_args(q, k, v, sink, span)
        return reference_attention(q, k, v, sink, span, scale)
    if which == "triton":
        from attention_kernels.triton_prefill import sparse_prefill

        return sparse_prefill(q, k, v, sink, span, scale)
    from attention_kernels.banded import banded_attention

    return banded_attention(q, k, v, sink, span, scale)


def sparse_attention_padded(q, k, v, sink, span, k_valid, scale=None) -> torch.Tensor:
    """A padded batch (any padding: left, right, mixed lengths) of a prefill without past tokens: each sample's
    real tokens (``k_valid`` (B, N), queries == keys) are gathered and go through :func:`sparse_attention` with
    that sample's own ``sink``/``span`` (B, Hq); pad query rows are zero. Memory stays O(N) per sample: no
    (N, N) mask is built.

    Positions are counted among real tokens, as in the reference (``reference_attention`` with positions).
    """
    b, _, n, _ = q.shape
    out = q.new_zeros(q.shape)
    for i in range(b):
        idx = k_valid[i].nonzero().flatten()
        if idx.numel() == 0:
            continue
        if idx.numel() == n:
            out[i : i + 1] = sparse_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], sink[i], span[i], scale)
            continue
        lo = int(idx[0])
        if int(idx[-1]) - lo + 1 == idx.numel():  # contiguous (left or right padding): views, no copy
            sl = slice(lo, lo + idx.numel())
            out[i : i + 1, :, sl] = sparse_attention(q[i : i + 1, :, sl], k[i : i + 1, :, sl], v[i : i + 1, :, sl],
                                                     sink[i], span[i], scale)
            continue
        pick = lambda t: t[i : i + 1].index_select(2, idx)  # noqa: E731
        out[i : i + 1, :, idx] = sparse_attention(pick(q), pick(k), pick(v), sink[i], span[i], scale)
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step: q (B, Hq, D), caches (B, Hkv, Lmax, D), kv_len (B, Hkv) valid slots (a prefix of each
    head's slots; only those are read) -> (B, Hq, D)."""
    return _decode_with(backend(q), q, k_cache, v_cache, kv_len, scale)


def _decode_with(which: str, q, k_cache, v_cache, kv_len, scale) -> torch.Tensor:
    if which == "triton":
        from attention_kernels.triton_decode import sparse_decode

        return sparse_decode(q, k_cache, v_cache, kv_len, scale)
    if which == "banded":
        from attention_kernels.cpu_decode import sdpa_decode

        return sdpa_decode(q, k_cache, v_cache, kv_len, scale)
    from attention_kernels.reference import decode_reference

    return decode_reference(q, k_cache, v_cache, kv_len, scale)


def decode_attention_prefix(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_valid: int,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`decode_attention` when every head of every sequence holds the same ``n_valid`` valid slots (a full
    ring, a dense group without padding): q (B, Hq, D), caches (B, Hkv, Lmax, D) -> (B, Hq, D). On the CPU one
    SDPA call over ``[:n_valid]`` with no mask and no per-call checks (the decode step's fixed cost)."""
    which = backend(q)
    if which != "banded":
        kv_len = torch.full(k_cache.shape[:2], n_valid, dtype=torch.long, device=q.device)
        return _decode_with(which, q, k_cache, v_cache, kv_len, scale)
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.view(b, hkv, hq // hkv, d), k_cache[:, :, :n_valid], v_cache[:, :, :n_valid], scale=scale)
    return out.view(b, hq, d)


__all__ = ["sparse_attention", "sparse_attention_padded", "decode_attention", "decode_attention_prefix", "backend",
           "ENV"]
