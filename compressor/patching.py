"""Apply a plan to a stock HF causal LM through transformers' AttentionInterface (no modeling files copied).

``apply(model, plan)`` validates the plan against the model, stores it in ``model.config.compress_plan`` and
switches the attention implementation to ``"compress"``; a saved folder reloads with plain
``AutoModelForCausalLM.from_pretrained(dir)`` once ``compressor`` is imported (it registers the function).

The attention function receives RoPE'd ``q`` (B, Hq, q, D), un-repeated ``k``/``v`` (B, Hkv, kv, D) and the
key-validity mask built by our mask builder, and returns (B, q, Hq, D). Spans are evaluated at the input
length N of each sequence (real tokens, pads excluded), fixed at the prefill length while decoding.
"""

from __future__ import annotations

import os

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

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


# -- the mask builder: key validity only -------------------------------------------------------------------
def key_validity_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, attention_mask=None, **kw):
    """Registered in AttentionMaskInterface: returns (B, 1, 1, kv) bool key validity, or None without padding.

    The pattern itself (causal, sink, windows, a native sliding window) is applied by the attention function
    from real positions, so the HF mask only needs to say which keys are pads.
    """
    if attention_mask is None:
        return None
    am = attention_mask.to(torch.bool)
    if kv_length is not None:
        am = am[:, kv_offset : kv_offset + kv_length]
        if am.shape[-1] < kv_length:  # HF may pass the 2D mask shorter than kv_length: the rest is real
            am = torch.cat([am, am.new_ones(am.shape[0], kv_length - am.shape[-1])], dim=-1)
    if bool(am.all()):
        return None
    return am[:, None, None, :]


# -- plan lookup on modules ----------------------------------------------------------------------------------
class _LayerRuntime:
    """The plan's view for one layer: sinks per query head and spans per input length (memoised)."""

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

    def sink_window(self, n: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(sink_eff, window) as (B, Hq) for per-sample input lengths n (B,)."""
        spans = torch.stack([self.spans(int(x)) for x in n.tolist()]).to(device)
        spans = torch.minimum(spans, n.to(device)[:, None].clamp(min=1))
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
def compress_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: per-head sink+window attention following the model's plan."""
    rt = _runtime(module)
    b, hq, nq, _ = query.shape
    native = kwargs.get("sliding_window") or None
    cache_layer = _plan_cache_layer(module)

    if cache_layer is not None and cache_layer.has_states:  # decoding (or a later chunk) with our bounded cache
        valid_new = _validity(attention_mask, b, cache_layer.cum, query.device)[:, -nq:]
        new_pos = torch.where(valid_new, cache_layer.n_real[:, None] + valid_new.long().cumsum(-1) - 1, -1)
        cache_layer.append(key, value, new_pos)
        out = cache_layer.attend(query, new_pos, scaling, native, relu_heads=rt.relu_heads, linear_heads=rt.linear_heads)
        cache_layer.evict()
        return out.transpose(1, 2).contiguous(), None

    nk = key.shape[2]
    valid = _validity(attention_mask, b, nk, query.device)
    k_pos = torch.where(valid, valid.long().cumsum(-1) - 1, -1)
    q_pos = k_pos[:, nk - nq :]
    n = _input_length(module, kwargs, valid, nq, nk)
    sink_eff, window = rt.sink_window(n, query.device)
    differentiable = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    out = None
    if nq == nk and not differentiable and (native is None or native >= nk):
        out = _fast_prefill(query, key, value, sink_eff, window, scaling, valid, n)
    span = torch.where(window >= DENSE_SPAN, DENSE_SPAN, sink_eff + window)
    if out is None:
        out = reference_attention(query, key, value, sink_eff, span, scaling, q_pos=q_pos, k_pos=k_pos, k_valid=valid,
                                  native_window=native)
    if rt.relu_heads or rt.linear_heads:
        out = _other_operators(rt, out, query, key, value, scaling, q_pos, k_pos, valid, sink_eff, span, native)
    if cache_layer is not None:  # prefill into our bounded cache
        n_rep = hq // key.shape[1]
        dense_kv = rt.keep_all_q.view(-1, n_rep).any(-1)
        linear_kv = torch.tensor([op == "linear" for op in rt.operators]).view(-1, n_rep).all(-1)
        cache_layer.store(key, value, k_pos, sink_eff, window, dense_kv, linear_kv)
    return out.transpose(1, 2).contiguous(), None


def _other_operators(rt, out, query, key, value, scaling, q_pos, k_pos, valid, sink_eff, span, native):
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
        mask = pattern_mask(q_pos, k_pos, valid, sink_eff[:, h], span[:, h], native)
        out[:, h] = relu_softmax_attention(qs, ks, vs, mask, scaling).to(out.dtype)
    return out


def _validity(attention_mask, b, nk, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(b, nk, dtype=torch.bool, device=device)
    if attention_mask.dtype != torch.bool:  # a float additive mask from another builder
        m = attention_mask[:, 0, -1, :] > torch.finfo(attention_mask.dtype).min / 2
    else:
        m = attention_mask[:, 0, -1, :]
    if m.shape[-1] != nk:
        raise RuntimeError(f"compress attention: mask covers {m.shape[-1]} keys, got {nk}")
    return m.expand(b, nk)


def _input_length(module, kwargs, valid, nq, nk) -> torch.Tensor:
    """N per sample: an explicit ``compress_n0`` kwarg, else the prefill length remembered on the module."""
    b = valid.shape[0]
    if kwargs.get("compress_n0") is not None:
        return torch.as_tensor(kwargs["compress_n0"], device=valid.device).reshape(-1).expand(b).clone()
    n = valid.sum(-1)
    if nq == nk:  # a prefill (or an uncached forward): remember N for the decode steps that follow
        module.__dict__["_compress_n0"] = n
        return n
    n0 = module.__dict__.get("_compress_n0")
    return n0 if n0 is not None and n0.shape[0] == b else n


def _fast_prefill(q, k, v, sink_eff, window, scale, valid, n_real):
    """The kernel path for a prefill (no cache before it): whole batch, or sample by sample when left-padded."""
    if os.environ.get("COMPRESS_ATTENTION", "auto") == "reference":
        return None
    from kernels.dispatch import sparse_attention, sparse_attention_left_padded

    n = q.shape[2]
    span = torch.where(window >= DENSE_SPAN, n, sink_eff + window).clamp(max=n)
    if bool(valid.all()) and bool((n_real == n_real[0]).all()):
        return sparse_attention(q, k, v, sink_eff[0], span[0], scale)
    try:
        return sparse_attention_left_padded(q, k, v, sink_eff, span, valid, scale)
    except ValueError:  # not left padding (e.g. right padding): the masked reference handles it
        return None


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
def apply(model, plan: Plan):
    """Patch ``model`` in place to run ``plan``; returns the model."""
    check_model_supported(model, "patched")
    ident = identity_from_config(model.config)
    plan.model.check_matches(ident, "the plan")
    model.config.compress_plan = plan.model_dump(mode="json")
    for m in attention_modules(model):
        m.__dict__.pop("_compress_runtime", None)
        m.__dict__.pop("_compress_n0", None)
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
AttentionMaskInterface.register(ATTN_NAME, key_validity_mask)
