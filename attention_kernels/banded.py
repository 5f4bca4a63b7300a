"""CPU sink+window prefill: the native C kernel where it builds, else a composition of SDPA calls.

The native kernel (:mod:`attention_kernels.native_cpu`, ``csrc/sink_window_cpu.c``) takes every head of an
fp32 / bf16 / fp16 call in one pass per 16-row block over the gathered sink + window keys. The composition
("banded_v2", docs/cpu-kernels.md §3) is the fallback (no C compiler, fp64, ``kernel="sdpa"``). For one head
with ``sink_eff = S`` and ``window = W`` (``span = S + W``, semantics in ``plans/span.py``):

1. rows ``[0, span)`` see every earlier key: one causal SDPA call on that prefix;
2. rows ``[span, N)``, windows below ``CHUNK_SWITCH``: query blocks of ``Bq`` rows, one call over a zero-copy
   ``as_strided`` view giving each block its ``W + Bq - 1`` window keys with one shared band mask, plus one
   unmasked call over the ``S`` sink keys, merged through the log-sum-exp:
   ``out = lerp(o_win, o_sink, sigmoid(lse_sink - lse_win))``;
3. rows ``[span, N)``, larger windows: chunks of ``CHUNK`` rows split into a causal diagonal, an unmasked
   middle, a small masked edge and the sink (big tiles, almost no masking), merged the same way.

Heads with the same ``(S, W)`` are processed together (as head views when their indices form arithmetic
progressions, so GQA never materialises repeated K/V). Heads with ``span >= N`` use causal SDPA; tiny inputs
(``N < SMALL_N``) use one masked SDPA call. Everything is exact, near-full heads included (for span/N above
~0.75 the composition runs at about dense speed; there is no inexact dense shortcut). bf16/fp16 are computed
in fp32 (no faster on the CPU, and exact merges), on both paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attention_kernels.checks import check_prefill_args
from attention_kernels.native_cpu import sink_window_prefill
from plans.span import split_span_tensor

SMALL_N = 128  # below this length one masked SDPA call over all heads is faster than the composition
BQ_SMALL = 32  # query block for windows < BQ_SWITCH (the CPU flash kernel's q tile is 32 below 192 rows)
BQ_LARGE = 64  # query block for windows in [BQ_SWITCH, CHUNK_SWITCH)
BQ_SWITCH = 512
CHUNK_SWITCH = 4096  # windows >= this use the chunked decomposition (mostly unmasked big-tile calls)
CHUNK = 256  # rows per chunk there
SLICE_ROWS = 32768  # windowed path: query rows x heads per slice of work (keeps partial results in cache)

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_COMPUTE_DTYPE = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}
_band_cache: dict[tuple, torch.Tensor] = {}


def head_pattern(sink: torch.Tensor, span: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (sink_eff, window) as int64 tensors; full heads (span >= n) become (0, n)."""
    span = span.to(torch.int64)
    sink_eff, window = split_span_tensor(sink.to(torch.int64), span)
    full = span >= n
    return torch.where(full, 0, sink_eff), torch.where(full, max(n, 1), window)


def _band(bq: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (bq, w + bq - 1) mask: row r sees columns [r, r + w - 1] (keys q0-w+1+c for query q0+r)."""
    key = (bq, w, dtype)
    m = _band_cache.get(key)
    if m is None:
        r = torch.arange(bq)[:, None]
        c = torch.arange(w + bq - 1)[None, :]
        m = torch.zeros(bq, w + bq - 1, dtype=dtype).masked_fill_((c < r) | (c > r + w - 1), float("-inf"))
        if len(_band_cache) > 64:
            _band_cache.clear()
        _band_cache[key] = m
    return m


def _runs(heads: list[int], n_rep: int) -> list[tuple[int, int, int, int, int]]:
    """Split sorted query heads into runs where q and kv head indices are both arithmetic progressions.

    Returns (q_start, q_step, kv_start, kv_step, count) so every run is a strided view of q/k/v/out.
    """
    out = []
    i = 0
    while i < len(heads):
        j = i + 1
        qs = kvs = None
        while j < len(heads):
            dq, dkv = heads[j] - heads[j - 1], heads[j] // n_rep - heads[j - 1] // n_rep
            if qs is None:
                qs, kvs = dq, dkv
            elif (dq, dkv) != (qs, kvs):
                break
            j += 1
        out.append((heads[i], qs or 1, heads[i] // n_rep, kvs or 0, j - i))
        i = j
    return out


def _heads(x: torch.Tensor, start: int, step: int, count: int) -> torch.Tensor:
    """Head view x[start::step][:count] of a (H, N, D) tensor; step 0 repeats one head without copying."""
    h, n, d = x.shape
    return x.as_strided((count, n, d), (step * x.stride(0), x.stride(1), x.stride(2)), x.storage_offset() + start * x.stride(0))


def _windowed(q, k, v, out, s: int, w: int, scale: float) -> None:
    """Rows [s + w, N) of one (S, W) head run; q/k/v/out are (hg, N, D) views (k/v may repeat a head).

    Query blocks are processed in slices of about SLICE_ROWS rows x heads, so the window part, the sink part
    and their merge stay in cache.
    """
    hg, n, d = q.shape
    span = s + w
    rows = n - span
    bq = BQ_SMALL if w < BQ_SWITCH else BQ_LARGE
    nb, tail = divmod(rows, bq)
    band = _band(bq, w, q.dtype)
    step = max(1, SLICE_ROWS // (bq * hg))

    def part(r0: int, nblk: int, m: int, mask) -> None:
        """Rows [span + r0, span + r0 + nblk * m) as nblk blocks of m rows."""
        q0 = span + r0
        qb = q[:, q0 : q0 + nblk * m].unflatten(1, (nblk, m)).transpose(0, 1)  # (nblk, hg, m, D)
        shape = (nblk, hg, w + m - 1, d)
        kb, vb = (
            t.as_strided(shape, (m * t.stride(1), t.stride(0), t.stride(1), t.stride(2)),
                         t.storage_offset() + (q0 - w + 1) * t.stride(1))
            for t in (k, v)
        )
        o, lse = _flash_cpu(qb, kb, vb, attn_mask=mask, scale=scale)
        dst = out[:, q0 : q0 + nblk * m].unflatten(1, (nblk, m)).transpose(0, 1)
        if not s:
            dst.copy_(o)
            return
        o_s, l_s = _flash_cpu(q[None, :, q0 : q0 + nblk * m], k[None, :, :s], v[None, :, :s], scale=scale)
        o_s = o_s[0].unflatten(1, (nblk, m)).transpose(0, 1)
        l_s = l_s[0].unflatten(1, (nblk, m)).transpose(0, 1)
        wgt = torch.sigmoid_(l_s - lse).unsqueeze_(-1).to(o.dtype)
        torch.lerp(o, o_s, wgt, out=dst)

    for b0 in range(0, nb, step):
        part(b0 * bq, min(step, nb - b0), bq, band)
    if tail:
        part(nb * bq, 1, tail, band[:tail, : w + tail - 1].contiguous())


def _edge_mask(c: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (c, c) mask: row r sees columns l >= r (the left edge of a chunk's window)."""
    key = ("edge", c, dtype)
    m = _band_cache.get(key)
    if m is None:
        m = torch.zeros(c, c, dtype=dtype).masked_fill_(torch.arange(c)[None, :] < torch.arange(c)[:, None], float("-inf"))
        _band_cache[key] = m
    return m


def _merge(parts, dst) -> None:
    """dst = softmax-weighted combination of partial results [(out, lse), ...] over disjoint key sets."""
    m = parts[0][1]
    for _, lse in parts[1:]:
        m = torch.maximum(m, lse)
    ws = [torch.exp(lse - m) for _, lse in parts]
    den = ws[0]
    for x in ws[1:]:
        den = den + x
    torch.mul(parts[0][0], (ws[0] / den).unsqueeze_(-1).to(dst.dtype), out=dst)
    for (o, _), x in zip(parts[1:], ws[1:]):
        dst.addcmul_(o, (x / den).unsqueeze_(-1).to(dst.dtype))


def _chunked(q, k, v, out, s: int, w: int, scale: float) -> None:
    """Rows [s + w, N) for a large window, in chunks of C = CHUNK rows (C < w). Per chunk starting at c0:
    keys [c0, c0+C) causal, [c0+C-w+1, c0) unmasked, [c0-w+1, c0-w+1+C) with a (C, C) edge mask, plus the sink;
    every call runs big tiles and only the edge is masked."""
    hg, n, d = q.shape
    c = CHUNK
    span = s + w
    rows = n - span
    nc, tail = divmod(rows, c)
    dst = out[:, span:]
    if s:
        o_s, l_s = _flash_cpu(q[None, :, span:], k[None, :, :s], v[None, :, :s], scale=scale)
        o_s, l_s = o_s[0], l_s[0]

    def run(q0: int, m: int, nb: int, sl: slice, view) -> None:
        qv = q[:, q0 : q0 + nb * m].unflatten(1, (nb, m)).transpose(0, 1)  # (nb, hg, m, D)

        def kv(start: int, length: int):
            return (
                t.as_strided((nb, hg, length, d), (c * t.stride(1), t.stride(0), t.stride(1), t.stride(2)),
                             t.storage_offset() + start * t.stride(1))
                for t in (k, v)
            )

        edge = _edge_mask(c, q.dtype)[:m]
        parts = [
            _flash_cpu(qv, *kv(q0, m), is_causal=True, scale=scale),
            _flash_cpu(qv, *kv(q0 - w + 1, c), attn_mask=edge if m == c else edge.contiguous(), scale=scale),
        ]
        if w - c - 1 > 0:
            parts.append(_flash_cpu(qv, *kv(q0 + c - w + 1, w - c - 1), scale=scale))
        if s:
            parts.append((view(o_s[:, sl]), view(l_s[:, sl])))
        _merge(parts, view(dst[:, sl]))

    if nc:
        run(span, c, nc, slice(0, nc * c), lambda t: t.unflatten(1, (nc, c)).transpose(0, 1))
    if tail:
        run(span + nc * c, tail, 1, slice(nc * c, rows), lambda t: t[None])


def _small(q, k, v, sink_eff, window, scale, n_rep) -> torch.Tensor:
    """One masked SDPA call over all heads (tiny N)."""
    n = q.shape[2]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    se, w = sink_eff[:, None, None], window[:, None, None]
    mask = (j <= i) & ((j < se) | (i - j < w))
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: torch.Tensor,
    span: torch.Tensor,
    scale: float | None = None,
    *,
    kernel: str = "auto",
) -> torch.Tensor:
    """Causal sink+window prefill on the CPU: q (B, Hq, N, D), k/v (B, Hkv, N, D), sink/span (Hq,) -> (B, Hq, N, D).

    ``kernel``: ``native`` the C kernel of :mod:`attention_kernels.native_cpu` (one pass per 16-row block over
    the gathered sink + window keys), ``sdpa`` the SDPA composition described above, ``auto`` native when it
    built on this machine, else sdpa (measured per window in ``benchmarks/results/kernels_cpu.md``: native is
    faster at every window and for full heads). Raises ValueError for bad arguments or ``kernel="native"``
    where the kernel is not available.
    """
    if kernel not in ("auto", "native", "sdpa"):
        raise ValueError(f"kernel={kernel!r} is not one of auto, native, sdpa")
    b, hq, hkv, n, d = check_prefill_args(q, k, v, sink, span)
    if q.device.type != "cpu" or k.device.type != "cpu" or v.device.type != "cpu":
        raise ValueError("banded_attention runs on CPU tensors; use attention_kernels.triton_prefill.sparse_prefill on a GPU")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    scale = float(scale)
    n_rep = hq // hkv
    out_dtype = q.dtype
    cdt = _COMPUTE_DTYPE[q.dtype]
    if n == 0 or b == 0 or d == 0:
        return q.new_zeros(q.shape)
    sink_eff, window = head_pattern(sink.cpu(), span.cpu(), n)
    if kernel != "sdpa" and cdt == torch.float32:
        out = sink_window_prefill(q, k, v, sink_eff, window, scale)
        if out is not None:
            return out.to(out_dtype)
        if kernel == "native":
            raise ValueError("kernel='native': the native CPU kernel is not available on this machine (no C compiler?)")
    q, k, v = (t.to(cdt) for t in (q, k, v))
    if n < SMALL_N:
        return _small(q, k, v, sink_eff, window, scale, n_rep).to(out_dtype)

    # group heads by (sink_eff, window); full heads (window == n) use causal SDPA
    groups: dict[tuple[int, int], list[int]] = {}
    for h, (s, w) in enumerate(zip(sink_eff.tolist(), window.tolist())):
        groups.setdefault((s, w) if w < n else (0, n), []).append(h)
    out = torch.empty(b, hq, n, d, dtype=cdt)
    for (s, w), heads in groups.items():
        span_h = min(s + w, n)
        for q0, qstep, kv0, kvstep, cnt in _runs(heads, n_rep):
            for bi in range(b):
                qh = _heads(q[bi], q0, qstep, cnt)
                kh = _heads(k[bi], kv0, kvstep, cnt)
                vh = _heads(v[bi], kv0, kvstep, cnt)
                oh = _heads(out[bi], q0, qstep, cnt)
                oh[:, :span_h] = F.scaled_dot_product_attention(
                    qh[None, :, :span_h], kh[None, :, :span_h], vh[None, :, :span_h], is_causal=True, scale=scale
                )[0]
                if span_h < n:
                    (_chunked if w >= CHUNK_SWITCH else _windowed)(qh, kh, vh, oh, s, w, scale)
    return out.to(out_dtype)


__all__ = ["banded_attention", "head_pattern"]
