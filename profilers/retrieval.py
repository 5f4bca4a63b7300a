"""Retrieval-head scores: how much attention the answer side of a needle prompt puts on the needle.

A retrieval head (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality"; the heads
DuoAttention keeps at full KV) is one that reaches far back to copy a fact. The score used here is the one of
``docs/models-and-data.md`` §E/§F: for a prompt with a needle at token span ``[s, e)`` and query positions ``Q``
(the last ``m`` prompt positions: question and answer prefix),

    r_h = mean_{i in Q} sum_{j in [s, e)} A_ij,     A_i = softmax(scaling * q_i k^T) over keys j <= i,

averaged over the query heads of each KV head and over samples. Only the ``m`` rows of ``Q`` are computed
(never an N x N matrix). :func:`needle_attention_mass` is pure tensor math; the model hook lives in
:mod:`compressor.hf.retrieval_attention`, the driver in :mod:`compressor.retrieval_profile`.

A head that keeps its needle attention is served by a dense span; the search keeps the top-scored KV heads dense
(:func:`top_heads`), the DuoAttention plan shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plans.atomic import atomic_path, write_text_atomic
from plans.errors import CompressError

RETRIEVAL_FORMAT = 1


def needle_attention_mass(
    query: torch.Tensor, key: torch.Tensor, scaling: float, query_positions: torch.Tensor, needle: tuple[int, int]
) -> torch.Tensor:
    """Attention mass on the needle's keys, per query head, averaged over the given query positions.

    query: [Hq, m, D] — the rows at ``query_positions`` only; key: [Hkv, N, D] (Hq a multiple of Hkv; query head
    h uses KV head h // (Hq // Hkv), HF ``repeat_kv`` order); query_positions: [m] int, absolute positions (< N)
    of the query rows (causal: row i sees keys j <= i); needle: [start, end) key positions.
    Returns [Hq] float64 in [0, 1]. Computed in float32, one KV head at a time ([group, m, N] scores).

    Raises CompressError on bad shapes or a needle outside [0, N)."""
    if query.dim() != 3 or key.dim() != 3 or query.shape[-1] != key.shape[-1]:
        raise CompressError(f"needle_attention_mass: query [Hq, m, D] and key [Hkv, N, D], got {tuple(query.shape)} "
                            f"and {tuple(key.shape)}")
    hq, m, _ = query.shape
    hkv, n, _ = key.shape
    if hq % hkv:
        raise CompressError(f"needle_attention_mass: {hq} query heads is not a multiple of {hkv} KV heads")
    s, e = int(needle[0]), int(needle[1])
    if not 0 <= s < e <= n:
        raise CompressError(f"needle_attention_mass: needle span [{s}, {e}) outside [0, {n})")
    pos = query_positions.to(torch.long).reshape(-1)
    if pos.numel() != m or int(pos.max()) >= n or int(pos.min()) < 0:
        raise CompressError(f"needle_attention_mass: {m} query rows need {m} positions in [0, {n})")
    causal = torch.arange(n, device=key.device)[None, :] <= pos[:, None].to(key.device)  # [m, N]
    g = hq // hkv
    out = torch.empty(hq, dtype=torch.float64)
    for h in range(hkv):
        q = query[h * g : (h + 1) * g].float()
        scores = torch.einsum("gmd,nd->gmn", q, key[h].float()) * float(scaling)
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out[h * g : (h + 1) * g] = p[..., s:e].sum(-1).mean(-1).double().cpu()
    return out


def kv_head_scores(per_query_head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[L, Hq] -> [L, Hkv]: the mean over each KV head's query heads (HF ``repeat_kv`` order)."""
    L, hq = per_query_head.shape
    if hq % num_kv_heads:
        raise CompressError(f"{hq} query heads is not a multiple of {num_kv_heads} KV heads")
    return per_query_head.reshape(L, num_kv_heads, hq // num_kv_heads).mean(-1)


def top_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scored (layer, head) pairs of ``scores`` [L, H], best first (ties: lower index first)."""
    flat = scores.reshape(-1).double()
    if not 0 <= k <= flat.numel():
        raise CompressError(f"top_heads: k must be in [0, {flat.numel()}], got {k}")
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
    H = scores.shape[1]
    return [(i // H, i % H) for i in order]


def ranking_agreement(a: torch.Tensor, b: torch.Tensor, k: int) -> dict:
    """How two head scorings agree: Spearman rank correlation (scipy) and the overlap of their top-k sets."""
    from scipy.stats import spearmanr

    if a.shape != b.shape:
        raise CompressError(f"ranking_agreement: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    rho = spearmanr(a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy()).statistic
    ta, tb = set(top_heads(a, k)), set(top_heads(b, k))
    return {"spearman": float(rho), "k": k, "top_k_overlap": len(ta & tb), "top_k_jaccard": len(ta & tb) / max(1, len(ta | tb))}


@dataclass
class RetrievalScores:
    """Per-KV-head retrieval scores [L, Hkv] (mean needle attention mass, in [0, 1]) and how they were measured.

    ``halves`` holds the scores of the even- and odd-indexed samples ([2, L, Hkv]) so the stability of the
    ranking can be reported (:func:`ranking_agreement`)."""

    scores: torch.Tensor
    halves: torch.Tensor
    meta: dict = field(default_factory=dict)

    def top(self, k: int) -> list[tuple[int, int]]:
        return top_heads(self.scores, k)


def save_retrieval(r: RetrievalScores, stem: str | Path) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` (scores, halves) and ``STEM.json`` (meta), each atomically."""
    st, js = Path(str(stem) + ".safetensors"), Path(str(stem) + ".json")
    with atomic_path(st) as tmp:
        save_file({"scores": r.scores.double().contiguous(), "halves": r.halves.double().contiguous()}, str(tmp),
                  metadata={"format": str(RETRIEVAL_FORMAT), "kind": "retrieval"})
    write_text_atomic(js, json.dumps({"format": RETRIEVAL_FORMAT, "kind": "retrieval", **r.meta}, indent=2, default=str))
    return st, js


def load_retrieval(stem: str | Path) -> RetrievalScores:
    """Read what :func:`save_retrieval` wrote (``STEM``, ``STEM.json`` or ``STEM.safetensors``).

    Raises CompressError when the files are missing or are not retrieval scores."""
    s = str(stem)
    for suffix in (".safetensors", ".json"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    st, js = Path(s + ".safetensors"), Path(s + ".json")
    if not st.exists() or not js.exists():
        raise CompressError(f"retrieval scores not found: {st} and {js} (write them with `compress profile --method retrieval`)")
    try:
        meta = json.loads(js.read_text())
        with safe_open(str(st), "pt") as f:
            if (f.metadata() or {}).get("kind") != "retrieval":
                raise CompressError(f"{st} is not a retrieval-score file")
            scores, halves = f.get_tensor("scores"), f.get_tensor("halves")
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CompressError(f"cannot read retrieval scores {st}: {e}") from e
    if scores.dim() != 2 or halves.shape != (2, *scores.shape) or not torch.isfinite(scores).all():
        raise CompressError(f"{st}: scores must be [L, Hkv] finite with halves [2, L, Hkv]")
    return RetrievalScores(scores, halves, meta)
