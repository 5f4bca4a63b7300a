"""Block-sparse sink+window prefill as a FlashAttention-style Triton kernel.

Grid ``(cdiv(N, BLOCK_M), B * Hq)``. Each program loads its head's ``sink_eff``/``window`` and visits only

* the sink key blocks ``[0, n_sink)`` (masked), then
* the window key blocks ``[ws, we)``: a masked left edge ``[ws, fl)``, an unmasked interior ``[fl, fh)`` and a
  masked diagonal ``[fh, we)`` (``_kv_block_range``; ``kv_block_range_py`` is its pure-Python mirror).

The query head maps to KV head ``h // (Hq // Hkv)`` inside the kernel (GQA without repeating K/V).
Works under ``TRITON_INTERPRET=1`` on CPU tensors (set it before importing this module): bf16 is upcast to
fp32 after loading there, and autotuning is bypassed. fp32 inputs use exact ("ieee") dots.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from attention_kernels.banded import head_pattern
from attention_kernels.checks import check_prefill_args
from attention_kernels.options import PrefillLaunch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Autotune list: (BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim. bf16 on sm_90 compiles with STACK == 0
# (no register spills; checked with cuobjdump by tests/test_kernels_triton.py).
CONFIGS = {
    64: [(128, 64, 8, 3), (64, 32, 4, 2), (64, 64, 4, 3)],
    128: [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2)],
    256: [(64, 16, 8, 2), (32, 32, 4, 2)],
}
DEFAULT_BLOCKS = (64, 32)  # (BLOCK_M, BLOCK_N) used under the interpreter and for head dims without configs


# Kernels call only Triton builtins: tl.max/tl.sum/tl.zeros/tl.cdiv are @jit functions that stay in compiled
# mode when triton was imported before TRITON_INTERPRET=1 was set (e.g. by transformers), which breaks the
# interpreter. Reductions use tl.reduce with the standard combine functions (the interpreter's numpy fast path).
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _kv_block_range(q_lo, n_ctx, S, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block ranges for query rows [q_lo, q_lo + BLOCK_M): (n_sink, ws, fl, fh, we), see module doc."""
    q_hi = tl.minimum(q_lo + BLOCK_M, n_ctx)
    we = (q_hi + BLOCK_N - 1) // BLOCK_N
    n_sink = tl.minimum((S + BLOCK_N - 1) // BLOCK_N, we)
    ws = tl.minimum(tl.maximum(tl.maximum(q_lo - W + 1, 0) // BLOCK_N, n_sink), we)
    fl = tl.minimum(tl.maximum((tl.maximum(q_lo + BLOCK_M - W, 0) + BLOCK_N - 1) // BLOCK_N, ws), we)
    fh = tl.minimum(tl.maximum((q_lo + 1) // BLOCK_N, fl), we)
    return n_sink, ws, fl, fh, we


def kv_block_range_py(q_lo: int, n_ctx: int, s: int, w: int, block_m: int, block_n: int) -> tuple[int, ...]:
    """Pure-Python mirror of ``_kv_block_range``."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    q_hi = min(q_lo + block_m, n_ctx)
    we = cdiv(q_hi, block_n)
    n_sink = min(cdiv(s, block_n), we)
    ws = min(max(max(q_lo - w + 1, 0) // block_n, n_sink), we)
    fl = min(max(cdiv(max(q_lo + block_m - w, 0), block_n), ws), we)
    fh = min(max((q_lo + 1) // block_n, fl), we)
    return n_sink, ws, fl, fh, we


@triton.jit
def _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, lo0, len0, lo1, len1, lo2, count,
            n_ctx, S, W, qk_scale,
            BLOCK_N: tl.constexpr, MASK: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax accumulation over `count` key blocks: lo0 + [0, len0), then lo1 + [0, len1), then lo2 + ...;
    MASK applies the sink/window/causal/length mask."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for t in range(0, count):
        blk = tl.where(t < len0, lo0 + t, tl.where(t < len0 + len1, lo1 + t - len0, lo2 + t - len0 - len1))
        offs_n = blk * BLOCK_N + offs_n0
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASK:
            k = tl.load(k_ptrs, mask=offs_n[None, :] < n_ctx, other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            qk = tl.dot(q, k, input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = qk * qk_scale
        if MASK:
            d = offs_m[:, None] - offs_n[None, :]
            ok = (d >= 0) & ((offs_n[None, :] < S) | (d < W)) & (offs_n[None, :] < n_ctx)
            qk = tl.where(ok, qk, -1.0e6)  # finite: a row with no valid key in a block gives no NaN
        m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < n_ctx, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if UPCAST:
            v = v.to(tl.float32)
        if IEEE:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    Q, K, V, O, SINK, WIN,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    n_ctx, n_heads, group, qk_scale, N_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // n_heads
    off_h = pid_bh % n_heads
    off_kv = off_h // group
    S = tl.load(SINK + off_h)
    W = tl.load(WIN + off_h)

    q_lo = pid_m * BLOCK_M
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < n_ctx, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_kv * stride_kh
    v_base = V + off_b * stride_vb + off_kv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)

    n_sink, ws, fl, fh, we = _kv_block_range(q_lo, n_ctx, S, W, BLOCK_M, BLOCK_N)
    # masked blocks: sink [0, n_sink), left edge [ws, fl), diagonal [fh, we); then the unmasked interior [fl, fh)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                            0, n_sink, ws, fl - ws, fh, n_sink + (fl - ws) + (we - fh),
                            n_ctx, S, W, qk_scale, BLOCK_N, True, IEEE, UPCAST)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d,
                            fl, fh - fl, 0, 0, 0, fh - fl,
                            n_ctx, S, W, qk_scale, BLOCK_N, False, IEEE, UPCAST)

    out = acc / l_i[:, None]
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < n_ctx)


@triton.jit
def _probe_kernel(OUT, SINK, WIN, n_ctx, n_heads, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the 5 block-range numbers per (query block, head): tests the index math without any dot."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    S = tl.load(SINK + h)
    W = tl.load(WIN + h)
    r0, r1, r2, r3, r4 = _kv_block_range(pid_m * BLOCK_M, n_ctx, S, W, BLOCK_M, BLOCK_N)
    base = OUT + (pid_m * n_heads + h) * 5
    tl.store(base + 0, r0)
    tl.store(base + 1, r1)
    tl.store(base + 2, r2)
    tl.store(base + 3, r3)
    tl.store(base + 4, r4)


def probe_block_ranges(sink_eff: torch.Tensor, window: torch.Tensor, n_ctx: int, block_m: int, block_n: int,
                       device="cpu") -> torch.Tensor:
    """Run ``_probe_kernel``: (cdiv(N, BLOCK_M), H, 5) int32 block ranges."""
    h = sink_eff.numel()
    nm = triton.cdiv(n_ctx, block_m)
    out = torch.empty(nm, h, 5, dtype=torch.int32, device=device)
    s = sink_eff.to(device=device, dtype=torch.int32)
    w = window.to(device=device, dtype=torch.int32)
    _probe_kernel[(nm, h)](out, s, w, n_ctx, h, BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def _prune(configs, nargs, **kwargs):
    d = kwargs.get("HEAD_DIM", nargs.get("HEAD_DIM"))
    want = CONFIGS.get(d)
    if want is None:
        return configs[:1]
    keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in want]
    return keep or configs[:1]


_ALL_CONFIGS = sorted({c for cs in CONFIGS.values() for c in cs})
_prefill_autotuned = None
if not INTERPRET:
    _prefill_autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _ALL_CONFIGS],
        key=["HEAD_DIM", "N_BUCKET"],
        prune_configs_by={"early_config_prune": _prune},
    )(_prefill_kernel)


def sparse_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    span: torch.Tensor,
    scale: float | None = None,
    *,
    launch: PrefillLaunch = PrefillLaunch(),
) -> torch.Tensor:
    """Causal sink+window prefill: q (B, Hq, N, D), k/v (B, Hkv, N, D), sink/span (Hq,) -> (B, Hq, N, D).

    ``launch`` (:class:`~attention_kernels.options.PrefillLaunch`): block sizes default to autotuning on a GPU and
    to ``DEFAULT_BLOCKS`` under the interpreter.
    """
    block_m, block_n, num_warps, num_stages = launch.block_m, launch.block_n, launch.num_warps, launch.num_stages
    b, hq, hkv, n, d = check_prefill_args(q, k, v, sink, span)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"sparse_prefill supports fp16/bf16/fp32, got {q.dtype}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    if not INTERPRET and not q.is_cuda:
        raise ValueError("sparse_prefill needs CUDA tensors (or TRITON_INTERPRET=1 set before importing kernels)")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if n == 0 or b == 0:
        return out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    s_eff, win = head_pattern(sink.to(q.device), span.to(q.device), n)
    s_eff, win = s_eff.to(torch.int32), win.to(torch.int32)
    args = (
        q, k, v, out, s_eff, win,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        n, hq, hq // hkv, float(scale) * 1.4426950408889634, triton.next_power_of_2(n),
    )
    flags = dict(HEAD_DIM=d, IEEE=q.dtype == torch.float32, UPCAST=INTERPRET and q.dtype == torch.bfloat16)
    if block_m is None and block_n is None and _prefill_autotuned is not None:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * hq)  # noqa: E731
        _prefill_autotuned[grid](*args, **flags)
    else:
        bm = block_m or DEFAULT_BLOCKS[0]
        bn = block_n or DEFAULT_BLOCKS[1]
        if bn < 16 or bm < 16 or bm & (bm - 1) or bn & (bn - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {bm}, {bn}")
        _prefill_kernel[(triton.cdiv(n, bm), b * hq)](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=num_warps, num_stages=num_stages
        )
    return out


__all__ = ["sparse_prefill", "kv_block_range_py", "probe_block_ranges", "CONFIGS", "INTERPRET"]
