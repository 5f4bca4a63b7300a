"""The attention function used while scoring retrieval heads (registered as :data:`RETRIEVAL_ATTN`).

It is stock sdpa; in a layer whose attention module carries a :class:`RetrievalProbe` (``module_state(module).probe``,
set by :func:`retrieval_mode`) it also hands the layer's post-RoPE query rows at the probe's positions and its keys
to the probe, which adds :func:`profilers.retrieval.needle_attention_mass` for the probe's needle.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from compressor.hf.modules import attached_attention_mode, module_state
from plans.errors import CompressError
from profilers.retrieval import needle_attention_mass

RETRIEVAL_ATTN = "compress_retrieval"
"""Name under which :func:`retrieval_attention` is registered."""


@dataclass
class RetrievalProbe:
    """Per-layer needle attention mass of the prompt in flight (batch 1).

    positions: [m] query positions to score; needle: [start, end) key span; mass[layer]: [Hq] float64."""

    positions: torch.Tensor
    needle: tuple[int, int]
    mass: dict = field(default_factory=dict)

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """query [1, Hq, N, D], key [1, Hkv, N, D] (before GQA expansion), both post-RoPE."""
        if query.shape[0] != 1:
            raise CompressError("retrieval scoring runs one prompt at a time (batch 1)")
        pos = self.positions.to(query.device)
        self.mass[layer] = needle_attention_mass(query[0][:, pos], key[0], scaling, pos, self.needle)


def retrieval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: stock sdpa; with a probe attached it also records the needle mass."""
    probe = module_state(module).probe
    if probe is not None and query.shape[2] == key.shape[2]:
        if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
            raise CompressError("retrieval scoring: soft-capping and attention sinks (s_aux) are not supported")
        s = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
        probe.record(int(module.layer_idx), query.detach(), key.detach(), s)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@contextlib.contextmanager
def retrieval_mode(model, probe: RetrievalProbe):
    """Switch the model to :data:`RETRIEVAL_ATTN` (eval, frozen) with ``probe`` attached to every attention module."""
    with attached_attention_mode(model, RETRIEVAL_ATTN, "retrieval scoring", probe=probe):
        yield


AttentionInterface.register(RETRIEVAL_ATTN, retrieval_attention)
AttentionMaskInterface.register(RETRIEVAL_ATTN, sdpa_mask)
