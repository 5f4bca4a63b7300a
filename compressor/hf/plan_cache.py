"""``PlanCache``: a ``transformers.Cache`` whose layers keep per-head bounded KV under the model's plan.

Each layer is a :class:`PlanCacheLayer`: transformers' ``CacheLayerMixin`` over the pure per-layer store
:class:`attention_kernels.kv_groups.PlanKV` (dense / bounded / linear groups of KV heads). The cache is storage; the plan's
attention function (:mod:`compressor.hf.plan_attention`) owns the policy and calls ``store`` / ``append`` /
``attend``. ``update`` only counts slots and passes the new states through. The pattern of each
sequence (``S = span(N0 + length_offset)``) is fixed at its prompt and held by the layer while decoding.

    >>> cache = PlanCache(model)                                   # doctest: +SKIP
    >>> model.generate(ids, max_new_tokens=64, cache=cache)        # doctest: +SKIP
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from compressor.hf.modules import install_cache_hooks, runs_plan, text_geometry
from plans.errors import CompressError
from attention_kernels.kv_groups import PlanKV
from plans.identity import identity_from_config


class PlanCacheLayer(CacheLayerMixin, PlanKV):
    """One layer of a :class:`PlanCache` (``cumulative_length`` = cache slots ever seen, pads included: what HF masks index)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, n_rep: int):
        CacheLayerMixin.__init__(self)
        PlanKV.__init__(self, n_rep)
        self.cumulative_length = 0

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.cumulative_length and not self.has_states:
            raise CompressError("this PlanCache was filled by an attention that does not run the plan (it stored "
                                "nothing): give PlanCache only to a model patched with compressor.apply")
        self.cumulative_length += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.index_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.index_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.index_batch(lambda t: t[indices, ...])

    def reset(self) -> None:
        self.cumulative_length = 0
        self.clear()

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a bounded per-head cache cannot be cropped (evicted tokens are gone)")


class PlanCache(Cache):
    """``generate(..., cache=PlanCache(model))`` keeps per-head bounded KV for a patched model."""

    def __init__(self, model):
        """Raises CompressError when ``model`` does not run a plan (a PlanCache only stores what the plan's
        attention function hands it; with any other attention it would hold nothing)."""
        if not runs_plan(model):
            raise CompressError(
                f"PlanCache needs a model that runs a plan (attention implementation "
                f"{model.config._attn_implementation!r}, plan {'present' if getattr(model.config, 'compress_plan', None) else 'absent'}); "
                "patch it with compressor.apply(model, plan), or use the model's default cache")
        layers, hq, hkv = text_geometry(model.config)
        install_cache_hooks(model)
        super().__init__(layers=[PlanCacheLayer(hq // hkv) for _ in range(layers)])

    def nbytes(self) -> int:
        """Bytes of K/V held now."""
        return sum(layer.nbytes() for layer in self.layers)


def dense_cache_bytes(model, seq_len: int, batch: int = 1, dtype=None) -> int:
    """Bytes a DynamicCache would hold for ``seq_len`` tokens (K and V, every layer, every KV head)."""
    ident = identity_from_config(model.config)
    dt = dtype or next(model.parameters()).dtype
    return 2 * ident.num_layers * batch * ident.num_kv_heads * seq_len * ident.head_dim * torch.empty((), dtype=dt).element_size()


__all__ = ["PlanCache", "PlanCacheLayer", "dense_cache_bytes"]
