"""`compress profile --method gates`'s driver: learn one gate per head on calibration samples and write a profile.

The method, the loss and the profile encoding are described in :mod:`profilers.gates` (the pure parts: the
:class:`~profilers.gates.GateController` and :func:`~profilers.gates.gate_profile_tensors`); the attention function
that mixes the two operators inside the model is :mod:`compressor.hf.gate_attention`. This module runs the model:
teacher passes (dense final hidden states, once per sample), then ``steps`` single-sample Adam steps on the gate
logits in a seeded order, with base weights frozen and the model's implementation, train/eval mode and
``requires_grad`` flags restored afterwards.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Literal

import torch

from compressor.args import GateArgs
from compressor.hf.gate_attention import gates_mode
from compressor.hf.modules import check_model_supported
from plans.errors import CompressError
from plans.identity import identity_from_config
from plans.schema import tool_version
from profilers.gates import (
    DEFAULT_WINDOW,
    PAIRS,
    GateController,
    Pair,
    gate_profile_tensors,
)
from profilers.profile_format import Profile, ProfileMeta, save_profile
from profilers.progress import progress as progress_helper
from profilers.data.samples import Sample


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


def _subsample(xs: list[float], k: int) -> list[float]:
    if len(xs) <= k:
        return list(xs)
    step = len(xs) / k
    return [xs[int(i * step)] for i in range(k)]


def _check_settings(pair, steps, lr, l1, block, samples_by_length) -> None:
    if pair not in PAIRS:
        raise CompressError(f"unknown gate pair {pair!r} (choose from {', '.join(PAIRS)})")
    if steps < 0 or lr <= 0 or l1 < 0 or block <= 0:
        raise CompressError(f"bad settings: steps={steps}, lr={lr}, l1={l1}, block={block}")
    if not samples_by_length:
        raise CompressError("no calibration samples given")


def _flatten_samples(samples_by_length: dict[int, list[Sample]]) -> tuple[list[int], list[tuple[int, Sample]]]:
    """(sorted lengths, [(N, sample), ...] in length order); every sample of length N has N tokens."""
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
    return lengths, flat


@torch.no_grad()
def _teacher_passes(model, ctl: GateController, flat, positions: str, dev) -> list[tuple]:
    """Dense final hidden states at the scored positions, once per sample: [(positions, states, energy), ...]."""
    teachers = []
    ctl.teacher = True
    for _n, s in flat:
        pos = _positions(s, positions).to(dev)
        ctl.calls = {}
        h = _hidden(model, s.input_ids.to(dev))[pos].float()
        missing = [i for i in range(ctl.num_layers) if ctl.calls.get(i, 0) == 0]
        if missing:
            raise CompressError(f"gates: the gates attention did not run for layers {missing}; this model's "
                                "attention does not all route through transformers' AttentionInterface")
        teachers.append((pos, h, h.pow(2).mean().clamp(min=1e-12)))
    ctl.teacher = False
    return teachers


def _train_gates(model, ctl: GateController, flat, teachers, args: GateArgs, dev, tick):
    """``args.steps`` single-sample Adam steps on the gate logits (seeded order); returns (loss, distill)
    histories."""
    steps, lr, l1, seed, progress = args.steps, args.lr, args.l1, args.seed, args.progress
    rng = random.Random(seed)
    history: list[float] = []
    distill_hist: list[float] = []
    opt = torch.optim.Adam(ctl.parameters(), lr=lr)
    order: list[int] = []
    for _step in range(steps):
        if not order:
            order = list(range(len(flat)))
            rng.shuffle(order)
        idx = order.pop()
        _n, s = flat[idx]
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
    return history, distill_hist


def _gates_extra(model, ctl: GateController, gates: tuple, histories: tuple, seconds, args: GateArgs) -> dict:
    (gq, gkv), (history, distill_hist) = gates, histories
    steps, lr, l1, init_logit, positions, seed = args.steps, args.lr, args.l1, args.init_logit, args.positions, args.seed
    return {
        "pair": ctl.pair, "window": [ctl.sink, ctl.span], "granularity": ctl.granularity,
        "gates_kv": gkv.tolist(), "gates_q": gq.tolist(),
        "steps": int(steps), "lr": float(lr), "l1": float(l1), "init_logit": float(init_logit),
        "positions": positions, "seed": int(seed), "dtype": str(next(model.parameters()).dtype),
        "loss_first": history[:1], "loss_last": history[-1:],
        "distill_last": distill_hist[-1:], "history": _subsample(history, 200),
        "seconds_this_run": seconds,
        "encoding": "gate in the last distance bucket of dist.*; sinkdist zero (see profilers.gates)",
    }


def run_gates(model, samples_by_length: dict[int, list[Sample]], out_stem: str | Path | None,
              args: GateArgs = GateArgs(), *, model_name: str | None = None) -> Profile:
    """Train per-head gates (:class:`GateArgs` ``args``) on ``samples_by_length`` ({N: [Sample, ...]}) and write
    ``out_stem``'s ``.safetensors``/``.json`` (skipped when ``out_stem`` is None). Returns the Profile (see
    :mod:`profilers.gates`). Raises CompressError for bad settings or samples."""
    pair, window, steps, lr, l1, block = args.pair, args.window, args.steps, args.lr, args.l1, args.block
    granularity, init_logit, progress, seed = args.granularity, args.init_logit, args.progress, args.seed
    positions = args.positions
    _check_settings(pair, steps, lr, l1, block, samples_by_length)
    check_model_supported(model)
    identity = identity_from_config(model.config, name=model_name)
    lengths, flat = _flatten_samples(samples_by_length)
    sink, span = int(window[0]), int(window[1])
    L, H, Hkv = identity.num_layers, identity.num_heads, identity.num_kv_heads
    ctl = GateController(L, H, Hkv, pair=pair, window=(sink, span), granularity=granularity, init_logit=init_logit)
    dev = model.get_input_embeddings().weight.device
    ctl.to(dev)
    torch.manual_seed(seed)
    prog = progress_helper(f"gates {pair}", total=steps, unit="steps", enabled=progress)
    t0 = time.perf_counter()
    with gates_mode(model, ctl), prog as tick:
        tick(0, stage=f"gates {pair}: teacher passes")
        teachers = _teacher_passes(model, ctl, flat, positions, dev)
        tick(0, stage=f"gates {pair}")
        history, distill_hist = _train_gates(model, ctl, flat, teachers, args, dev, tick)
    seconds = time.perf_counter() - t0

    with torch.no_grad():
        gq, gkv = ctl.gates_q().detach().cpu(), ctl.gates_kv().detach().cpu()
    extra = _gates_extra(model, ctl, (gq, gkv), (history, distill_hist), seconds, args)
    meta = ProfileMeta(
        tool_version=tool_version(), method="gates", model=identity, lengths=lengths,
        samples={n: len(samples_by_length[n]) for n in lengths}, loss_mode="hidden_mse", block=block,
        sink_sizes=[sink], extra=extra,
    )
    profile = Profile(meta=meta, tensors=gate_profile_tensors(gq, gkv, lengths, block))
    if out_stem is not None:
        save_profile(profile, out_stem)
    return profile


__all__ = ["GateArgs", "run_gates"]
