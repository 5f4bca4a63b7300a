"""Content selection for heads that keep sink + window + ``k`` selected blocks: SnapKV's rule, block by block.

SnapKV (Li et al. 2024, arXiv 2404.14469, section 4): the last ``m`` prompt rows, the observation window, vote
for the keys they attend to, and the votes are smoothed by a 1-D pooling so whole neighbourhoods are kept. Here,
per KV head: ``votes_j = sum over observation rows r and the KV group's query heads of softmax_j(q_r . k_j *
scale)`` (causal: row r sees keys up to its own position), max-pooled over ``pool`` keys; a block of ``block``
keys scores the sum of its keys' votes, and the head keeps its ``k`` best blocks among those not already inside
the sink or the last prompt row's window. The cost is one (m x N) score matrix per query head (never N x N).

Example::

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 1, 256, 16, generator=g)
    >>> k[0, 0, 100] = 4 * q[0, :, -1].sum(0)          # a key the last rows ask for
    >>> votes = snapkv_votes(q[:, :, -4:], k)
    >>> sel = select_blocks(votes, 1, 32, torch.tensor([4]), torch.tensor([64]))
    >>> sel[0, 0].nonzero().flatten().tolist()          # block 3 holds key 100
    [3]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOL = 7  # SnapKV's pooling width over keys


def snapkv_votes(q_obs: torch.Tensor, k: torch.Tensor, scale: float | None = None, pool: int = POOL) -> torch.Tensor:
    """Per-key votes (B, Hkv, N) fp32 of the observation rows q_obs (B, Hq, m, D), the last m of the N prompt
    rows, over k (B, Hkv, N, D) un-repeated (query head h belongs to KV head ``h // (Hq / Hkv)``).

    Raises ValueError when the shapes do not fit (m > N, Hq not a multiple of Hkv, head dims differ).
    """
    b, hq, m, d = q_obs.shape
    hkv, n = k.shape[1], k.shape[2]
    if k.ndim != 4 or k.shape[0] != b or k.shape[3] != d or hq % max(hkv, 1) or m > n:
        raise ValueError(f"q_obs {tuple(q_obs.shape)} and k {tuple(k.shape)} do not fit (m <= N, Hq = g * Hkv)")
    scale = d**-0.5 if scale is None else scale
    rep = hq // hkv
    s = q_obs.float().reshape(b, hkv, rep * m, d) @ k.float().transpose(-1, -2) * scale  # (B, Hkv, rep*m, N)
    pos = (n - m + torch.arange(m, device=k.device)).repeat(rep)  # position of each row
    s = s.masked_fill(torch.arange(n, device=k.device)[None, :] > pos[:, None], float("-inf"))
    votes = torch.softmax(s, dim=-1).sum(dim=-2)
    if pool > 1:
        votes = F.max_pool1d(votes.reshape(b * hkv, 1, n), pool, stride=1, padding=pool // 2).reshape(b, hkv, n)
    return votes


def select_blocks(
    votes: torch.Tensor, k_blocks: int | torch.Tensor, block: int, sink_eff: torch.Tensor, window: torch.Tensor
) -> torch.Tensor:
    """Which blocks of ``block`` keys each KV head keeps: a bool map (B, Hkv, ceil(N / block)).

    ``votes`` (B, Hkv, N) from :func:`snapkv_votes`; ``k_blocks`` an int or (Hkv,) ints (blocks per head);
    ``sink_eff``/``window`` (Hkv,) the head's sink and window (:func:`plans.span.split_span_tensor`): blocks lying
    wholly inside the sink ``[0, sink_eff)`` or the last row's window ``[N - window, N)`` are never chosen (they
    are kept anyway). Fewer than ``k`` blocks are kept when fewer are eligible. Ties go to the earlier block.

    Raises ValueError for a block below 1 or a negative ``k``.
    """
    b, hkv, n = votes.shape
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    k_head = torch.as_tensor(k_blocks, dtype=torch.int64).expand(hkv)
    if (k_head < 0).any():
        raise ValueError(f"k_blocks must be >= 0, got {k_blocks}")
    n_blocks = -(-n // block)
    padded = F.pad(votes.float(), (0, n_blocks * block - n))
    score = padded.reshape(b, hkv, n_blocks, block).sum(-1)
    start = torch.arange(n_blocks) * block
    eligible = (start[None, :] + block > sink_eff[:, None]) & (start[None, :] < n - window[:, None])  # (Hkv, nb)
    score = score.masked_fill(~eligible.to(score.device), float("-inf"))
    k_max = int(k_head.max()) if hkv else 0
    out = torch.zeros(b, hkv, n_blocks, dtype=torch.bool, device=votes.device)
    if k_max == 0 or n_blocks == 0:
        return out
    # stable order: the best score first, the earlier block on ties
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., : min(k_max, n_blocks)]
    top = torch.gather(score, -1, order)
    rank = torch.arange(order.shape[-1], device=votes.device)
    keep = torch.isfinite(top) & (rank[None, None, :] < k_head.to(votes.device)[None, :, None])
    return out.scatter_(-1, order, keep)


def selected_keys(selected: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """Per-key view (B, Hkv, n) bool of a block map (B, Hkv, ceil(n / block)) (the reference's ``selected``)."""
    return selected.repeat_interleave(block, dim=-1)[..., :n]


__all__ = ["POOL", "select_blocks", "selected_keys", "snapkv_votes"]
