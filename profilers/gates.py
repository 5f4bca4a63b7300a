"""`compress profile --method gates`: learn one gate per head that mixes an expensive and a cheap operator
(DuoAttention's retrieval/streaming gates, MPCViT's ReLU-softmax/scaling-attention NAS).

For every head, ``out = a * op_expensive + (1 - a) * op_cheap`` with ``a = sigmoid(logit)`` (one logit per KV head
by default -- a GQA group shares its gate, as in DuoAttention -- or per query head), initialised near 1. The pairs:

=====================  ==========================  ==============================================================
pair                   expensive                   cheap
=====================  ==========================  ==============================================================
``full_vs_window``     dense causal softmax        softmax over ``sink`` first tokens + recent tokens, ``span`` in
                                                   all (``window=(sink, span)``, :mod:`plans.span` semantics)
``softmax_vs_relu``    dense causal softmax        ReLU-softmax over the same keys (:mod:`kernels.operators`)
``softmax_vs_linear``  dense causal softmax        causal linear (scaling) attention (:mod:`kernels.operators`)
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
profile with :func:`search_space.operators.select_operators`.

The attention function is registered as :data:`GATES_ATTN` (with HF's ``sdpa_mask`` in AttentionMaskInterface,
so natively windowed layers get their mask); the model's implementation, train/eval mode and ``requires_grad``
flags are restored afterwards. Memory: the dense operator is sdpa (no N x N saved); the window operator saves one
shared (N, N) mask per layer; ReLU-softmax is recomputed in the backward (activation checkpointing), so only one
layer's (Hq, N, N) scores are alive at a time; the linear operator saves O(N D + N/C D^2) per head.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from plans.errors import CompressError
from plans.identity import identity_from_config
from plans.span import visibility_mask
from profilers.profile_format import Profile, ProfileMeta, save_profile
from profilers.profile_run import check_model_supported, frozen_attention_mode, tool_version
from profilers.progress import progress as progress_helper
from profilers.samples import Sample

GATES_ATTN = "compress_gates"
"""Name under which :func:`gates_attention` is registered."""

PAIRS = ("full_vs_window", "softmax_vs_relu", "softmax_vs_linear")
Pair = Literal["full_vs_window", "softmax_vs_relu", "softmax_vs_linear"]
CONTROLLER_ATTR = "_compress_gate_controller"
DEFAULT_WINDOW = (64, 256)


# --------------------------------------------------------------------------------------------------------------
# the gates and the attention function


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
            from kernels.operators import relu_softmax_attention

            def relu(q, k, v):
                return relu_softmax_attention(q, k, v, mask, scaling)

            if torch.is_grad_enabled() and query.requires_grad:  # keep only q, k, v; recompute in backward
                return torch.utils.checkpoint.checkpoint(relu, query, key, value, use_reentrant=False)
            return relu(query, key, value)
        from kernels.operators import linear_attention

        return linear_attention(query, key, value, scaling)  # no native window for the linear operator


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
    ctl: GateController | None = getattr(module, CONTROLLER_ATTR, None)
    if ctl is not None:
        layer = int(module.layer_idx)
        ctl.calls[layer] = ctl.calls.get(layer, 0) + 1
    if ctl is None or ctl.teacher:
        return exp.transpose(1, 2).contiguous(), None
    cheap = ctl.cheap(query, key, value, mask, scaling)
    a = ctl.gates_q()[layer].to(exp.dtype)[None, :, None, None]
    out = cheap + a * (exp - cheap)
    return out.transpose(1, 2).contiguous(), None


def register_gates_attention() -> str:
    """Register :func:`gates_attention` (and HF's ``sdpa_mask``) under :data:`GATES_ATTN`; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GATES_ATTN, gates_attention)
    AttentionMaskInterface.register(GATES_ATTN, sdpa_mask)
    return GATES_ATTN


@contextlib.contextmanager
def gates_mode(model, controller: GateController):
    """Switch to the gates attention, eval mode, frozen weights, controller attached; restore everything after."""
    register_gates_attention()
    marked = []
    with frozen_attention_mode(model, GATES_ATTN, "gates") as mt:
        try:
            for m in model.modules():
                if hasattr(m, "layer_idx") and "Attention" in type(m).__name__:
                    m.__dict__[CONTROLLER_ATTR] = controller  # not setattr: keep it out of the module tree
                    marked.append(m)
            if not marked:
                raise CompressError(f"model type {mt!r}: no attention modules with a layer_idx found")
            yield
        finally:
            for m in marked:
                m.__dict__.pop(CONTROLLER_ATTR, None)


# --------------------------------------------------------------------------------------------------------------
# the driver


def _positions(sample: Sample, positions: str) -> torch.Tensor:
    if positions == "targets":
        tgt = torch.nonzero(sample.loss_mask[1:]).squeeze(-1)  # position t - 1 predicts target t
        if tgt.numel():
            return tgt
    elif positions != "all":
        raise CompressError(f"positions must be 'targets' or 'all', got {positions!r}")
    return torch.arange(sample.length)


def _hidden(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.base_model(input_ids=ids[None], use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h[0]


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


def run_gates(
    model,
    samples_by_length: dict[int, list[Sample]],
    out_stem: str | Path | None,
    *,
    pair: Pair = "full_vs_window",
    window: tuple[int, int] = DEFAULT_WINDOW,
    steps: int = 200,
    lr: float = 0.05,
    l1: float = 0.05,
    granularity: Literal["kv_head", "query_head"] = "kv_head",
    block: int = 64,
    positions: Literal["targets", "all"] = "targets",
    init_logit: float = 3.0,
    progress: bool = True,
    seed: int = 0,
    model_name: str | None = None,
) -> Profile:
    """Train per-head gates for ``pair`` on ``samples_by_length`` ({N: [Sample, ...]}) and write ``out_stem``'s
    ``.safetensors``/``.json`` (skipped when ``out_stem`` is None). Returns the Profile (see the module docstring)."""
    if pair not in PAIRS:
        raise CompressError(f"unknown gate pair {pair!r} (choose from {', '.join(PAIRS)})")
    if steps < 0 or lr <= 0 or l1 < 0 or block <= 0:
        raise CompressError(f"bad settings: steps={steps}, lr={lr}, l1={l1}, block={block}")
    if not samples_by_length:
        raise CompressError("no calibration samples given")
    check_model_supported(model)
    identity = identity_from_config(model.config, name=model_name)
    lengths = sorted(int(n) for n in samples_by_length)
    flat: list[tuple[int, Sample]] = []
    for n in lengths:
        ss = samples_by_length[n]
        if not ss:
            raise CompressError(f"length {n}: no samples")
        for i, s in enumerate(ss):
            if s.length != n:
                raise CompressError(f"length {n}: sample {i} has {s.length} tokens, not {n}")
            flat.append((n, s))
    sink, span = int(window[0]), int(window[1])
    L, H, Hkv = identity.num_layers, identity.num_heads, identity.num_kv_heads
    ctl = GateController(L, H, Hkv, pair=pair, window=(sink, span), granularity=granularity, init_logit=init_logit)
    dev = model.get_input_embeddings().weight.device
    ctl.to(dev)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    history: list[float] = []
    distill_hist: list[float] = []
    prog = progress_helper(f"gates {pair}", total=steps, unit="steps", enabled=progress)
    t0 = time.perf_counter()
    with gates_mode(model, ctl), prog as tick:
        # teachers: dense final hidden states at the scored positions, once per sample
        tick(0, stage=f"gates {pair}: teacher passes")
        teachers = []
        ctl.teacher = True
        with torch.no_grad():
            for n, s in flat:
                pos = _positions(s, positions).to(dev)
                ctl.calls = {}
                h = _hidden(model, s.input_ids.to(dev))[pos].float()
                missing = [i for i in range(L) if ctl.calls.get(i, 0) == 0]
                if missing:
                    raise CompressError(f"gates: the gates attention did not run for layers {missing}; this model's "
                                        "attention does not all route through transformers' AttentionInterface")
                teachers.append((pos, h, h.pow(2).mean().clamp(min=1e-12)))
        ctl.teacher = False
        tick(0, stage=f"gates {pair}")
        opt = torch.optim.Adam(ctl.parameters(), lr=lr)
        order: list[int] = []
        for step in range(steps):
            if not order:
                order = list(range(len(flat)))
                rng.shuffle(order)
            idx = order.pop()
            n, s = flat[idx]
            pos, tgt, energy = teachers[idx]
            with torch.enable_grad():
                h = _hidden(model, s.input_ids.to(dev))[pos].float()
                dist = (h - tgt).pow(2).mean() / energy
                loss = dist + l1 * ctl.gates().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            distill_hist.append(float(dist.detach()))
            if progress:
                tick(1, loss=history[-1], gate=float(ctl.gates().detach().mean()))
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        gq, gkv = ctl.gates_q().detach().cpu(), ctl.gates_kv().detach().cpu()
    tensors = gate_profile_tensors(gq, gkv, lengths, block)
    counts: dict[int, int] = {n: len(samples_by_length[n]) for n in lengths}
    meta = ProfileMeta(
        tool_version=tool_version(), method="gates", model=identity, lengths=lengths, samples=counts,
        loss_mode="hidden_mse", block=block, sink_sizes=[sink],
        extra={
            "pair": pair, "window": [sink, span], "granularity": granularity,
            "gates_kv": gkv.tolist(), "gates_q": gq.tolist(),
            "steps": int(steps), "lr": float(lr), "l1": float(l1), "init_logit": float(init_logit),
            "positions": positions, "seed": int(seed), "dtype": str(next(model.parameters()).dtype),
            "loss_first": history[:1], "loss_last": history[-1:],
            "distill_last": distill_hist[-1:], "history": _subsample(history, 200),
            "seconds_this_run": seconds,
            "encoding": "gate in the last distance bucket of dist.*; sinkdist zero (see profilers.gates)",
        },
    )
    profile = Profile(meta=meta, tensors=tensors)
    if out_stem is not None:
        save_profile(profile, out_stem)
    return profile


def _subsample(xs: list[float], k: int) -> list[float]:
    if len(xs) <= k:
        return list(xs)
    step = len(xs) / k
    return [xs[int(i * step)] for i in range(k)]


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


__all__ = ["run_gates", "GATES_ATTN", "PAIRS", "GateController", "gates_attention", "register_gates_attention",
           "gates_mode", "gate_profile_tensors", "profile_gates"]
