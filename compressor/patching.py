"""Apply a plan to a stock HF causal LM through transformers' AttentionInterface (no modeling files copied).

``apply(model, plan)`` validates the plan against the model, stores it in ``model.config.compress_plan`` and
switches the attention implementation to ``"compress"``; a saved folder reloads with plain
``AutoModelForCausalLM.from_pretrained(dir)`` once ``compressor`` is imported (it registers the function).

The attention function itself, its mask builder and the bounded cache live in :mod:`compressor.hf`
(``plan_attention``, ``layout``, ``plan_cache``).
"""

from __future__ import annotations

import contextlib

from compressor.hf.modules import (
    attention_modules,
    check_model_supported,
    install_cache_hooks,
    module_state,
)
from compressor.hf.plan_attention import ATTN_NAME, plan_from_config
from plans.errors import CompressError
from plans.identity import identity_from_config
from plans.schema import Plan

BASE_IMPL_ATTR = "_compress_base_implementation"  # the implementation apply() replaced (model.__dict__, not saved)

UNSUPPORTED_FEATURES = {
    "attention_chunk_size": "chunked local attention (Llama 4 style)",
    "use_bidirectional_attention": "bidirectional attention",
}


def check_attention_features(model) -> None:
    """Raise CompressError naming any attention feature of the model's config the plan cannot honour.

    Honoured (not refused): ``scaling``, ``sliding_window`` (intersected), ``softcap`` (Gemma2), ``s_aux`` attention
    sinks, dropout in train mode."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    mt = getattr(cfg, "model_type", "?")
    for attr, what in UNSUPPORTED_FEATURES.items():
        value = getattr(cfg, attr, None)
        if value not in (None, False, 0):
            raise CompressError(f"model type {mt!r}: config.{attr}={value!r} ({what}) cannot be combined with a "
                                "sink+window plan")
    if getattr(cfg, "is_causal", True) is False:
        raise CompressError(f"model type {mt!r}: config.is_causal=False (bidirectional attention) cannot be combined "
                            "with a causal sink+window plan")


def apply(model, plan: Plan, *, allow_other_model: bool = False):
    """Patch ``model`` in place to run ``plan``; returns the model.

    Raises CompressError when the model does not route through AttentionInterface, has an attention feature the plan
    cannot honour (:func:`check_attention_features`), or does not match the plan's model identity (with
    ``allow_other_model``, a plan of another model of the same shape is accepted: :meth:`ModelIdentity.check_matches`)."""
    check_model_supported(model, "patched")
    check_attention_features(model)
    ident = identity_from_config(model.config)
    plan.model.check_matches(ident, "the plan", allow_other_model=allow_other_model)
    if model.config._attn_implementation != ATTN_NAME:
        model.__dict__[BASE_IMPL_ATTR] = model.config._attn_implementation
    model.config.compress_plan = plan.model_dump(mode="json")
    for m in attention_modules(model):
        module_state(m).runtime = None
    model.set_attn_implementation(ATTN_NAME)
    model.config.attn_implementation = ATTN_NAME  # serialised, so model.save_pretrained(dir) reloads patched
    install_cache_hooks(model)
    return model


def unapply(model, implementation: str | None = None):
    """Back to a stock attention implementation: ``implementation``, or by default the one the model had before
    its first :func:`apply` ("sdpa" when unknown). The plan stays in the config but is not used; a folder saved
    now loads stock."""
    model.set_attn_implementation(implementation or model.__dict__.get(BASE_IMPL_ATTR, "sdpa"))
    model.config.__dict__.pop("attn_implementation", None)
    return model


@contextlib.contextmanager
def plan_applied(model, plan: Plan | None):
    """``with plan_applied(model, plan):`` runs ``model`` under ``plan`` (None: its stock attention) inside the
    block, then restores the attention implementation and plan it had before — the one way to switch a plan on
    and off around a measurement. Raises CompressError as :func:`apply` does."""
    cfg = model.config
    before = (cfg._attn_implementation, getattr(cfg, "compress_plan", None), cfg.__dict__.get("attn_implementation"))
    try:
        apply(model, plan) if plan is not None else unapply(model)
        yield model
    finally:
        impl, data, attr = before
        if data is None:
            cfg.__dict__.pop("compress_plan", None)
        else:
            cfg.compress_plan = data
        for m in attention_modules(model):
            module_state(m).runtime = None
        if cfg._attn_implementation != impl:
            model.set_attn_implementation(impl)
        cfg.__dict__.pop("attn_implementation", None)
        if attr is not None:
            cfg.attn_implementation = attr


def plan_of(model) -> Plan | None:
    data = getattr(model.config, "compress_plan", None)
    return None if data is None else plan_from_config(model.config)
