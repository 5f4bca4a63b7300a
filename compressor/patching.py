"""Apply a plan to a stock HF causal LM through transformers' AttentionInterface (no modeling files copied).

``apply(model, plan)`` validates the plan against the model, stores it in ``model.config.compress_plan`` and
switches the attention implementation to ``"compress"``; a saved folder reloads with plain
``AutoModelForCausalLM.from_pretrained(dir)`` once ``compressor`` is imported (it registers the function).

The attention function receives RoPE'd ``q`` (B, Hq, q, D), un-repeated ``k``/``v`` (B, Hkv, kv, D) and the
key layout built by our mask builder (real positions of queries and keys, :class:`KeyLayout`), and returns
(B, q, Hq, D). Spans are ``S = span(N0 + length_offset)`` for each sequence's prompt length N0 (real tokens of
its first forward), never capped by N0 and fixed while decoding (:mod:`plans.span`); N0 lives on the sequence's
cache (:class:`SequenceState`) or comes with the call (``compress_n0=``), never on a module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kernels.kv_cache import PlanCache, PlanCacheLayer
from kernels.reference import reference_attention
from plans.errors import CompressError
from plans.identity import identity_from_config
from plans.io import plan_from_dict
from plans.schema import DensePattern, Plan
from plans.span import DENSE_SPAN, split_span_tensor
from profilers.profile_run import check_model_supported

ATTN_NAME = "compress"


def text_geometry(config) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a model config."""
    ident = identity_from_config(config)
    return ident.num_layers, ident.num_heads, ident.num_kv_heads


# -- where each query and key of a call sits: built once per forward by the mask builder ---------------------
@dataclass(frozen=True)
class KeyLayout:
    """Real positions of one attention call's queries and key slots (per sample), from the mask builder.

    q_pos (B, q) and k_pos (B, kv): positions among the sequence's real tokens (pads excluded), -1 for a pad
    or a slot not written yet (static caches); ``q_start``: absolute index of the first query in its sequence
    (0 = this call starts the sequence); ``written``: key slots holding tokens (the rest are empty cache slots);
    ``allowed`` (B, 1, q, kv) bool or None: a mask the caller adds on top of causality (packed sequences,
    modality overlays), materialised only in those cases, intersected with the plan.
    """

    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_start: int
    written: int
    allowed: torch.Tensor | None = None


def key_layout_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, attention_mask=None,
                    mask_function=None, allow_is_causal_skip=True, **kw):
    """Registered in AttentionMaskInterface: key validity (B, 1, 1, kv) bool carrying a :class:`KeyLayout` as
    ``.compress_layout``, or None for a plain causal call (no padding, every key slot written, no offsets).

    The pattern itself (causal, sink, windows, a native sliding window) is applied by the attention function
    from real positions, so no (q, kv) mask is built except where HF adds a mask function of its own (packed
    sequences, modality overlays, compiled decode), which is materialised as stock sdpa would and intersected.
    """
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    total = q_offset + q_length  # tokens in the sequence once this call is done (pads included)
    am = None if attention_mask is None else attention_mask.to(torch.bool)
    plain = (am is None or bool(am[:, :total].all())) and kv_offset == 0 and kv_length == total
    if plain and allow_is_causal_skip:
        return None
    device = kw.get("device") or (am.device if am is not None else None)
    if am is None:
        am = torch.ones(batch_size, total, dtype=torch.bool, device=device)
    elif am.shape[-1] < total:  # HF may pass the 2D mask shorter than the sequence: the rest is real
        am = torch.cat([am, am.new_ones(am.shape[0], total - am.shape[-1])], dim=-1)
    am = am[:, :total].expand(batch_size, total)
    pos = torch.where(am, am.long().cumsum(-1) - 1, -1)
    written = max(0, min(kv_length, total - kv_offset))
    k_pos = torch.full((batch_size, kv_length), -1, dtype=torch.long, device=am.device)
    k_pos[:, :written] = pos[:, kv_offset : kv_offset + written]
    allowed = None
    if not allow_is_causal_skip:  # a mask function beyond causal + padding: let HF evaluate it
        allowed = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, **{k: v for k, v in kw.items() if k in ("device", "use_vmap")})
    out = (k_pos >= 0)[:, None, None, :]
    out.compress_layout = KeyLayout(q_pos=pos[:, q_offset:total], k_pos=k_pos, q_start=q_offset, written=written,
                                    allowed=allowed)
    return out


def call_layout(attention_mask, query, key, position_ids=None) -> KeyLayout:
    """The :class:`KeyLayout` of one call: from our mask builder, a plain causal call, or a caller's 4D mask.

    A 4D mask given by the caller (bool, or additive float) is intersected with the plan; its positions are the
    call's ``position_ids`` when queries and keys are the same tokens (packed documents then keep their own
    sinks), else the slot indices.
    """
    b, nq, nk = query.shape[0], query.shape[2], key.shape[2]
    layout = getattr(attention_mask, "compress_layout", None)
    if layout is not None:
        return layout
    dev = query.device
    if attention_mask is None:
        k_pos = torch.arange(nk, device=dev).expand(b, nk)
        return KeyLayout(q_pos=k_pos[:, nk - nq :], k_pos=k_pos, q_start=nk - nq, written=nk)
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if allowed.ndim != 4 or allowed.shape[-1] != nk:
        raise CompressError(f"compress attention: a mask of shape {tuple(attention_mask.shape)} for {nk} keys; "
                            "expected a 2D padding mask or a 4D (B, 1, q, kv) mask")
    allowed = allowed[:, :1].expand(b, 1, nq, nk)
    if position_ids is not None and nq == nk:
        pos = position_ids.to(dev).long().expand(b, nk)
        return KeyLayout(q_pos=pos, k_pos=pos, q_start=0, written=nk, allowed=allowed)
    k_pos = torch.arange(nk, device=dev).expand(b, nk)
    return KeyLayout(q_pos=k_pos[:, nk - nq :], k_pos=k_pos, q_start=nk - nq, written=nk, allowed=allowed)


# -- the state of one sequence lives with its cache ------------------------------------------------------------
@dataclass
class SequenceState:
    """Per-sequence quantities, kept on the sequence's cache object (never on a module or a config).

    n0 (B,): the prompt length each sample's spans are evaluated at (real tokens of the first forward)."""

    n0: torch.Tensor


SEQUENCE_ATTR = "compress_sequence"


def prompt_lengths(cache, layout: KeyLayout, explicit=None) -> torch.Tensor:
    """N0 (B,) for this call: ``compress_n0`` when given; else the cache's sequence state, set by the call that
    starts the sequence (``q_start == 0``); without a cache, the real tokens of this call."""
    b = layout.q_pos.shape[0]
    dev = layout.q_pos.device
    if explicit is not None:
        n0 = torch.as_tensor(explicit, device=dev).reshape(-1).expand(b).clone()
        if cache is not None:
            setattr(cache, SEQUENCE_ATTR, SequenceState(n0))
        return n0
    n_now = torch.maximum(layout.q_pos.amax(-1), layout.k_pos.amax(-1)) + 1
    if cache is None:
        return n_now
    state = getattr(cache, SEQUENCE_ATTR, None)
    if layout.q_start == 0 or state is None or state.n0.shape[0] != b:
        state = SequenceState(n_now)
        setattr(cache, SEQUENCE_ATTR, state)
    return state.n0.to(dev)


# -- plan lookup on modules ----------------------------------------------------------------------------------
class _LayerRuntime:
    """The plan's view for one layer: sinks per query head and spans per prompt length (memoised).

    Depends on the plan only, never on a sequence."""

    def __init__(self, plan: Plan, layer: int):
        self.plan, self.layer = plan, layer
        self.sinks = plan.sinks(layer)
        self.dense_q = torch.tensor([isinstance(plan.pattern(layer, h), DensePattern) for h in range(plan.model.num_heads)])
        self.operators = plan.operators(layer)
        self.relu_heads = [h for h, op in enumerate(self.operators) if op == "relu_softmax"]
        self.linear_heads = [h for h, op in enumerate(self.operators) if op == "linear"]
        self.keep_all_q = self.dense_q | torch.tensor([op == "linear" for op in self.operators])
        self._spans: dict[int, torch.Tensor] = {}

    def spans(self, n: int) -> torch.Tensor:
        if n not in self._spans:
            self._spans[n] = self.plan.spans(self.layer, n)
        return self._spans[n]

    def sink_window(self, n0: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sink_eff, window) as (B, Hq) for per-sample prompt lengths n0 (B,): ``S = span(N0 + offset)``,
        never capped by N0 (plans.span)."""
        spans = torch.stack([self.spans(max(int(x), 1)) for x in n0.tolist()]).to(device)
        sink_eff, window = split_span_tensor(self.sinks.to(device).expand_as(spans), spans)
        dense = self.dense_q.to(device).expand_as(spans)
        return torch.where(dense, 0, sink_eff), torch.where(dense, DENSE_SPAN, window)


def _runtime(module) -> _LayerRuntime:
    rt = module.__dict__.get("_compress_runtime")
    if rt is None:
        plan = _plan_from_config(module.config)
        rt = _LayerRuntime(plan, module.layer_idx)
        module.__dict__["_compress_runtime"] = rt
    return rt


_PLAN_CACHE: dict[int, tuple[dict, Plan]] = {}


def _plan_from_config(config) -> Plan:
    data = getattr(config, "compress_plan", None)
    if data is None:
        raise CompressError("this model has attn_implementation='compress' but no compress_plan in its config")
    cached = _PLAN_CACHE.get(id(config))
    if cached is None or cached[0] is not data:
        cached = (data, plan_from_dict(data, "config.compress_plan"))
        _PLAN_CACHE[id(config)] = cached
    return cached[1]


# -- the attention function ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallFeatures:
    """The model features of one attention call that transformers' eager/sdpa functions honour."""

    scaling: float | None
    dropout: float
    native_window: int | None  # the model's own sliding window (HF: i - j < window)
    softcap: float | None  # Gemma2 logit soft-capping
    s_aux: torch.Tensor | None  # (Hq,) learned attention-sink logits (gpt-oss)

    @property
    def kernel_ok(self) -> bool:
        """Whether the fast kernels (plain softmax, no dropout) can run this call."""
        return self.softcap is None and self.s_aux is None and not self.dropout


def call_features(scaling, dropout, kwargs) -> CallFeatures:
    return CallFeatures(scaling=scaling, dropout=float(dropout or 0.0), native_window=kwargs.get("sliding_window") or None,
                        softcap=kwargs.get("softcap"), s_aux=kwargs.get("s_aux"))


def compress_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: per-head sink+window attention following the model's plan.

    query (B, Hq, q, D) RoPE'd, key/value (B, Hkv, kv, D) un-repeated; returns ((B, q, Hq, D), None).
    """
    rt = _runtime(module)
    feats = call_features(scaling, dropout, kwargs)
    cache = module.__dict__.get("_compress_cache")
    layout = call_layout(attention_mask, query, key, kwargs.get("position_ids"))
    plan_layer = cache.layers[module.layer_idx] if isinstance(cache, PlanCache) else None
    if plan_layer is not None and plan_layer.has_states:  # decoding (or a later chunk) with our bounded cache
        return _attend_plan_cache(rt, plan_layer, query, key, value, layout, feats), None
    if layout.written < key.shape[2]:  # empty static-cache slots at the end: never attended
        key, value = key[:, :, : layout.written], value[:, :, : layout.written]
        layout = replace(layout, k_pos=layout.k_pos[:, : layout.written],
                         allowed=None if layout.allowed is None else layout.allowed[..., : layout.written])
    n0 = prompt_lengths(cache, layout, kwargs.get("compress_n0"))
    sink_eff, window = rt.sink_window(n0, query.device)
    out = _prefill(rt, query, key, value, layout, sink_eff, window, feats)
    if plan_layer is not None:  # prefill into our bounded cache
        n_rep = query.shape[1] // key.shape[1]
        dense_kv = rt.keep_all_q.view(-1, n_rep).any(-1)
        linear_kv = torch.tensor([op == "linear" for op in rt.operators]).view(-1, n_rep).all(-1)
        plan_layer.store(key, value, layout.k_pos, sink_eff, window, dense_kv, linear_kv)
    return out.transpose(1, 2).contiguous(), None


def _attend_plan_cache(rt, plan_layer, query, key, value, layout: KeyLayout, feats: CallFeatures):
    """New tokens against a PlanCache that already holds the sequence's kept slots."""
    if layout.allowed is not None:
        raise CompressError("a custom attention mask cannot be combined with PlanCache after the prefill; "
                            "use a DynamicCache (or no cache) for masked continuation")
    nq = query.shape[2]
    if getattr(layout, "q_pos", None) is not None and layout.q_pos.shape[-1] == nq and layout.k_pos.shape[-1] != nq:
        new_pos = layout.q_pos  # from our mask builder: padding-aware real positions
    else:
        new_pos = plan_layer.n_real[:, None] + torch.arange(nq, device=query.device)
    plan_layer.append(key, value, new_pos)
    out = plan_layer.attend(query, new_pos, feats.scaling, feats.native_window, relu_heads=rt.relu_heads,
                            linear_heads=rt.linear_heads, softcap=feats.softcap, s_aux=feats.s_aux,
                            dropout=feats.dropout)
    plan_layer.evict()
    return out.transpose(1, 2).contiguous()


def _prefill(rt, query, key, value, layout: KeyLayout, sink_eff, window, feats: CallFeatures):
    """Attention of every query of a call with no PlanCache past: the fast kernels where they apply, else the
    masked reference (chunks after a past, custom masks, softcap / attention sinks / dropout, autograd)."""
    nq, nk = query.shape[2], key.shape[2]
    valid = layout.k_pos >= 0
    differentiable = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    out = None
    if (nq == nk and layout.allowed is None and feats.kernel_ok and not differentiable
            and (feats.native_window is None or feats.native_window >= nk) and torch.equal(layout.q_pos, layout.k_pos)):
        out = _fast_prefill(query, key, value, sink_eff, window, feats.scaling, valid)
    span = torch.where(window >= DENSE_SPAN, DENSE_SPAN, sink_eff + window)
    if out is None:
        out = reference_attention(query, key, value, sink_eff, span, feats.scaling, q_pos=layout.q_pos,
                                  k_pos=layout.k_pos, k_valid=valid, native_window=feats.native_window,
                                  allowed=layout.allowed, softcap=feats.softcap, s_aux=feats.s_aux,
                                  dropout=feats.dropout)
    if rt.relu_heads or rt.linear_heads:
        out = _other_operators(rt, out, query, key, value, feats.scaling, layout, valid, sink_eff, span,
                               feats.native_window)
    return out


def _other_operators(rt, out, query, key, value, scaling, layout, valid, sink_eff, span, native):
    """Overwrite the heads whose operator is not softmax: relu-softmax (same key set) and linear attention."""
    from kernels.operators import head_subset, linear_attention, relu_softmax_attention
    from kernels.reference import pattern_mask

    out = out.clone()
    if rt.linear_heads:
        h = rt.linear_heads
        qs, ks, vs = head_subset(query, key, value, h)
        out[:, h] = linear_attention(qs, ks, vs, scaling, k_valid=valid).to(out.dtype)
    if rt.relu_heads:
        h = rt.relu_heads
        qs, ks, vs = head_subset(query, key, value, h)
        mask = pattern_mask(layout.q_pos, layout.k_pos, valid, sink_eff[:, h], span[:, h], native, layout.allowed)
        out[:, h] = relu_softmax_attention(qs, ks, vs, mask, scaling).to(out.dtype)
    return out


def _fast_prefill(q, k, v, sink_eff, window, scale, valid):
    """The kernel path for a prefill (no past): whole batch, or sample by sample over real tokens when padded."""
    if os.environ.get("COMPRESS_ATTENTION", "auto") == "reference":
        return None
    from kernels.dispatch import sparse_attention, sparse_attention_padded

    n = q.shape[2]
    span = torch.where(window >= DENSE_SPAN, n, sink_eff + window).clamp(max=n)
    if bool(valid.all()) and bool((span == span[0]).all()) and bool((sink_eff == sink_eff[0]).all()):
        return sparse_attention(q, k, v, sink_eff[0], span[0], scale)
    return sparse_attention_padded(q, k, v, sink_eff, span, valid, scale)


# -- our cache reaches the function through a forward pre-hook -------------------------------------------------
def _plan_cache_layer(module) -> PlanCacheLayer | None:
    cache = module.__dict__.get("_compress_cache")
    return cache.layers[module.layer_idx] if isinstance(cache, PlanCache) else None


def _capture_cache(module, args, kwargs):
    found = None
    for v in list(kwargs.values()) + list(args):
        if isinstance(v, Cache):
            found = v
            break
    module.__dict__["_compress_cache"] = found


def _release_cache(module, args, kwargs, output):
    module.__dict__["_compress_cache"] = None


def attention_modules(model):
    """The modules that call the attention function (they carry ``layer_idx`` and ``config``)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and "Attention" in type(m).__name__]
    seen, out = set(), []
    for m in mods:
        if m.layer_idx not in seen:  # some models wrap the attention in another *Attention module
            seen.add(m.layer_idx)
            out.append(m)
    return out


def install_cache_hooks(model) -> None:
    """Let a PlanCache passed to forward/generate reach the attention function (idempotent)."""
    for m in attention_modules(model):
        if not m.__dict__.get("_compress_hooked"):
            m.register_forward_pre_hook(_capture_cache, with_kwargs=True)
            m.register_forward_hook(_release_cache, with_kwargs=True)
            m.__dict__["_compress_hooked"] = True


# -- apply ---------------------------------------------------------------------------------------------------
# config attributes of attention features a sink+window plan cannot express (value that switches them on)
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


def apply(model, plan: Plan):
    """Patch ``model`` in place to run ``plan``; returns the model.

    Raises CompressError when the model does not route through AttentionInterface, has an attention feature the plan
    cannot honour (:func:`check_attention_features`), or does not match the plan's model identity."""
    check_model_supported(model, "patched")
    check_attention_features(model)
    ident = identity_from_config(model.config)
    plan.model.check_matches(ident, "the plan")
    model.config.compress_plan = plan.model_dump(mode="json")
    for m in attention_modules(model):
        m.__dict__.pop("_compress_runtime", None)
    model.set_attn_implementation(ATTN_NAME)
    install_cache_hooks(model)
    return model


def unapply(model, implementation: str = "sdpa"):
    """Back to a stock attention implementation (the plan stays in the config but is not used)."""
    model.set_attn_implementation(implementation)
    return model


def plan_of(model) -> Plan | None:
    data = getattr(model.config, "compress_plan", None)
    return None if data is None else _plan_from_config(model.config)


AttentionInterface.register(ATTN_NAME, compress_attention)
AttentionMaskInterface.register(ATTN_NAME, key_layout_mask)
