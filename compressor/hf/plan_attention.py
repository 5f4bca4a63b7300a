"""The plan's attention function for transformers' AttentionInterface (registered as ``"compress"``).

It receives RoPE'd ``q`` (B, Hq, q, D), un-repeated ``k``/``v`` (B, Hkv, kv, D) and the key layout built by our mask
builder (:mod:`compressor.hf.layout`), and returns (B, q, Hq, D). Spans are ``S = span(N0 + length_offset)`` for each
sequence's prompt length N0 (real tokens of its first forward), never capped by N0 and fixed while decoding
(:mod:`plans.span`); N0 belongs to the sequence (:mod:`compressor.hf.sequence`: on its cache, in uncached
generation's ``compress_n0`` kwarg, or declared with the call), never on a module. The plan itself reaches the function through the model config
(``config.compress_plan``) and is viewed per layer by :class:`LayerRuntime`, kept in the module's
:class:`compressor.hf.modules.ModuleState`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from compressor.hf.layout import KeyLayout, call_layout, key_layout_mask
from compressor.hf.modules import ATTN_NAME, call_cache, module_state
from compressor.hf.plan_cache import PlanCache
from compressor.hf.sequence import prompt_lengths
from attention_kernels.dispatch import backend, sparse_attention, sparse_attention_padded
from attention_kernels.kv_groups import AttendSpec
from attention_kernels.cheap_operators import head_subset, linear_attention, relu_softmax_attention
from attention_kernels.reference import attention_probabilities, pattern_mask, reference_attention, repeat_kv
from attention_kernels.options import KeyPositions, ScoreOptions
from plans.errors import CompressError
from plans.io import plan_from_dict
from plans.schema import DensePattern, Plan
from plans.span import DENSE_SPAN, split_span_tensor



# -- plan lookup on modules ----------------------------------------------------------------------------------
class LayerRuntime:
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


def layer_runtime(module) -> LayerRuntime:
    """The module's :class:`LayerRuntime`, built on first use from ``module.config.compress_plan``."""
    st = module_state(module)
    if st.runtime is None:
        st.runtime = LayerRuntime(plan_from_config(module.config), module.layer_idx)
    return st.runtime


_PLAN_CACHE: dict[int, tuple[dict, Plan]] = {}


def plan_from_config(config) -> Plan:
    """The validated :class:`Plan` stored in ``config.compress_plan`` (parsed once per config object)."""
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
    rt = layer_runtime(module)
    feats = call_features(scaling, dropout, kwargs)
    cache = call_cache(module)
    plan_layer = cache.layers[module.layer_idx] if isinstance(cache, PlanCache) else None
    if (plan_layer is not None and plan_layer.has_states and attention_mask is not None
            and getattr(attention_mask, "compress_layout", None) is None):
        raise CompressError("a custom 4D attention mask cannot be combined with PlanCache after the prefill (its "
                            "slots hold only the kept tokens); pass a 2D padding mask, or use a DynamicCache (or no "
                            "cache) for masked continuation")
    layout = call_layout(attention_mask, query, key, kwargs.get("position_ids"))
    weights = bool(kwargs.get("output_attentions"))
    if weights and ((plan_layer is not None and plan_layer.has_states) or rt.relu_heads or rt.linear_heads):
        raise CompressError("output_attentions=True: attention weights are defined for softmax heads over the keys of "
                            "the call; not for a PlanCache past (evicted keys are gone) nor for relu_softmax / linear "
                            "heads — use a DynamicCache (or no cache) and a plan of softmax heads")
    if plan_layer is not None and plan_layer.has_states:  # decoding (or a later chunk) with our bounded cache
        return _attend_plan_cache(rt, plan_layer, query, key, value, layout, feats), None
    n_slots = key.shape[2]
    if layout.written < key.shape[2]:  # empty static-cache slots at the end: never attended
        key, value = key[:, :, : layout.written], value[:, :, : layout.written]
        layout = replace(layout, k_pos=layout.k_pos[:, : layout.written],
                         allowed=None if layout.allowed is None else layout.allowed[..., : layout.written])
    n_now = (layout.k_pos >= 0).sum(-1)  # real tokens of each row once this call is done (every document, packed)
    n0 = prompt_lengths(cache, layout.q_start, n_now, kwargs.get("compress_n0"))
    sink_eff, window = rt.sink_window(n0, query.device)
    probs = None
    if weights:
        out, probs = _prefill_with_weights(query, key, value, layout, sink_eff, window, feats, n_slots)
    else:
        out = _prefill(rt, query, key, value, layout, sink_eff, window, feats)
    if plan_layer is not None:  # prefill into our bounded cache
        n_rep = query.shape[1] // key.shape[1]
        dense_kv = rt.keep_all_q.view(-1, n_rep).any(-1)
        linear_kv = torch.tensor([op == "linear" for op in rt.operators]).view(-1, n_rep).all(-1)
        plan_layer.store(key, value, layout.k_pos, sink_eff, window, dense_kv, linear_kv)
    return out.transpose(1, 2).contiguous(), probs


def _prefill_with_weights(query, key, value, layout: KeyLayout, sink_eff, window, feats: CallFeatures, n_slots: int):
    """``output_attentions=True``: the masked reference path, returning its weights (B, Hq, q, n_slots) too (as
    eager attention does; 0 for keys the plan drops and for empty cache slots)."""
    n_rep = query.shape[1] // key.shape[1]
    span = torch.where(window >= DENSE_SPAN, DENSE_SPAN, sink_eff + window)
    mask = pattern_mask(layout.q_pos, layout.k_pos, layout.k_pos >= 0, sink_eff, span, feats.native_window,
                        layout.allowed)
    probs = attention_probabilities(query, repeat_kv(key, n_rep), mask, feats.scaling,
                                    ScoreOptions(softcap=feats.softcap, s_aux=feats.s_aux, dropout=feats.dropout))
    out = probs @ repeat_kv(value, n_rep)
    if probs.shape[-1] < n_slots:
        probs = torch.nn.functional.pad(probs, (0, n_slots - probs.shape[-1]))
    return out, probs


def _attend_plan_cache(rt, plan_layer, query, key, value, layout: KeyLayout, feats: CallFeatures):
    """New tokens against a PlanCache that already holds the sequence's kept slots."""
    if layout.allowed is not None:  # an extra mask function of HF's own (packed sequences, overlays) while decoding
        raise CompressError("an extra attention mask (packed sequences, modality overlays) cannot be combined with "
                            "PlanCache after the prefill; use a DynamicCache (or no cache) for masked continuation")
    nq = query.shape[2]
    if layout.source == "builder":
        new_pos = layout.q_pos  # padding-aware real positions from our mask builder
    else:
        new_pos = plan_layer.n_real[:, None] + torch.arange(nq, device=query.device)
    plan_layer.append(key, value, new_pos)
    spec = AttendSpec(plan_layer.sink_q, plan_layer.window_q, feats.scaling, feats.native_window,
                      frozenset(rt.relu_heads), frozenset(rt.linear_heads), feats.softcap, feats.s_aux, feats.dropout)
    out = plan_layer.attend(query, new_pos, spec)
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
        positions = KeyPositions(q_pos=layout.q_pos, k_pos=layout.k_pos, k_valid=valid, allowed=layout.allowed)
        score = ScoreOptions(native_window=feats.native_window, softcap=feats.softcap, s_aux=feats.s_aux,
                             dropout=feats.dropout)
        out = reference_attention(query, key, value, sink_eff, span, feats.scaling, positions=positions, score=score)
    if rt.relu_heads or rt.linear_heads:
        out = _other_operators(rt, out, (query, key, value), feats, layout, valid, (sink_eff, span))
    return out


def _other_operators(rt, out, qkv, feats, layout, valid, pattern):
    """Overwrite the heads whose operator is not softmax: relu-softmax (same key set) and linear attention.
    ``qkv``: the call's (query, key, value); ``pattern``: the per-head (sink_eff, span)."""
    (query, key, value), (sink_eff, span) = qkv, pattern
    scaling, native = feats.scaling, feats.native_window
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
    if backend(q) == "reference":  # COMPRESS_ATTENTION=reference: the masked reference for everything
        return None
    n = q.shape[2]
    span = torch.where(window >= DENSE_SPAN, n, sink_eff + window).clamp(max=n)
    if bool(valid.all()) and bool((span == span[0]).all()) and bool((sink_eff == sink_eff[0]).all()):
        return sparse_attention(q, k, v, sink_eff[0], span[0], scale)
    return sparse_attention_padded(q, k, v, sink_eff, span, valid, scale)


# -- our cache reaches the function through a forward pre-hook -------------------------------------------------


AttentionInterface.register(ATTN_NAME, compress_attention)
AttentionMaskInterface.register(ATTN_NAME, key_layout_mask)
