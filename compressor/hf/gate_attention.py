"""The attention function used while learning per-head gates (registered as :data:`GATES_ATTN`).

It is sdpa (the expensive operator); in a layer whose attention module carries a
:class:`profilers.gates.GateController` (``module_state(module).controller``, set by :func:`gates_mode`) that is
not in teacher mode, every query head returns ``a * sdpa + (1 - a) * cheap`` with the controller's gate ``a`` and
cheap operator (see :mod:`profilers.gates`). ``sdpa_mask`` is registered with ``AttentionMaskInterface`` under the
same name, so natively windowed layers get their mask.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from compressor.hf.modules import attached_attention_mode, module_state
from plans.errors import CompressError
from profilers.gates import GateController

GATES_ATTN = "compress_gates"
"""Name under which :func:`gates_attention` is registered."""


def gates_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: sdpa (the expensive operator); with a :class:`GateController` attached to the
    module and not in teacher mode, ``a * sdpa + (1 - a) * cheap`` per query head."""
    if kwargs.get("softcap") is not None:
        raise CompressError("gates: attention logit soft-capping (e.g. Gemma2) is not supported")
    if kwargs.get("s_aux") is not None:
        raise CompressError("gates: attention sinks (s_aux, e.g. gpt-oss) are not supported")
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = attention_mask
    if mask is not None:
        if mask.dim() == 4 and mask.shape[-1] != key.shape[-2]:
            mask = mask[..., : key.shape[-2]]
        if mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
    exp = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         is_causal=mask is None and query.shape[2] > 1)
    ctl: GateController | None = module_state(module).controller
    if ctl is not None:
        layer = int(module.layer_idx)
        ctl.calls[layer] = ctl.calls.get(layer, 0) + 1
    if ctl is None or ctl.teacher:
        return exp.transpose(1, 2).contiguous(), None
    cheap = ctl.cheap(query, key, value, mask, scaling)
    a = ctl.gates_q()[layer].to(exp.dtype)[None, :, None, None]
    out = cheap + a * (exp - cheap)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gates_mode(model, controller: GateController):
    """Switch to the gates attention, eval mode, frozen weights, controller attached; restore everything after."""
    with attached_attention_mode(model, GATES_ATTN, "gates", controller=controller):
        yield


AttentionInterface.register(GATES_ATTN, gates_attention)
AttentionMaskInterface.register(GATES_ATTN, sdpa_mask)
