"""Pick the attention implementation for a call.

``COMPRESS_ATTENTION`` (read on every call) forces one: ``reference`` (the masked-SDPA oracle), ``banded``
(CPU SDPA composition) or ``triton``; unset, empty or ``auto`` means Triton for CUDA tensors and banded on the
CPU. Decode has no banded variant: ``reference``/``banded`` use ``decode_reference``, ``triton`` the
split-K kernel. Triton modules are imported lazily, so ``TRITON_INTERPRET`` can still be set before the
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
        from kernels.banded import check_prefill_args
        from kernels.reference import reference_attention

        check_prefill_args(q, k, v, sink, span)
        return reference_attention(q, k, v, sink, span, scale)
    if which == "triton":
        from kernels.triton_prefill import sparse_prefill

        return sparse_prefill(q, k, v, sink, span, scale)
    from kernels.banded import banded_attention

    return banded_attention(q, k, v, sink, span, scale)


def sparse_attention_left_padded(q, k, v, sink, span, k_valid, scale=None) -> torch.Tensor:
    """A left-padded batch: each sample's real tokens (a suffix, ``k_valid`` (B, N)) go through
    :func:`sparse_attention` with that sample's own ``sink``/``span`` (B, Hq); pad query rows are zero.

    Positions are counted among real tokens, as in the reference (``reference_attention`` with positions).
    """
    b, _, n, _ = q.shape
    n_real = k_valid.sum(-1)
    if not bool((k_valid == (torch.arange(n, device=q.device)[None] >= (n - n_real)[:, None])).all()):
        raise ValueError("sparse_attention_left_padded needs left padding (real tokens form a suffix)")
    out = q.new_zeros(q.shape)
    for i in range(b):
        p = n - int(n_real[i])
        if p == n:
            continue
        out[i : i + 1, :, p:] = sparse_attention(q[i : i + 1, :, p:], k[i : i + 1, :, p:], v[i : i + 1, :, p:],
                                                 sink[i], span[i], scale)
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step: q (B, Hq, D), caches (B, Hkv, Lmax, D), kv_len (B, Hkv) valid slots -> (B, Hq, D)."""
    if backend(q) == "triton":
        from kernels.triton_decode import sparse_decode

        return sparse_decode(q, k_cache, v_cache, kv_len, scale)
    from kernels.triton_decode import decode_reference

    return decode_reference(q, k_cache, v_cache, kv_len, scale)


__all__ = ["sparse_attention", "decode_attention", "backend", "ENV"]
