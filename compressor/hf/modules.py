"""The model side of the seam to transformers: attention modules, their per-module state, model checks.

Every attention function this project registers (apply, profiling, gates) reaches its per-module objects through
:func:`module_state`: one typed :class:`ModuleState` per attention module, kept outside the module tree (in
``module.__dict__``, so it is neither a parameter, a buffer nor a submodule and never reaches ``state_dict``).
Nothing about one sequence is stored here except the cache of the forward call in flight.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from plans.errors import CompressError
from plans.identity import identity_from_config, text_config

if TYPE_CHECKING:  # names for the annotations only (the attention functions, which import this module, are
    #                named by their dotted path below, so no import edge points back at them)
    from transformers import Cache

    from profilers.gates import GateController
    from profilers.influence import InfluenceCollector

STATE_ATTR = "_compress_state"
ATTN_NAME = "compress"  # the plan's attention implementation (AttentionInterface / AttentionMaskInterface name)


def runs_plan(model) -> bool:
    """Whether ``model`` runs a plan: the plan's implementation and a ``compress_plan`` in its config."""
    cfg = model.config
    return getattr(cfg, "_attn_implementation", None) == ATTN_NAME and getattr(cfg, "compress_plan", None) is not None


@dataclass
class ModuleState:
    """What our attention functions keep per attention module.

    runtime: the plan's view of this layer (apply), built lazily from ``config.compress_plan``;
    cache: the ``transformers.Cache`` of the forward call in flight (set by a pre-hook, cleared after the call);
    collector: the influence collector while profiling; controller: the gate controller while learning gates;
    probe: the retrieval probe while scoring retrieval heads; hooked: whether the cache hooks are installed.
    """

    runtime: "compressor.hf.plan_attention.LayerRuntime | None" = None
    cache: Cache | None = None
    collector: InfluenceCollector | None = None
    controller: GateController | None = None
    probe: "compressor.hf.retrieval_attention.RetrievalProbe | None" = None
    hooked: bool = False


def module_state(module) -> ModuleState:
    """The :class:`ModuleState` of an attention module (created on first use)."""
    st = module.__dict__.get(STATE_ATTR)
    if st is None:
        st = module.__dict__[STATE_ATTR] = ModuleState()
    return st


def attention_modules(model) -> list:
    """The modules that call the attention function, one per layer, in layer order.

    They carry ``layer_idx`` and ``config`` and have "Attention" in their class name; where a model wraps the
    attention in another ``*Attention`` module, the outer one (first in ``model.modules()``) is taken.
    """
    seen, out = set(), []
    for m in model.modules():
        if hasattr(m, "layer_idx") and hasattr(m, "config") and "Attention" in type(m).__name__ and m.layer_idx not in seen:
            seen.add(m.layer_idx)
            out.append(m)
    return out


def text_geometry(config) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a model config."""
    ident = identity_from_config(config)
    return ident.num_layers, ident.num_heads, ident.num_kv_heads


def model_type(model) -> str:
    return getattr(text_config(model.config), "model_type", None) or getattr(model.config, "model_type", "?")


def accepts_logits_to_keep(model) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (compute the LM head only at chosen positions)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def check_model_supported(model, purpose: str = "profiled") -> str:
    """Raise CompressError unless the model routes attention through transformers' AttentionInterface
    (the library's own test, ``_can_set_attn_implementation``); returns the model type."""
    mt = model_type(model)
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is None or not can():
        raise CompressError(
            f"model type {mt!r} ({type(model).__name__}) does not route attention through transformers' "
            f"AttentionInterface, so it cannot be {purpose} (supported: Llama, Mistral, Qwen2/3, Gemma, Phi3, GPT-NeoX, "
            "GPT-2, OPT, ...)"
        )
    return mt


@contextlib.contextmanager
def frozen_attention_mode(model, impl: str, what: str):
    """Switch the model to the registered attention ``impl``, eval mode and frozen parameters; restore the
    implementation, training mode and requires_grad flags afterwards. Yields the model type."""
    mt = check_model_supported(model)
    orig_impl = model.config._attn_implementation
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        try:
            model.set_attn_implementation(impl)
        except Exception as e:  # noqa: BLE001 -- transformers raises ValueError/KeyError/... here
            raise CompressError(f"model type {mt!r}: cannot switch to the {what} attention: {e}") from None
        if model.config._attn_implementation != impl:
            raise CompressError(f"model type {mt!r}: the attention implementation cannot be switched to the {what} one")
        model.eval()
        model.requires_grad_(False)
        yield mt
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
        if model.config._attn_implementation != orig_impl:
            model.set_attn_implementation(orig_impl)


# -- the cache of the call in flight reaches the attention function through a forward pre-hook ---------------------
def _capture_cache(module, args, kwargs):
    from transformers.cache_utils import Cache

    found = None
    for v in list(kwargs.values()) + list(args):
        if isinstance(v, Cache):
            found = v
            break
    module_state(module).cache = found


def _release_cache(module, args, kwargs, output):
    module_state(module).cache = None


def _hook_module(m) -> None:
    st = module_state(m)
    if not st.hooked:
        m.register_forward_pre_hook(_capture_cache, with_kwargs=True)
        m.register_forward_hook(_release_cache, with_kwargs=True)
        st.hooked = True


def install_cache_hooks(model) -> None:
    """Let the cache passed to forward/generate reach the attention function (idempotent).

    The attention modules receive the cache as an argument but do not pass it on to the attention function (GPT-NeoX
    calls it ``layer_past``, Llama ``cache``); a forward pre-hook works for all."""
    for m in attention_modules(model):
        _hook_module(m)


def _cache_of_caller(module):
    """The ``transformers.Cache`` among the local variables of ``module``'s forward, found on the call stack.

    Used once per module: for the first call of a model that no :func:`install_cache_hooks` has seen (loaded
    with ``from_pretrained`` straight into the plan's implementation), whose hooks are installed during that call."""
    import sys

    from transformers.cache_utils import Cache

    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_locals.get("self") is module:
            return next((v for v in frame.f_locals.values() if isinstance(v, Cache)), None)
        frame = frame.f_back
    return None


def call_cache(module):
    """The cache of the forward call in flight at ``module`` (None without one).

    A module without hooks (a model built directly with the plan's implementation: ``from_pretrained`` of a patched
    folder, ``pipeline(...)``) gets them now, and this one call reads the cache from its forward's arguments."""
    st = module_state(module)
    if st.hooked:
        return st.cache
    _hook_module(module)
    return _cache_of_caller(module)


@contextlib.contextmanager
def attached_attention_mode(model, impl: str, what: str, **state):
    """:func:`frozen_attention_mode` with ``state`` (e.g. ``collector=...`` or ``controller=...``) set on every
    attention module's :class:`ModuleState` for the duration, and cleared after (only where still ours).

    Raises CompressError when the model has no attention module with a ``layer_idx``."""
    with frozen_attention_mode(model, impl, what) as mt:
        marked = attention_modules(model)
        if not marked:
            raise CompressError(f"model type {mt!r}: no attention modules with a layer_idx found")
        try:
            for m in marked:
                for name, value in state.items():
                    setattr(module_state(m), name, value)
            yield mt
        finally:
            for m in marked:
                st = module_state(m)
                for name, value in state.items():
                    if getattr(st, name) is value:
                        setattr(st, name, None)
