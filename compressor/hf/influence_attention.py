"""The attention function used while profiling influence (registered as :data:`INFLUENCE_ATTN`).

It is plain sdpa, except in a layer whose attention module carries an :class:`profilers.influence.InfluenceCollector`
(``module_state(module).collector``, set by :func:`influence_mode`) while a sample is open and grad is needed:
there the layer runs as :class:`_ProfiledAttention`, whose forward is sdpa under no_grad saving only q, k, v and
whose backward is the collector's blockwise recompute (:func:`profilers.influence.reduce_layer_influence`): it yields
dq, dk, dv and, from the same blocks, the layer's influence. See :mod:`profilers.influence` for the math.

``sdpa_mask`` is registered with ``AttentionMaskInterface`` under the same name, so natively windowed layers get
their real mask. Logit soft-capping (Gemma2) and attention sinks (``s_aux``) are refused with a CompressError.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from compressor.hf.modules import attached_attention_mode, module_state
from plans.errors import CompressError
from profilers.influence import InfluenceCollector

INFLUENCE_ATTN = "compress_influence"
"""Name under which :func:`influence_attention` is registered (``model.set_attn_implementation(INFLUENCE_ATTN)``)."""


class _ProfiledAttention(torch.autograd.Function):
    """Causal (optionally masked) attention whose backward is the blockwise recompute: it yields dq, dk, dv and,
    from the same blocks, the layer's influence. Only q, k, v are saved (sdpa's backward would also keep an
    explicit mask as a float32 N x N copy per layer, which windowed layers would otherwise pay)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling, collector, layer):
        with torch.no_grad():
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, scale=scaling, is_causal=mask is None and query.shape[2] > 1
            )
        ctx.save_for_backward(query, key, value)
        ctx.mask, ctx.scaling, ctx.collector, ctx.layer = mask, scaling, collector, layer
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        m = ctx.mask
        if m is not None:
            m = m[0] if m.dim() == 4 else m
        dq, dk, dv = ctx.collector.reduce(ctx.layer, q[0], k[0], v[0], do[0], ctx.scaling, m, True)
        ctx.mask = ctx.collector = None
        return dq[None], dk[None], dv[None], None, None, None, None


def influence_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: sdpa. When a collector is attached to ``module``, a sample is open and grad is
    needed, the attention runs as :class:`_ProfiledAttention`, whose backward reduces this layer's influence.
    Without a collector it is plain sdpa."""
    if kwargs.get("softcap") is not None:
        raise CompressError("profiling: attention logit soft-capping (e.g. Gemma2) is not supported by the sdpa-based profiler")
    if kwargs.get("s_aux") is not None:
        raise CompressError("profiling: attention sinks (s_aux, e.g. gpt-oss) are not supported by the profiler")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:  # same head order as HF repeat_kv: query head h uses kv head h // n_rep
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != key.shape[-2]:
        mask = mask[..., : key.shape[-2]]
    p = dropout if module.training else 0.0
    coll = module_state(module).collector
    wants_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    layer = None
    if coll is not None and wants_grad:
        source = f"attention module {type(module).__name__}"
        layer = coll.check_forward(getattr(module, "layer_idx", None), query, key, source)
    if layer is not None:
        if p:
            raise CompressError("profiling needs the model in eval mode (attention dropout is active)")
        out = _ProfiledAttention.apply(query, key, value, mask, float(scaling), coll, layer)
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=p, scale=scaling,
            is_causal=mask is None and query.shape[2] > 1,
        )
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def influence_mode(model, collector: InfluenceCollector):
    """Switch the model to the profiling attention, eval mode and frozen parameters, with ``collector`` attached to
    every attention module; detach it and restore everything after."""
    with attached_attention_mode(model, INFLUENCE_ATTN, "profiling", collector=collector):
        yield


AttentionInterface.register(INFLUENCE_ATTN, influence_attention)
AttentionMaskInterface.register(INFLUENCE_ATTN, sdpa_mask)
