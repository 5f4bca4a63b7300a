"""MoA's first-order attention influence, streamed: no layer's N x N matrix is ever held.

For one sample with loss L, a layer, a query head, A = softmax(Q K^T * scale) (causal, plus any native sliding
window) and G = dL/dA = dO V^T, the first-order loss change of masking entry (i, j) and renormalising row i is

    dL_ij = -A_ij (G_ij - D_i) / (1 - A_ij + eps),     D_i = sum_k A_ik G_ik   (FlashAttention's D = rowsum(dO * O))

with row 0 special-cased to -A_00 G_00 (A_00 = 1 there) and ``eps`` the float32 machine epsilon (as MoA).
The profile stores |dL_ij| (MoA's ``take_abs``) summed per (layer, head) into distance buckets
``b = (i - j) // block`` (``dist``) and, for each sink size S, the same restricted to keys j < S (``sinkdist``).

How it is streamed (see /work/shared/reference/hf-integration.md section 4):

* :func:`profile_attention` is registered with ``transformers.AttentionInterface`` (and ``sdpa_mask`` with
  ``AttentionMaskInterface``, so windowed layers get their real mask) under :data:`PROFILE_ATTN`.
  The forward is a plain ``F.scaled_dot_product_attention`` (the CPU flash kernel saves only q, k, v, out and
  the logsumexp), and a hook is registered on its output.
* In backward, when dO arrives for a layer, :func:`reduce_layer_influence` recomputes that layer's attention in
  blocks of ``row_block`` query rows (only keys < the block's last row), forms A, G, D and |dL|, reduces each
  block into per-head distance buckets with a tile trick (below) and frees it. Peak extra memory is about
  three ``heads x row_block x N`` float32 buffers for one layer (heads are chunked under ``max_block_elems``).
* Tile trick: with tiles of ``block x block`` aligned on multiples of ``block``, an entry of tile (qi, kj) at
  offsets (a, c) has i - j = (qi - kj) * block + a - c, so it falls in bucket qi - kj if a >= c, else qi - kj - 1.
  A tile therefore splits into its lower triangle (diagonal included) and its strict upper triangle; two sums per
  tile and an ``index_add`` on (tiles) give exact bucket sums without any scatter over entries.

Native sliding windows (Mistral ``sliding_window``, Qwen2 ``use_sliding_window``, Gemma3 local layers) are
respected: HF hands such layers a boolean mask, which is used both in the forward and in the recompute, so
entries outside the native window have A = 0 and zero influence. Logit soft-capping (Gemma2) and attention
sinks (``s_aux``) cannot be expressed with sdpa and are refused with a CompressError.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from plans.errors import CompressError

PROFILE_ATTN = "compress_profile"
"""Name under which :func:`profile_attention` is registered (``model.set_attn_implementation(PROFILE_ATTN)``)."""

FP32_EPS = float(torch.finfo(torch.float32).eps)
COLLECTOR_ATTR = "_compress_profile_collector"
DEFAULT_MAX_BLOCK_ELEMS = 1 << 24  # elements of one (heads x rows x keys) float32 work buffer (64 MiB)


# --------------------------------------------------------------------------------------------------------------
# The math: dense reference (small N only) and the blockwise streamed reduction


def moa_influence(A: torch.Tensor, G: torch.Tensor, eps: float = FP32_EPS, take_abs: bool = True) -> torch.Tensor:
    """Dense per-entry influence [..., N, N] from A and G = dL/dA (MoA's formula, row 0 = -A*G).

    Reference implementation for tests and small inputs: it holds N x N tensors."""
    AG = A * G
    D = AG.sum(-1, keepdim=True)
    eff = -A * (G - D) / (eps + 1 - A)
    eff[..., 0, :] = -AG[..., 0, :]
    return eff.abs() if take_abs else eff


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
    multiples of ``block`` and zeros wherever j > i. E is modified (its strict upper tile triangles are zeroed)."""
    h, r, c = E.shape
    rt, ct = r // block, c // block
    E5 = E.view(h, rt, block, ct, block)
    tot = E5.sum(dim=(2, 4))  # [H, rt, ct]
    tril = torch.ones(block, block, dtype=torch.bool, device=E.device).tril_()
    E5.mul_(tril.view(1, 1, block, 1, block))
    low = E5.sum(dim=(2, 4))  # a >= c: bucket qi - kj
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


@torch.no_grad()
def reduce_layer_influence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    scaling: float,
    *,
    block: int = 64,
    sink_sizes=(64,),
    row_block: int = 256,
    mask: torch.Tensor | None = None,
    eps: float = FP32_EPS,
    max_block_elems: int = DEFAULT_MAX_BLOCK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Streamed |dL| of one layer, reduced by distance: returns dist [H, nb] and sinkdist [H, nS, nb] (float64).

    ``q, k, v, do``: [H, N, D] (k and v already repeated to the query heads; ``do`` = dL/d(attention output)).
    ``mask``: optional [1 or H, N, N] boolean (True = attend) or additive float mask, applied on top of causal.
    Works on blocks of ``row_block`` query rows (rounded up to a multiple of ``block``) x keys below the block's
    last row, in float32 (float64 if the inputs are float64); heads are chunked so that one work buffer stays
    under ``max_block_elems`` elements."""
    h, n, _ = q.shape
    nb = math.ceil(n / block)
    ns = len(sink_sizes)
    acc_dev = _acc_device(q.device)
    dist = torch.zeros(h, nb, dtype=torch.float64, device=acc_dev)
    sinkdist = torch.zeros(h, ns, nb, dtype=torch.float64, device=acc_dev)
    if n == 0:
        return dist, sinkdist
    wdt = _work_dtype(q.dtype)
    npad = nb * block
    rb = max(block, math.ceil(row_block / block) * block)

    def prep(x):  # pad the sequence to a multiple of block; padded query rows get dO = 0, so zero influence
        x = x.to(wdt)
        return F.pad(x, (0, 0, 0, npad - n)) if npad > n else x.contiguous()

    qp, kp, vp, dop = prep(q), prep(k), prep(v), prep(do)
    if mask is not None:
        if mask.dim() != 3 or mask.shape[-2:] != (n, n) or mask.shape[0] not in (1, h):
            raise CompressError(f"profiling: unexpected attention mask shape {tuple(mask.shape)} for {h} heads x {n}")
        if npad > n:  # padded rows/keys: allowed (bool) / no bias (float); causal still applies
            mask = F.pad(mask, (0, npad - n, 0, npad - n), value=True if mask.dtype == torch.bool else 0.0)

    hc = max(1, min(h, max_block_elems // (rb * npad)))
    pos = torch.arange(npad, device=q.device)
    for r0 in range(0, npad, rb):
        r1 = min(npad, r0 + rb)
        causal_out = pos[r0:r1, None] < pos[None, :r1]  # j > i: not attended
        mrows = None if mask is None else mask[:, r0:r1, :r1]
        for h0 in range(0, h, hc):
            h1 = min(h, h0 + hc)
            S = torch.matmul(qp[h0:h1, r0:r1], kp[h0:h1, :r1].transpose(-1, -2)).mul_(scaling)
            if mrows is not None:
                mr = mrows if mrows.shape[0] == 1 else mrows[h0:h1]
                if mr.dtype == torch.bool:
                    S.masked_fill_(~mr, float("-inf"))
                else:
                    S.add_(mr.to(wdt))
            S.masked_fill_(causal_out, float("-inf"))
            # A = softmax(S), in place
            S.sub_(S.amax(-1, keepdim=True)).exp_()
            S.div_(S.sum(-1, keepdim=True))
            A = S
            E = torch.matmul(dop[h0:h1, r0:r1], vp[h0:h1, :r1].transpose(-1, -2))  # G = dO V^T
            E.mul_(A)  # A*G
            row0 = E[:, 0, :].clone() if r0 == 0 else None
            Dsum = E.sum(-1, keepdim=True)
            E.addcmul_(A, Dsum, value=-1.0)  # A*G - A*D
            A.neg_().add_(1.0 + eps)  # 1 - A + eps
            E.div_(A).abs_()
            del A, S
            if row0 is not None:
                E[:, 0, :] = row0.abs_()
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
    """Per-sample accumulator that the registered attention function feeds from its backward hooks.

    Attach it to a model with :meth:`attach` (sets an attribute on every attention module), run
    :meth:`begin_sample`, forward + backward with ``attn_implementation == PROFILE_ATTN``, then :meth:`end_sample`
    returns dist [L, Hq, nb] and sinkdist [L, Hq, nS, nb] for that sample (float64, CPU)."""

    def __init__(self, num_layers: int, num_heads: int, *, block: int = 64, sink_sizes=(64,), row_block: int = 256,
                 eps: float = FP32_EPS, max_block_elems: int = DEFAULT_MAX_BLOCK_ELEMS):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.block, self.sink_sizes, self.row_block = int(block), tuple(int(s) for s in sink_sizes), int(row_block)
        self.eps, self.max_block_elems = eps, max_block_elems
        self.n: int | None = None
        self._modules: list[torch.nn.Module] = []
        self.dist = self.sinkdist = None
        self.calls: dict[int, int] = {}

    # attach / detach ---------------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module) -> int:
        """Mark every module that has a ``layer_idx`` (the attention modules, and decoder layers, harmlessly)."""
        for m in model.modules():
            if hasattr(m, "layer_idx"):
                setattr(m, COLLECTOR_ATTR, self)
                self._modules.append(m)
        return len(self._modules)

    def detach(self) -> None:
        for m in self._modules:
            if getattr(m, COLLECTOR_ATTR, None) is self:
                delattr(m, COLLECTOR_ATTR)
        self._modules.clear()

    # per sample --------------------------------------------------------------------------------------------
    def begin_sample(self, n: int) -> None:
        self.n = int(n)
        nb = math.ceil(self.n / self.block)
        self.dist = torch.zeros(self.num_layers, self.num_heads, nb, dtype=torch.float64)
        self.sinkdist = torch.zeros(self.num_layers, self.num_heads, len(self.sink_sizes), nb, dtype=torch.float64)
        self.forward_calls: dict[int, int] = {}
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

    def on_forward(self, module, query, k, v, mask, scaling) -> torch.Tensor | None:
        if self.n is None:
            return None
        layer = getattr(module, "layer_idx", None)
        if layer is None or not (0 <= int(layer) < self.num_layers):
            raise CompressError(f"profiling: attention module {type(module).__name__} has layer_idx={layer!r}")
        layer = int(layer)
        b, h, nq, _ = query.shape
        if b != 1:
            raise CompressError(f"profiling runs one sample at a time (got batch {b})")
        if nq != k.shape[2] or nq != self.n:
            raise CompressError(f"profiling: layer {layer} got {nq} queries x {k.shape[2]} keys, expected {self.n} x {self.n} (no cache)")
        if h != self.num_heads:
            raise CompressError(f"profiling: layer {layer} has {h} query heads, expected {self.num_heads}")
        self.forward_calls[layer] = self.forward_calls.get(layer, 0) + 1
        m = None
        if mask is not None:
            m = mask[0] if mask.dim() == 4 else mask
            m = m.detach()
        saved = [query.detach()[0], k.detach()[0], v.detach()[0], m]

        def hook(grad):
            if not saved:
                return None
            q_, k_, v_, m_ = saved
            saved.clear()
            d, sd = reduce_layer_influence(
                q_, k_, v_, grad.detach()[0], scaling, block=self.block, sink_sizes=self.sink_sizes,
                row_block=self.row_block, mask=m_, eps=self.eps, max_block_elems=self.max_block_elems,
            )
            self.dist[layer] += d.cpu()
            self.sinkdist[layer] += sd.cpu()
            self.calls[layer] = self.calls.get(layer, 0) + 1
            return None

        return hook


def profile_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: sdpa forward; when a collector is attached to ``module`` and a sample is
    open, a hook on the output reduces this layer's influence during backward. Without a collector it is plain sdpa."""
    if kwargs.get("softcap") is not None:
        raise CompressError("profiling: attention logit soft-capping (e.g. Gemma2) is not supported by the sdpa-based profiler")
    if kwargs.get("s_aux") is not None:
        raise CompressError("profiling: attention sinks (s_aux, e.g. gpt-oss) are not supported by the profiler")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != key.shape[-2]:
        mask = mask[..., : key.shape[-2]]
    p = dropout if module.training else 0.0
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=p, scale=scaling,
        is_causal=mask is None and query.shape[2] > 1,
    )
    coll = getattr(module, COLLECTOR_ATTR, None)
    if coll is not None and out.requires_grad:
        if p:
            raise CompressError("profiling needs the model in eval mode (attention dropout is active)")
        hook = coll.on_forward(module, query, key, value, mask, float(scaling))
        if hook is not None:
            out.register_hook(hook)
    return out.transpose(1, 2).contiguous(), None


def register_profile_attention() -> str:
    """Register :func:`profile_attention` (and HF's ``sdpa_mask``) under :data:`PROFILE_ATTN`; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PROFILE_ATTN, profile_attention)
    AttentionMaskInterface.register(PROFILE_ATTN, sdpa_mask)
    return PROFILE_ATTN
