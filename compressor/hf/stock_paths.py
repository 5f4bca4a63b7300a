"""The two places where transformers' stock paths must know that a model runs a plan.

transformers neither serialises a model's attention implementation nor lets a model kwarg it does not know reach
``generate``'s steps, so ``import compressor`` wraps two stock methods, each doing nothing for a model without a
plan:

* :func:`_post_init` (``PreTrainedModel.post_init``, run by every model constructor: ``from_pretrained``,
  ``from_config``, ``pipeline``): a model built with the plan's implementation gets its cache hooks
  (:func:`compressor.hf.modules.install_cache_hooks`) and keeps ``config.attn_implementation`` set, so a
  ``save_pretrained`` of it writes a folder that loads patched again;
* :func:`_generate` (``GenerationMixin.generate``): generation without a cache (``use_cache=False``) gets a
  :class:`compressor.hf.sequence.SequenceState` as the ``compress_n0`` model kwarg, filled by the first forward,
  so every step's recomputation keeps the prompt's N0 (as the cached run does); ``compress_n0`` is registered as
  a model kwarg (``TransformersKwargs``), so ``generate(..., compress_n0=N)`` declares N0 in any mode.
"""

from __future__ import annotations

import functools

from transformers import GenerationMixin, PreTrainedModel
from transformers.utils.generic import TransformersKwargs

from compressor.hf.modules import ATTN_NAME, install_cache_hooks, runs_plan
from compressor.hf.sequence import SequenceState
from plans.errors import CompressError

N0_KWARG = "compress_n0"


_stock_post_init = PreTrainedModel.post_init
_stock_generate = GenerationMixin.generate


@functools.wraps(_stock_post_init)
def _post_init(self, *args, **kwargs):
    out = _stock_post_init(self, *args, **kwargs)
    if runs_plan(self):
        self.config.attn_implementation = ATTN_NAME  # serialised by save_pretrained (the internal one is not)
        install_cache_hooks(self)
    return out


def _generation_uses_cache(model, kwargs) -> bool:
    if kwargs.get("use_cache") is not None:
        return bool(kwargs["use_cache"])
    config = kwargs.get("generation_config") or model.generation_config
    return getattr(config, "use_cache", True) is not False


@functools.wraps(_stock_generate)
def _generate(self, *args, **kwargs):
    from compressor.hf.plan_cache import PlanCache

    assisted = kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens")
    if assisted and isinstance(kwargs.get("cache"), PlanCache):
        raise CompressError("assisted / prompt-lookup decoding rolls back rejected draft tokens, which a bounded "
                            "PlanCache cannot (evicted tokens are gone); use the default cache: same tokens")
    if runs_plan(self) and kwargs.get(N0_KWARG) is None and not _generation_uses_cache(self, kwargs):
        kwargs[N0_KWARG] = SequenceState()
    return _stock_generate(self, *args, **kwargs)


def register() -> None:
    """Install both wrappers and the ``compress_n0`` model kwarg (idempotent)."""
    if PreTrainedModel.post_init is not _post_init:
        PreTrainedModel.post_init = _post_init
    if GenerationMixin.generate is not _generate:
        GenerationMixin.generate = _generate
    if N0_KWARG not in TransformersKwargs.__optional_keys__:
        TransformersKwargs.__optional_keys__ = TransformersKwargs.__optional_keys__ | {N0_KWARG}


register()
