"""Decode step (one new query token per sequence) over a compressed KV cache: split-K flash-decoding in Triton.

Stage 1, grid ``(B * Hkv, NUM_SPLITS)``: each program takes one KV head and all of its query heads (GQA: the
group's queries share every K/V load), splits that head's valid slots ``[0, kv_len[b, h])`` into
``NUM_SPLITS`` equal chunks and writes a normalised partial output plus its log2-sum-exp.
Stage 2, grid ``(B * Hq,)``: merges the splits. Slot order does not matter (RoPE is applied before caching).
``attention_kernels.reference.decode_reference`` is the plain-torch oracle and CPU path. Works under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from attention_kernels.checks import check_decode_args

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (BLOCK_N, num_warps, num_stages) per head_dim: spill-free for bf16 on sm_90 (AOT-checked in the tests)
DECODE_CONFIGS = {64: (64, 4, 2), 128: (64, 8, 2), 256: (32, 8, 2)}


# Kernels call only Triton builtins: tl.max/tl.sum/tl.zeros/tl.cdiv are @jit functions that stay in compiled
# mode when triton was imported before TRITON_INTERPRET=1 was set (e.g. by transformers), which breaks the
# interpreter. Reductions use tl.reduce with the standard combine functions (the interpreter's numpy fast path).
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _decode_split_kernel(
    Q, K, V, KV_LEN, MID_O, MID_L,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    n_kv_heads, group, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    off_b = pid_bh // n_kv_heads
    off_kv = pid_bh % n_kv_heads
    kv_len = tl.load(KV_LEN + pid_bh)
    per_split = (kv_len + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)
    heads = off_kv * group + offs_g  # query heads of this KV head
    q_ptrs = Q + off_b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_g[:, None] < group, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_kv * stride_kh
    v_base = V + off_b * stride_vb + off_kv * stride_vh

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, HEAD_DIM], 0.0, tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + offs_n0
        valid = offs_n < hi
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = tl.where(valid[None, :], qk * qk_scale, -1.0e6)
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (off_b * n_kv_heads * group + heads) * NUM_SPLITS + split  # MID_L is (B, Hq, NUM_SPLITS)
    tl.store(MID_O + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=offs_g[:, None] < group)
    tl.store(MID_L + row, lse, mask=offs_g < group)


@triton.jit
def _decode_merge_kernel(MID_O, MID_L, O, stride_ob, stride_oh, n_heads,
                         HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    off_b = pid // n_heads
    off_h = pid % n_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < NUM_SPLITS
    lse = tl.load(MID_L + pid * NUM_SPLITS + offs_s, mask=ok, other=float("-inf"))
    part = tl.load(MID_O + (pid * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    m = tl.reduce(lse, 0, _MAX)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    total = tl.reduce(w, 0, _SUM)
    out = tl.reduce(part * w[:, None], 0, _SUM) / tl.where(total > 0, total, 1.0)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_d, out.to(O.dtype.element_ty))


def default_num_splits(batch_kv_heads: int, lmax: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, chunks of at least 256 slots, at most 64 splits."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    want = triton.cdiv(2 * sms, max(batch_kv_heads, 1))
    return int(max(1, min(want, triton.cdiv(lmax, 256), 64)))


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Split-K flash-decoding: q (B, Hq, D), caches (B, Hkv, Lmax, D), kv_len (B, Hkv) -> (B, Hq, D)."""
    b, hq, hkv, lmax, d = check_decode_args(q, k_cache, v_cache, kv_len)
    if q.dtype not in _DTYPES:
        raise ValueError(f"sparse_decode supports fp16/bf16/fp32, got {q.dtype}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    cfg_n, cfg_w, cfg_s = DECODE_CONFIGS.get(d, (64, 4, 2))
    block_n, num_warps = block_n or cfg_n, num_warps or cfg_w
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if not INTERPRET and not q.is_cuda:
        raise ValueError("sparse_decode needs CUDA tensors (or TRITON_INTERPRET=1 set before importing kernels)")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    if b == 0 or hq == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    kv_len = kv_len.to(device=q.device, dtype=torch.int32).clamp(0, lmax).contiguous()
    splits = num_splits or default_num_splits(b * hkv, lmax, q.device)
    group = hq // hkv
    mid_o = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    mid_l = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, kv_len, mid_o, mid_l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        hkv, group, float(scale) * 1.4426950408889634,
        HEAD_DIM=d, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, NUM_SPLITS=splits,
        IEEE=q.dtype == torch.float32, UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=cfg_s,
    )
    _decode_merge_kernel[(b * hq,)](
        mid_o, mid_l, out, out.stride(0), out.stride(1), hq,
        HEAD_DIM=d, NUM_SPLITS=splits, BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4,
    )
    return out


__all__ = ["sparse_decode", "default_num_splits", "DECODE_CONFIGS"]
