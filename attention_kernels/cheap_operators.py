"""Cheap attention operators for heterogeneous per-head plans (MPCViT): linear "scaling" attention and ReLU-softmax.

Pure tensor functions, no model knowledge. Layout as everywhere in ``kernels``: q (B, Hq, nq, D), k/v
(B, Hkv, nk, D) **un-repeated**, query head h uses KV head ``h // (Hq // Hkv)`` (HF's contiguous grouping);
outputs are (B, Hq, nq, Dv). Queries are the last ``nq`` of the ``nk`` keys (plain causal prefill, a later
chunk, or decode).

Linear (scaling) attention, causal::

    o_i = sum_{j <= i, j real} (q_i . k_j * scale) v_j / c_i,      c_i = #{real keys j <= i}   (= i + 1 unpadded)

It reassociates as ``q_i S_i * scale / c_i`` with ``S_i = sum_{j<=i} k_j^T v_j`` (D x Dv), so
:func:`linear_attention` costs O(N D Dv) plus an O(N C D) intra-chunk part: query rows are processed in chunks of
``C`` rows with a running D x Dv state per KV head (shared by its query group), and inside a chunk the causal
part is the explicit C x C product. Decode needs only that state and the count: :class:`LinearState`,
:func:`linear_decode_step`. Padding: pass ``k_valid`` (B, nk) bool; pad keys then contribute nothing (they are
zeroed inside) and the divisor counts real keys only. Index order is the causal order, which equals real-position
order for left (or right) padding; rows with no visible real key (pad queries) output 0.
:func:`linear_attention_quadratic` is the explicit masked O(N^2) form (the test oracle).

ReLU-softmax (MPCViT)::

    p_ij = relu(s_ij) / (sum_{k allowed} relu(s_ik) + eps),   s = q k^T * scale

over the allowed keys of a boolean mask (True = attend; None = causal), the same key set a softmax head of the
same pattern would use. :func:`relu_softmax_attention` processes query rows in chunks so only a
(B, Hq, chunk, nk) block is alive. All functions are differentiable (plain torch ops); half precision is computed
in float32 and cast back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attention_kernels.reference import repeat_kv

DEFAULT_CHUNK = 128  # rows per intra-chunk block of the linear operator
RELU_EPS = 1e-6
RELU_ROW_CHUNK = 512  # query rows per block of relu_softmax_attention


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected 4-D q/k/v (B, H, N, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
        raise ValueError(f"q/k/v shapes disagree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not split into {hkv} KV heads")
    if nq > nk:
        raise ValueError(f"{nq} queries but only {nk} keys (queries are the last nq keys)")
    return b, hq, hkv, nq, nk


def _valid(k_valid: torch.Tensor | None, b: int, nk: int, device) -> torch.Tensor | None:
    if k_valid is None:
        return None
    k_valid = k_valid.to(device=device, dtype=torch.bool)
    if k_valid.shape != (b, nk):
        k_valid = k_valid.expand(b, nk)
    return None if bool(k_valid.all()) else k_valid


# --------------------------------------------------------------------------------------------------------------
# linear (scaling) attention


@dataclass
class LinearState:
    """Decode state of linear attention: ``S`` (B, Hkv, D, Dv) = sum of k_j^T v_j over the real keys seen so far and
    ``count`` (B,) = how many real keys that is. Float32 (float64 for float64 inputs) whatever the model dtype."""

    S: torch.Tensor
    count: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None, *,
              dtype: torch.dtype = torch.float32, device=None) -> "LinearState":
        dt = _compute_dtype(dtype)
        return cls(torch.zeros(batch, kv_heads, head_dim, value_dim or head_dim, dtype=dt, device=device),
                   torch.zeros(batch, dtype=dt, device=device))

    @classmethod
    def from_prefill(cls, k: torch.Tensor, v: torch.Tensor, k_valid: torch.Tensor | None = None) -> "LinearState":
        """The state after a prefill of keys k/v (B, Hkv, N, D) (pads marked False in ``k_valid`` (B, N))."""
        b, _, n, _ = k.shape
        dt = _compute_dtype(k.dtype)
        kc, vc = k.to(dt), v.to(dt)
        valid = _valid(k_valid, b, n, k.device)
        if valid is not None:
            kc = kc * valid[:, None, :, None]
            count = valid.sum(-1).to(dt)
        else:
            count = torch.full((b,), float(n), dtype=dt, device=k.device)
        return cls(torch.matmul(kc.transpose(-1, -2), vc), count)

    def nbytes(self) -> int:
        return self.S.numel() * self.S.element_size() + self.count.numel() * self.count.element_size()


def _linear_core(q, k, v, scale, valid, S, count, chunk):
    """Chunked causal linear attention for queries = all of k's rows, starting from state (S, count).

    q (B, Hkv, G, N, D), k/v (B, Hkv, N, D) in the compute dtype, valid (B, N) bool or None; returns
    (out (B, Hkv, G, N, Dv), S, count)."""
    b, hkv, g, n, d = q.shape
    outs = []
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        qc, kc, vc = q[..., c0:c1, :], k[:, :, c0:c1], v[:, :, c0:c1]
        m = c1 - c0
        causal = torch.ones(m, m, dtype=torch.bool, device=q.device).tril_()
        if valid is not None:
            vm = valid[:, c0:c1]  # (B, m)
            kc = kc * vm[:, None, :, None]
            cnt = count[:, None] + vm.to(q.dtype).cumsum(-1)  # (B, m)
        else:
            cnt = count[:, None] + torch.arange(1, m + 1, dtype=q.dtype, device=q.device)[None, :]
        # inter-chunk: q_i S ; intra-chunk: tril(q_i k_j^T) v_j   (kc already has pads zeroed)
        inter = torch.matmul(qc, S[:, :, None])  # (B, Hkv, G, m, Dv)
        sc = torch.matmul(qc, kc[:, :, None].transpose(-1, -2))  # (B, Hkv, G, m, m)
        sc = sc.masked_fill(~causal, 0.0)
        intra = torch.matmul(sc, vc[:, :, None])
        den = cnt.clamp(min=1.0)[:, None, None, :, None]
        outs.append((inter + intra) * (scale / den))
        S = S + torch.matmul(kc.transpose(-1, -2), vc)
        count = cnt[:, -1]
    return torch.cat(outs, dim=3), S, count


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    k_valid: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    return_state: bool = False,
):
    """Causal scaling attention ``o_i = sum_{j<=i} (q_i.k_j*scale) v_j / c_i`` in O(N D^2) (chunked, see module doc).

    q (B, Hq, nq, D), k/v (B, Hkv, nk, D) un-repeated; queries are the last nq keys. ``k_valid`` (B, nk) bool
    marks real keys (pads contribute nothing, the divisor counts real keys). ``scale`` defaults to D^-0.5.
    With ``return_state`` also returns the :class:`LinearState` after all nk keys (for decoding)."""
    b, hq, hkv, nq, nk = _check(q, k, v)
    g = hq // hkv
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    dt = _compute_dtype(q.dtype)
    valid = _valid(k_valid, b, nk, q.device)
    kc, vc = k.to(dt), v.to(dt)
    off = nk - nq
    state = LinearState.from_prefill(kc[:, :, :off], vc[:, :, :off], None if valid is None else valid[:, :off])
    qc = q.to(dt).reshape(b, hkv, g, nq, d)
    out, S, count = _linear_core(qc, kc[:, :, off:], vc[:, :, off:], scale,
                                 None if valid is None else valid[:, off:], state.S, state.count, max(1, int(chunk)))
    out = out.reshape(b, hq, nq, v.shape[-1]).to(q.dtype)
    return (out, LinearState(S, count)) if return_state else out


def linear_attention_quadratic(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    k_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The explicit masked O(N^2) form of :func:`linear_attention` (oracle): same arguments and semantics."""
    b, hq, hkv, nq, nk = _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dt = _compute_dtype(q.dtype)
    g = hq // hkv
    kk, vv = repeat_kv(k.to(dt), g), repeat_kv(v.to(dt), g)
    s = torch.matmul(q.to(dt), kk.transpose(-1, -2)) * scale  # (B, Hq, nq, nk)
    i = torch.arange(nk - nq, nk, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    allowed = (j <= i)[None, None]
    if k_valid is not None:
        allowed = allowed & k_valid.to(device=q.device, dtype=torch.bool)[:, None, None, :]
    s = s.masked_fill(~allowed, 0.0)
    cnt = allowed.sum(-1, keepdim=True).to(dt).clamp(min=1.0)
    return (torch.matmul(s, vv) / cnt).to(q.dtype)


def linear_decode_step(
    state: LinearState,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    *,
    k_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Append new keys and attend: q (B, Hq, T, D) or (B, Hq, D), k/v (B, Hkv, T, D) or (B, Hkv, D) -> (output of
    the same rank as q, the new state). T = 1 is a decode step; T > 1 a later prefill chunk (causal inside it).
    ``k_valid`` (B, T) marks real new tokens (False: a pad, which adds nothing and outputs 0 if nothing is seen).
    The state is not modified in place (autograd-safe); use the returned one."""
    squeeze = q.ndim == 3
    if squeeze:
        q, k, v = q[:, :, None], k[:, :, None], v[:, :, None]
    b, hq, hkv, nq, nk = _check(q, k, v)
    if nq != nk:
        raise ValueError(f"decode step: {nq} queries but {nk} new keys (they must match)")
    g = hq // hkv
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    dt = state.S.dtype
    valid = _valid(k_valid, b, nk, q.device)
    out, S, count = _linear_core(q.to(dt).reshape(b, hkv, g, nq, d), k.to(dt), v.to(dt), scale, valid,
                                 state.S, state.count, max(1, nq))
    out = out.reshape(b, hq, nq, v.shape[-1]).to(q.dtype)
    return (out[:, :, 0] if squeeze else out), LinearState(S, count)


def head_subset(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v restricted to the query heads ``heads`` (sorted list or tensor of indices), GQA kept where possible:
    when ``heads`` is a union of whole groups, k/v are the matching KV heads (no copy of the group); otherwise k/v
    are repeated per selected head (MHA layout). The results go straight into the operators of this module."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    idx = torch.as_tensor(heads, dtype=torch.long, device=q.device).reshape(-1)
    kv_of = idx // g
    kv_heads = torch.unique_consecutive(kv_of)
    whole = idx.numel() == kv_heads.numel() * g and bool(
        (idx == (kv_heads[:, None] * g + torch.arange(g, device=q.device)[None, :]).reshape(-1)).all())
    if whole:
        return q[:, idx], k[:, kv_heads], v[:, kv_heads]
    return q[:, idx], k[:, kv_of], v[:, kv_of]


# --------------------------------------------------------------------------------------------------------------
# ReLU-softmax


def relu_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    eps: float = RELU_EPS,
    *,
    row_chunk: int = RELU_ROW_CHUNK,
) -> torch.Tensor:
    """``relu(s) / (sum_allowed relu(s) + eps) @ v`` with s = q k^T * scale (MPCViT's ReLU-softmax).

    q (B, Hq, nq, D), k/v (B, Hkv, nk, D) un-repeated. ``mask``: bool, broadcastable to (B, Hq, nq, nk), True =
    attend (e.g. :func:`attention_kernels.reference.pattern_mask`); None = causal with queries the last nq keys.
    A row whose allowed scores are all <= 0 outputs 0."""
    b, hq, hkv, nq, nk = _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dt = _compute_dtype(q.dtype)
    g = hq // hkv
    kk, vv = repeat_kv(k.to(dt), g), repeat_kv(v.to(dt), g)
    qc = q.to(dt)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError("relu_softmax_attention: mask must be boolean (True = attend)")
        if mask.ndim != 4:
            raise ValueError(f"relu_softmax_attention: mask must be 4-D (B|1, H|1, nq, nk), got {tuple(mask.shape)}")
    outs = []
    rc = max(1, int(row_chunk))
    for r0 in range(0, nq, rc):
        r1 = min(nq, r0 + rc)
        s = torch.matmul(qc[:, :, r0:r1], kk.transpose(-1, -2)) * scale
        if mask is None:
            i = torch.arange(nk - nq + r0, nk - nq + r1, device=q.device)[:, None]
            allowed = torch.arange(nk, device=q.device)[None, :] <= i
        else:
            allowed = mask[:, :, r0:r1].to(q.device)
        p = torch.relu(s).masked_fill(~allowed, 0.0)
        p = p / (p.sum(-1, keepdim=True) + eps)
        outs.append(torch.matmul(p, vv))
    return torch.cat(outs, dim=2).to(q.dtype)


__all__ = [
    "LinearState", "linear_attention", "linear_attention_quadratic", "linear_decode_step", "relu_softmax_attention",
    "head_subset",
]
