"""Option groups shared by the attention kernels, beyond the common ``(q, k, v, sink, span, scale)`` signature.

:class:`KeyPositions` says where a call's queries and keys sit among the real tokens (and which pairs a custom
mask allows); :class:`ScoreOptions` holds the model features applied to the scores (a native sliding window,
logit soft-capping, learned attention sinks, dropout); :class:`PrefillLaunch` the Triton prefill launch
configuration. Every field defaults to "absent", so ``KeyPositions()`` / ``ScoreOptions()`` is plain causal
softmax attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeyPositions:
    """Positions of a call's queries and keys among the real tokens (None: the plain contiguous layout).

    ``q_pos`` (B, q) and ``k_pos`` (B, k) int positions (None: keys at 0..k-1, the queries the last q of them);
    ``k_valid`` (B, k) bool marks real keys (None: all); ``allowed`` (B or 1, 1, q, k) bool is a custom mask from
    the caller, intersected with the pattern (None: none); ``selected`` (B, Hkv, k) bool marks the keys each KV
    head keeps by content selection, added to the pattern for every later query (None: none;
    :func:`plans.span.sees_or_selected`).
    """

    q_pos: torch.Tensor | None = None
    k_pos: torch.Tensor | None = None
    k_valid: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    selected: torch.Tensor | None = None


@dataclass(frozen=True)
class ScoreOptions:
    """Model features applied to the attention scores (transformers' eager semantics).

    ``native_window``: the model's own sliding window in tokens (key j visible from query i iff
    ``i - j < native_window``; None: none). ``softcap``: Gemma2 logit soft-capping ``cap * tanh(s / cap)``
    (None: off). ``s_aux`` (H,): learned attention-sink logits (gpt-oss; one extra softmax column, dropped
    afterwards; None: off). ``dropout``: probability dropout (training only; 0 in eval).
    """

    native_window: int | None = None
    softcap: float | None = None
    s_aux: torch.Tensor | None = None
    dropout: float = 0.0


@dataclass(frozen=True)
class PrefillLaunch:
    """Launch configuration of the Triton prefill kernel: ``block_m`` query rows x ``block_n`` keys per tile
    (powers of two >= 16; both None: autotuned on a GPU, ``DEFAULT_BLOCKS`` under the interpreter), and Triton's
    ``num_warps`` / ``num_stages`` for an explicit block size."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int = 4
    num_stages: int = 2


__all__ = ["KeyPositions", "PrefillLaunch", "ScoreOptions"]
