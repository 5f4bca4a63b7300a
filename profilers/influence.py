"""MoA's first-order attention influence, streamed: no layer's N x N matrix is ever held.

For one sample with loss L, a layer, a query head, A = softmax(Q K^T * scale) (causal, plus any native sliding
window) and G = dL/dA = dO V^T, the first-order loss change of masking entry (i, j) and renormalising row i is

    dL_ij = -A_ij (G_ij - D_i) / (1 - A_ij + eps),     D_i = sum_k A_ik G_ik   (FlashAttention's D = rowsum(dO * O))

with row 0 special-cased to -A_00 G_00 (A_00 = 1 there) and ``eps`` the float32 machine epsilon (as MoA).
The profile stores |dL_ij| (MoA's ``take_abs``) summed per (layer, head) into distance buckets
``b = (i - j) // block`` (``dist``) and, for each sink size S, the same restricted to keys j < S (``sinkdist``).

How it is streamed (see docs/hf-integration.md section 4, "sdpa forward + recompute"):

* The profiling attention function (:mod:`compressor.hf.influence_attention`, registered with transformers under
  ``"compress_influence"``) runs each layer's forward as ``F.scaled_dot_product_attention`` under no_grad and saves
  only q, k, v (no N x N, no logsumexp, and no float32 copy of an explicit mask, which sdpa's own backward would
  keep per layer). It hands every layer's tensors to an :class:`InfluenceCollector` (this module, pure math).
* Its backward is the recompute: when dO arrives for a layer, :func:`reduce_layer_influence` redoes that layer's
  attention in blocks of ``row_block`` query rows (only keys < the block's last row), forms A, G = dO V^T,
  D and dS = A (G - D), and from the same block produces both the attention gradients (dq, dk, dv,
  FlashAttention-style, so sdpa's backward is not run at all) and |dL|, which it reduces into per-head distance
  buckets with a tile trick (below) before freeing the block. Peak extra memory is about two
  ``heads x row_block x N`` work buffers for one layer (heads are chunked under ``max_block_elems``).
  This is the "output hook" design of the reference, with the hook and sdpa's backward fused into one pass.
* Tile trick: with tiles of ``block x block`` aligned on multiples of ``block``, an entry of tile (qi, kj) at
  offsets (a, c) has i - j = (qi - kj) * block + a - c, so it falls in bucket qi - kj if a >= c, else qi - kj - 1.
  An in-place prefix sum along c per tile row gives both parts (value at c = a, and at c = block - 1), so bucket
  sums need one pass over the block plus an ``index_add`` over tiles: no scatter over entries.

Native sliding windows (Mistral ``sliding_window``, Qwen2 ``use_sliding_window``, Gemma3 local layers) are
respected: HF hands such layers a boolean mask, which is used both in the forward and in the recompute, so
entries outside the native window have A = 0 and zero influence. Logit soft-capping (Gemma2) and attention
sinks (``s_aux``) cannot be expressed with sdpa and are refused (by the attention function) with a CompressError.

This module knows nothing of transformers: tensors in, float64 sums out. The dense per-entry formula (small N
only) lives with the tests as their oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plans.defaults import DEFAULT_BLOCK, DEFAULT_SINK
from plans.errors import CompressError

FP32_EPS = float(torch.finfo(torch.float32).eps)
DEFAULT_MAX_BLOCK_ELEMS = 1 << 24  # elements of one (heads x rows x keys) float32 work buffer (64 MiB)


# --------------------------------------------------------------------------------------------------------------
# The math: dense bucket sums (reference reduction, small N only) and the blockwise streamed reduction


def dense_bucket_sums(E: torch.Tensor, block: int, sink_sizes=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference reduction of a dense per-entry matrix E [..., N, N] (upper triangle ignored) into
    dist [..., nb] and sinkdist [..., nS, nb] (float64), by explicit bucket ids."""
    n = E.shape[-1]
    nb = math.ceil(n / block)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    d = i - j
    valid = d >= 0
    bucket = torch.where(valid, d // block, torch.zeros_like(d))
    E = E.to(torch.float64) * valid
    lead = E.shape[:-2]
    flat = E.reshape(-1, n * n)
    dist = torch.zeros(flat.shape[0], nb, dtype=torch.float64).index_add_(1, bucket.reshape(-1), flat)
    sinks = []
    for s in sink_sizes:
        fs = (E * (j < s)).reshape(-1, n * n)
        sinks.append(torch.zeros(flat.shape[0], nb, dtype=torch.float64).index_add_(1, bucket.reshape(-1), fs))
    sd = torch.stack(sinks, 1) if sinks else torch.zeros(flat.shape[0], 0, nb, dtype=torch.float64)
    return dist.reshape(*lead, nb), sd.reshape(*lead, len(sink_sizes), nb)


def tile_bucket_sums(E: torch.Tensor, row_tile0: int, block: int, nb: int, out: torch.Tensor) -> None:
    """Add the distance-bucket sums of a row block to ``out`` [H, nb] (float64), in place.

    ``E`` [H, R, C] holds entries for query rows ``row_tile0*block + (0..R)`` and keys ``0..C``, with R and C
    multiples of ``block`` and zeros wherever j > i. E is overwritten (by its within-tile row prefix sums).

    Per tile: an in-place cumulative sum along the key offset c gives, at c = a (the tile diagonal), the sum of
    row a's entries with c <= a (bucket qi - kj), and at c = block - 1 the whole row; the difference is the
    strict upper triangle (bucket qi - kj - 1). One pass over E, then tile-sized reductions."""
    h, r, c = E.shape
    rt, ct = r // block, c // block
    E5 = E.view(h, rt, block, ct, block)
    E5.cumsum_(4)
    tot = E5[..., block - 1].sum(2)  # [H, rt, ct]
    low = torch.diagonal(E5, dim1=2, dim2=4).sum(-1)  # a >= c: bucket qi - kj
    up = tot - low  # a < c: bucket qi - kj - 1
    t = (row_tile0 + torch.arange(rt, device=E.device))[:, None] - torch.arange(ct, device=E.device)[None, :]
    t = t.reshape(-1)
    for vals, idx in ((low, t), (up, t - 1)):
        keep = (idx >= 0) & (idx < nb)
        out.index_add_(1, idx[keep].to(out.device), vals.reshape(h, -1)[:, keep].to(out.device, out.dtype))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # mps has no float64


@dataclass(frozen=True)
class ReduceOptions:
    """How :func:`reduce_layer_influence` buckets and blocks one layer's recompute.

    ``block``: tokens per distance bucket (and tile side). ``sink_sizes``: the sink lengths (tokens) whose
    key-prefix buckets are also summed (sinkdist). ``row_block``: query rows per work block (rounded up to a
    multiple of ``block``). ``eps``: the stabiliser of ``1 - A + eps`` in the influence formula.
    ``max_block_elems``: the most elements of one (heads x rows x keys) work buffer; heads are chunked under it.
    """

    block: int = DEFAULT_BLOCK
    sink_sizes: tuple[int, ...] = (DEFAULT_SINK,)
    row_block: int = 256
    eps: float = FP32_EPS
    max_block_elems: int = DEFAULT_MAX_BLOCK_ELEMS


@torch.no_grad()
def reduce_layer_influence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    scaling: float,
    *,
    mask: torch.Tensor | None = None,
    options: ReduceOptions = ReduceOptions(),
    return_grads: bool = False,
):
    """Streamed |dL| of one layer, reduced by distance: returns dist [H, nb] and sinkdist [H, nS, nb] (float64),
    plus ``(dq, dk, dv)`` [H, N, D] (input dtype) when ``return_grads`` -- the attention backward, from the same
    blocks (dS = A*(G - D): dq = dS K * scale, dk = dS^T Q * scale, dv = A^T dO), FlashAttention style.

    ``q, k, v, do``: [H, N, D] (k and v already repeated to the query heads; ``do`` = dL/d(attention output)).
    ``mask``: optional [1 or H, N, N] boolean (True = attend) or additive float mask, applied on top of causal.
    Works on blocks of ``row_block`` query rows (rounded up to a multiple of ``block``) x keys below the block's
    last row, in float32 (float64 if the inputs are float64); heads are chunked so that one work buffer stays
    under ``max_block_elems`` elements (``options``: :class:`ReduceOptions`)."""
    block, sink_sizes, row_block = options.block, options.sink_sizes, options.row_block
    eps, max_block_elems = options.eps, options.max_block_elems
    h, n, _ = q.shape
    nb = math.ceil(n / block)
    ns = len(sink_sizes)
    acc_dev = _acc_device(q.device)
    dist = torch.zeros(h, nb, dtype=torch.float64, device=acc_dev)
    sinkdist = torch.zeros(h, ns, nb, dtype=torch.float64, device=acc_dev)
    if n == 0:
        return (dist, sinkdist, (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))) if return_grads else (dist, sinkdist)
    wdt = _work_dtype(q.dtype)
    npad = nb * block
    rb = max(block, math.ceil(row_block / block) * block)

    def prep(x):  # pad the sequence to a multiple of block; padded query rows get dO = 0, so zero influence
        x = x.to(wdt)
        return F.pad(x, (0, 0, 0, npad - n)) if npad > n else x.contiguous()

    qp, kp, vp, dop = prep(q) * scaling, prep(k), prep(v), prep(do)  # softmax scale folded into (a copy of) q
    if mask is not None:
        if mask.dim() != 3 or mask.shape[-2:] != (n, n) or mask.shape[0] not in (1, h):
            raise CompressError(f"profiling: unexpected attention mask shape {tuple(mask.shape)} for {h} heads x {n}")
        if npad > n:  # padded rows/keys: allowed (bool) / no bias (float); causal still applies
            mask = F.pad(mask, (0, npad - n, 0, npad - n), value=True if mask.dtype == torch.bool else 0.0)

    if return_grads:
        dq, dk, dv = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
    hc = max(1, min(h, max_block_elems // (rb * npad)))
    diag_out = torch.ones(rb, rb, dtype=torch.bool, device=q.device).triu_(1)  # j > i inside the diagonal square
    for r0 in range(0, npad, rb):
        r1 = min(npad, r0 + rb)
        nr = r1 - r0
        mrows = None if mask is None else mask[:, r0:r1, :r1]
        for h0 in range(0, h, hc):
            h1 = min(h, h0 + hc)
            S = torch.matmul(qp[h0:h1, r0:r1], kp[h0:h1, :r1].transpose(-1, -2))
            if mrows is not None:
                mr = mrows if mrows.shape[0] == 1 else mrows[h0:h1]
                if mr.dtype == torch.bool:
                    S.masked_fill_(~mr, float("-inf"))
                else:
                    S.add_(mr.to(wdt))
            S[:, :, r0:r1].masked_fill_(diag_out[:nr, :nr], float("-inf"))  # keys < r0 are all causal
            A = torch.softmax(S, dim=-1)
            E = torch.matmul(dop[h0:h1, r0:r1], vp[h0:h1, :r1].transpose(-1, -2), out=S)  # G = dO V^T
            del S
            E.mul_(A)  # A*G
            row0 = E[:, 0, :].clone() if r0 == 0 else None
            Dsum = E.sum(-1, keepdim=True)  # D_i = sum_k A_ik G_ik
            E.addcmul_(A, Dsum, value=-1.0)  # A*G - A*D = dS (softmax backward)
            if return_grads:
                dv[h0:h1, :r1].add_(torch.matmul(A.transpose(-1, -2), dop[h0:h1, r0:r1]))
                dq[h0:h1, r0:r1].add_(torch.matmul(E, kp[h0:h1, :r1]), alpha=scaling)
                dk[h0:h1, :r1].add_(torch.matmul(E.transpose(-1, -2), qp[h0:h1, r0:r1]))  # qp carries the scale
            E.div_(A.sub_(1.0 + eps)).abs_()  # |(A*G - A*D) / (1 - A + eps)|
            del A
            if row0 is not None:
                E[:, 0, :] = row0.abs_()  # row 0: |A*G| (MoA)
            for si, s in enumerate(sink_sizes):
                sp = min(r1, math.ceil(s / block) * block)
                if sp <= 0:
                    continue
                Es = E[:, :, :sp].clone()
                if s < sp:
                    Es[:, :, s:] = 0
                tile_bucket_sums(Es, r0 // block, block, nb, sinkdist[h0:h1, si])
                del Es
            tile_bucket_sums(E, r0 // block, block, nb, dist[h0:h1])
            del E
    if return_grads:
        return dist, sinkdist, (dq[:, :n].to(q.dtype), dk[:, :n].to(k.dtype), dv[:, :n].to(v.dtype))
    return dist, sinkdist


def kv_aggregate(t: torch.Tensor, num_kv_heads: int, head_dim: int = 1) -> torch.Tensor:
    """Sum query heads into their KV heads (HF contiguous grouping: kv head = q head // (Hq // Hkv))."""
    hq = t.shape[head_dim]
    if hq % num_kv_heads:
        raise CompressError(f"{hq} query heads do not split into {num_kv_heads} KV heads")
    shape = list(t.shape)
    shape[head_dim : head_dim + 1] = [num_kv_heads, hq // num_kv_heads]
    return t.reshape(shape).sum(head_dim + 1)


# --------------------------------------------------------------------------------------------------------------
# Collection over a model forward/backward


class InfluenceCollector:
    """Per-sample accumulator that the profiling attention function feeds, layer by layer, from its backward.

    :meth:`begin_sample` opens a sample; for each layer's attention call the attention function asks
    :meth:`check_forward` (validates shapes, returns the layer index) and, in the backward, hands the layer's
    q, k, v, dO to :meth:`reduce`; :meth:`end_sample` returns dist [L, Hq, nb] and sinkdist [L, Hq, nS, nb] for
    that sample (float64, CPU). Attaching it to a model is the job of :mod:`compressor.hf.influence_attention`."""

    def __init__(self, num_layers: int, num_heads: int, *, block: int = DEFAULT_BLOCK, sink_sizes=(DEFAULT_SINK,), row_block: int = 256,
                 eps: float = FP32_EPS, max_block_elems: int = DEFAULT_MAX_BLOCK_ELEMS):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.block, self.sink_sizes, self.row_block = int(block), tuple(int(s) for s in sink_sizes), int(row_block)
        self.eps, self.max_block_elems = eps, max_block_elems
        self.n: int | None = None
        self.dist = self.sinkdist = None
        self.calls: dict[int, int] = {}
        self.forward_calls: dict[int, int] = {}

    # per sample --------------------------------------------------------------------------------------------
    def begin_sample(self, n: int) -> None:
        self.n = int(n)
        nb = math.ceil(self.n / self.block)
        self.dist = torch.zeros(self.num_layers, self.num_heads, nb, dtype=torch.float64)
        self.sinkdist = torch.zeros(self.num_layers, self.num_heads, len(self.sink_sizes), nb, dtype=torch.float64)
        self.forward_calls = {}
        self.calls = {}

    def end_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [i for i in range(self.num_layers) if self.calls.get(i, 0) == 0]
        if missing:
            seen = sorted(self.forward_calls)
            raise CompressError(
                f"profiling: no attention influence was recorded for layers {missing} "
                f"(the profiling attention ran for layers {seen}); this model's attention does not all route "
                "through transformers' AttentionInterface, or those layers get no gradient"
            )
        twice = [i for i, c in self.calls.items() if c > 1]
        if twice:
            raise CompressError(f"profiling: layers {twice} ran attention more than once per forward (shared layers?)")
        out = (self.dist, self.sinkdist)
        self.dist = self.sinkdist = None
        self.n = None
        return out

    def check_forward(self, layer, query, key, source: str = "attention module") -> int | None:
        """Validate one attention call of the open sample (``layer``: the caller's layer index, ``source``: who
        calls, for messages; ``query`` [1, Hq, N, D], ``key`` [1, H, N, D]); returns the layer index as an int
        (None when no sample is open)."""
        if self.n is None:
            return None
        if layer is None or not (0 <= int(layer) < self.num_layers):
            raise CompressError(f"profiling: {source} has layer_idx={layer!r}")
        layer = int(layer)
        b, h, nq, _ = query.shape
        if b != 1:
            raise CompressError(f"profiling runs one sample at a time (got batch {b})")
        if nq != key.shape[2] or nq != self.n:
            raise CompressError(f"profiling: layer {layer} got {nq} queries x {key.shape[2]} keys, expected {self.n} x {self.n} (no cache)")
        if h != self.num_heads:
            raise CompressError(f"profiling: layer {layer} has {h} query heads, expected {self.num_heads}")
        self.forward_calls[layer] = self.forward_calls.get(layer, 0) + 1
        return layer

    def reduce(self, layer: int, q, k, v, do, scaling, mask, return_grads: bool):
        """Run the blockwise recompute for one layer ([H, N, D] inputs) and add it to the sample's sums."""
        res = reduce_layer_influence(
            q, k, v, do, scaling, mask=mask, return_grads=return_grads, options=ReduceOptions(
                block=self.block, sink_sizes=self.sink_sizes, row_block=self.row_block, eps=self.eps,
                max_block_elems=self.max_block_elems,
            ),
        )
        self.dist[layer] += res[0].cpu()
        self.sinkdist[layer] += res[1].cpu()
        self.calls[layer] = self.calls.get(layer, 0) + 1
        return res[2] if return_grads else None
