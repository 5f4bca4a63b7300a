"""`compress profile --method gates`: learn one gate per head that mixes an expensive and a cheap operator
(DuoAttention's retrieval/streaming gates, MPCViT's ReLU-softmax/scaling-attention NAS).

For every head, ``out = a * op_expensive + (1 - a) * op_cheap`` with ``a = sigmoid(logit)`` (one logit per KV head
by default -- a GQA group shares its gate, as in DuoAttention -- or per query head), initialised near 1. The pairs:

=====================  ==========================  ==============================================================
pair                   expensive                   cheap
=====================  ==========================  ==============================================================
``full_vs_window``     dense causal softmax        softmax over ``sink`` first tokens + recent tokens, ``span`` in
                                                   all (``window=(sink, span)``, :mod:`plans.span` semantics)
``softmax_vs_relu``    dense causal softmax        ReLU-softmax over the same keys (:mod:`attention_kernels.cheap_operators`)
``softmax_vs_linear``  dense causal softmax        causal linear (scaling) attention (:mod:`attention_kernels.cheap_operators`)
=====================  ==========================  ==============================================================

Base weights are frozen (only the gate logits train). Loss per step, one calibration sample at a time::

    loss = ||H_gated - H_dense||^2 / ||H_dense||^2  +  l1 * mean(a)

where H are the final hidden states of the base model (``model.base_model``, after the final norm, as
DuoAttention) at the sample's predicting positions (t - 1 for every target t of ``loss_mask``; all positions with
``positions="all"`` or when a sample has no targets). The dense states are computed once per sample (no_grad,
all gates forced to the expensive operator). The distillation term is normalised by the teacher's energy so that
``l1`` means the same for every model; ``mean(a)`` is DuoAttention's normalisation of the L1 term (``l1 * mean`` =
``(l1 / #gates) * sum``). Adam on the logits, ``steps`` single-sample steps in a seeded order.

The result is written in the profile format (:mod:`profilers.profile_format`, ``meta.method = "gates"``) so that the
existing search works unchanged for ``full_vs_window``: the gate is a keep score put in the LAST distance bucket,

    dist.{q,kv}.{N}[L, H, nb]       = 0 except dist[..., nb - 1] = gate
    sinkdist.{q,kv}.{N}[L, H, 1, nb] = 0                   (meta.sink_sizes = [sink])

so ``Profile.masked_loss(N, sink, w)`` is exactly the gate for every window ``w <= (nb - 1) * block`` (the
farthest keys are masked), tapers linearly to 0 inside the last bucket (MoA's in-bucket interpolation), and a dense
head costs 0. Raw gates are stored too: ``gate.q`` [L, Hq] and ``gate.kv`` [L, Hkv] (float64), and as lists in
``meta.extra`` (``gates_q``, ``gates_kv``) with ``pair``, ``window``, ``granularity`` and the training settings.
With ``granularity="kv_head"`` ``gate.q`` repeats each KV gate over its group; with ``"query_head"`` ``gate.kv``
is the group maximum (a KV head is needed as soon as one of its query heads is). Select operators from a gates
profile with :func:`search_space.operator_selection.select_operators`.

This module holds the pure parts: the gate parametrisation and the cheap operators (:class:`GateController`, plain
torch), the profile encoding (:func:`gate_profile_tensors`) and its reader (:func:`profile_gates`). The attention
function that mixes the operators inside an HF model is :mod:`compressor.hf.gate_attention` (registered as
``"compress_gates"``, with HF's ``sdpa_mask`` so natively windowed layers get their mask); the training driver is
:func:`compressor.gate_profile.run_gates`, which restores the model's implementation, train/eval mode and
``requires_grad`` flags afterwards. Memory: the dense operator is sdpa (no N x N saved); the window operator saves
one shared (N, N) mask per layer; ReLU-softmax is recomputed in the backward (activation checkpointing), so only
one layer's (Hq, N, N) scores are alive at a time; the linear operator saves O(N D + N/C D^2) per head.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from plans.defaults import DEFAULT_LOCAL_SPAN, DEFAULT_SINK
from plans.errors import CompressError
from plans.span import visibility_mask
from profilers.profile_format import Profile

PAIRS = ("full_vs_window", "softmax_vs_relu", "softmax_vs_linear")
Pair = Literal["full_vs_window", "softmax_vs_relu", "softmax_vs_linear"]
DEFAULT_WINDOW = (DEFAULT_SINK, DEFAULT_LOCAL_SPAN)


# --------------------------------------------------------------------------------------------------------------
# the gates and the cheap operators


class GateController(torch.nn.Module):
    """The learnable gate logits ``[L, H_gate]`` (H_gate = KV heads or query heads) and the cheap operator."""

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, *, pair: str = "full_vs_window",
                 window: tuple[int, int] = DEFAULT_WINDOW, granularity: str = "kv_head", init_logit: float = 3.0):
        super().__init__()
        if pair not in PAIRS:
            raise CompressError(f"unknown gate pair {pair!r} (choose from {', '.join(PAIRS)})")
        if granularity not in ("kv_head", "query_head"):
            raise CompressError(f"granularity must be kv_head or query_head, got {granularity!r}")
        if num_heads % num_kv_heads:
            raise CompressError(f"{num_heads} query heads do not split into {num_kv_heads} KV heads")
        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads
        self.group = num_heads // num_kv_heads
        self.pair, self.granularity = pair, granularity
        self.sink, self.span = int(window[0]), int(window[1])
        if self.sink < 0 or self.span < 1:
            raise CompressError(f"window must be (sink >= 0, span >= 1), got {tuple(window)}")
        h = num_kv_heads if granularity == "kv_head" else num_heads
        self.logits = torch.nn.Parameter(torch.full((num_layers, h), float(init_logit)))
        self.teacher = False  # True: every head runs the expensive operator only
        self.calls: dict[int, int] = {}

    def gates(self) -> torch.Tensor:
        """[L, H_gate] in (0, 1)."""
        return torch.sigmoid(self.logits)

    def gates_q(self) -> torch.Tensor:
        """[L, Hq]: the gate of every query head."""
        a = self.gates()
        return a.repeat_interleave(self.group, dim=1) if self.granularity == "kv_head" else a

    def gates_kv(self) -> torch.Tensor:
        """[L, Hkv]: the KV gate (group maximum for query-head gates)."""
        a = self.gates()
        return a if self.granularity == "kv_head" else a.view(self.num_layers, self.num_kv_heads, self.group).amax(-1)

    def cheap(self, query, key, value, mask, scaling):
        """The cheap operator; key/value already repeated to the query heads; mask bool (B, 1, q, k) or None."""
        nq, nk = query.shape[2], key.shape[2]
        if self.pair == "full_vs_window":
            win = visibility_mask(nq, nk, torch.tensor(self.sink, device=query.device),
                                  torch.tensor(self.span, device=query.device))[None, None]
            m = win if mask is None else (mask & win)
            return F.scaled_dot_product_attention(query, key, value, attn_mask=m, scale=scaling)
        if self.pair == "softmax_vs_relu":
            from attention_kernels.cheap_operators import relu_softmax_attention

            def relu(q, k, v):
                return relu_softmax_attention(q, k, v, mask, scaling)

            if torch.is_grad_enabled() and query.requires_grad:  # keep only q, k, v; recompute in backward
                return torch.utils.checkpoint.checkpoint(relu, query, key, value, use_reentrant=False)
            return relu(query, key, value)
        from attention_kernels.cheap_operators import linear_attention

        return linear_attention(query, key, value, scaling)  # no native window for the linear operator


# --------------------------------------------------------------------------------------------------------------
# the profile encoding


def gate_profile_tensors(gates_q: torch.Tensor, gates_kv: torch.Tensor, lengths, block: int) -> dict[str, torch.Tensor]:
    """The profile tensors encoding gates as keep scores (see the module docstring)."""
    t: dict[str, torch.Tensor] = {"gate.q": gates_q.double().clone(), "gate.kv": gates_kv.double().clone()}
    for n in lengths:
        nb = math.ceil(n / block)
        for per, g in (("q", gates_q), ("kv", gates_kv)):
            d = torch.zeros(*g.shape, nb, dtype=torch.float64)
            d[..., nb - 1] = g.double()
            t[f"dist.{per}.{n}"] = d
            t[f"sinkdist.{per}.{n}"] = torch.zeros(*g.shape, 1, nb, dtype=torch.float64)
    return t


def profile_gates(profile: Profile) -> dict:
    """The gates stored in a gates profile: {"q": [L, Hq], "kv": [L, Hkv], "pair", "window", "granularity"}."""
    if profile.meta.method != "gates":
        raise CompressError(f"this profile was made with method {profile.meta.method!r}, not 'gates'")
    ex = profile.meta.extra
    gq = profile.tensors.get("gate.q")
    gkv = profile.tensors.get("gate.kv")
    if gq is None:
        gq = torch.tensor(ex["gates_q"], dtype=torch.float64)
    if gkv is None:
        gkv = torch.tensor(ex["gates_kv"], dtype=torch.float64)
    return {"q": gq, "kv": gkv, "pair": ex.get("pair", "full_vs_window"),
            "window": tuple(ex.get("window", DEFAULT_WINDOW)), "granularity": ex.get("granularity", "kv_head")}


__all__ = ["DEFAULT_WINDOW", "PAIRS", "GateController", "Pair", "gate_profile_tensors", "profile_gates"]
