"""`compress profile`'s driver: run the streamed Taylor influence over calibration samples and write a profile.

One sample at a time (batch 1), for each length: embeddings require grad (parameters are frozen, so no parameter
gradient is stored), forward through :data:`compressor.hf.influence_attention.INFLUENCE_ATTN`, loss = mean CE over the
sample's target tokens (``loss_mask``; HF shift: token t is predicted from position t - 1), backward; each layer's
attention backward recomputes its attention blockwise and adds the layer's influence to the sums
(:class:`profilers.influence.InfluenceCollector`, math in :mod:`profilers.influence`).

Resumable: after every sample the float64 running sums and the progress (samples done per length, recipe hash)
are written atomically to ``<out_stem>.partial.safetensors`` (authoritative: the progress is also in its metadata)
and ``<out_stem>.partial.json`` (human readable). A rerun with the same recipe continues where it stopped and
gives bit-for-bit the result of an uninterrupted run; both files are deleted once the profile is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from compressor.args import InfluenceArgs
from compressor.hf.modules import accepts_logits_to_keep, check_model_supported
from compressor.hf.influence_attention import influence_mode
from compressor.placement import input_device, param_value
from plans.atomic import atomic_path, write_text_atomic
from plans.errors import CompressError
from plans.identity import identity_from_config, text_config
from plans.schema import tool_version
from profilers.profile_format import Profile, ProfileMeta, save_profile
from profilers.progress import progress as progress_helper
from profilers.data.samples import Sample
from profilers.influence import (
    DEFAULT_MAX_BLOCK_ELEMS,
    FP32_EPS,
    InfluenceCollector,
    kv_aggregate,
)

PARTIAL_FORMAT = 1


def partial_paths(out_stem: str | Path) -> tuple[Path, Path]:
    """(``<out_stem>.partial.safetensors``, ``<out_stem>.partial.json``)."""
    s = str(out_stem)
    return Path(s + ".partial.safetensors"), Path(s + ".partial.json")


def sample_loss(model, sample: Sample, use_logits_to_keep: bool | None = None) -> torch.Tensor:
    """Mean CE over the sample's target tokens, from ``inputs_embeds`` that require grad (batch 1, no cache).

    Only the logits at the predicting positions are computed when the model takes ``logits_to_keep``."""
    dev = input_device(model)
    ids = sample.input_ids.to(dev)
    tgt = torch.nonzero(sample.loss_mask[1:].to(dev)).squeeze(-1)  # positions t - 1 that predict a target t
    if tgt.numel() == 0:
        raise CompressError("sample has no target tokens (loss_mask is all False after position 0)")
    emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
    if use_logits_to_keep is None:
        use_logits_to_keep = accepts_logits_to_keep(model)
    if use_logits_to_keep:
        logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=tgt).logits[0]
    else:
        logits = model(inputs_embeds=emb, use_cache=False).logits[0, tgt]
    return F.cross_entropy(logits.float(), ids[tgt + 1])


# --------------------------------------------------------------------------------------------------------------
# recipe and partial files


def _weights_fingerprint(model) -> str:
    h = hashlib.sha256()
    params = list(model.named_parameters())
    for name, p in params[:3] + params[-2:]:
        flat = param_value(model, name, p).detach().reshape(-1)  # a weight offloaded to disk is read from there
        step = max(1, flat.numel() // 4096)
        h.update(f"{tuple(p.shape)}:{flat[::step].double().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


def recipe_hash(model, identity, samples_by_length, *, block, sink_sizes, loss_mode) -> str:
    h = hashlib.sha256()
    head = {
        "identity": identity.config_hash, "model_type": identity.model_type, "block": block,
        "sink_sizes": list(sink_sizes), "loss_mode": loss_mode, "method": "taylor",
        "dtype": str(next(model.parameters()).dtype), "weights": _weights_fingerprint(model),
        "lengths": {str(n): len(v) for n, v in sorted(samples_by_length.items())},
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for n in sorted(samples_by_length):
        for s in samples_by_length[n]:
            h.update(s.input_ids.to(torch.int64).cpu().numpy().tobytes())
            h.update(s.loss_mask.to(torch.bool).cpu().numpy().tobytes())
    return h.hexdigest()


def _save_partial(st: Path, js: Path, sums: dict[str, torch.Tensor], done: dict[int, int], recipe: str, info: dict) -> None:
    meta = {"format": str(PARTIAL_FORMAT), "recipe": recipe, "done": json.dumps({str(k): v for k, v in done.items()})}
    with atomic_path(st) as tmp:
        save_file({k: v.contiguous() for k, v in sums.items()}, str(tmp), metadata=meta)
    write_text_atomic(js, json.dumps({"format": PARTIAL_FORMAT, "recipe": recipe,
                                      "done": {str(k): v for k, v in done.items()}, **info}, indent=2))


def _load_partial(st: Path, js: Path, recipe: str) -> tuple[dict[str, torch.Tensor], dict[int, int]]:
    if not st.exists():
        if js.exists():
            raise CompressError(f"{js}: partial progress file without its tensors {st.name}; delete it to start over")
        return {}, {}
    try:
        with safe_open(str(st), framework="pt") as f:
            meta = f.metadata() or {}
            sums = {k: f.get_tensor(k) for k in f.keys()}
        done = {int(k): int(v) for k, v in json.loads(meta["done"]).items()}
        saved_recipe = meta["recipe"]
    except Exception as e:  # noqa: BLE001 -- any failure here means the file is unusable
        raise CompressError(f"{st}: corrupt partial profile ({type(e).__name__}: {e}); delete it to start over") from None
    if js.exists():
        try:
            info = json.loads(js.read_text())
            if not isinstance(info, dict) or "recipe" not in info:
                raise ValueError("no recipe")
        except (ValueError, OSError) as e:
            raise CompressError(f"{js}: corrupt partial progress file ({e}); delete it and {st.name} to start over") from None
        if info["recipe"] != saved_recipe:
            raise CompressError(f"{js} and {st.name} disagree (recipe); delete both to start over")
    if saved_recipe != recipe:
        raise CompressError(
            f"{st}: partial profile was made with a different model, samples or settings; "
            "delete it (or pass resume=False) to start over"
        )
    for n, k in done.items():
        if k > 0 and (f"sum.dist.{n}" not in sums or f"sum.sinkdist.{n}" not in sums):
            raise CompressError(f"{st}: corrupt partial profile (no sums for length {n})")
    return sums, done


# --------------------------------------------------------------------------------------------------------------
# the driver, step by step


def _native_window(model) -> dict:
    c = text_config(model.config)
    sw = getattr(c, "sliding_window", None)
    if getattr(c, "use_sliding_window", True) is False:
        sw = None
    layer_types = getattr(c, "layer_types", None)
    if layer_types is not None and sw is not None:
        n_sliding = sum(1 for t in layer_types if "sliding" in str(t))
        if n_sliding == 0:
            sw = None
    return {"sliding_window": sw, "layer_types": list(layer_types) if layer_types is not None else None}


def _check_settings(block: int, sink_sizes: tuple[int, ...], samples_by_length) -> None:
    if block <= 0:
        raise CompressError(f"block must be positive (got {block})")
    if any(s < 0 for s in sink_sizes) or len(set(sink_sizes)) != len(sink_sizes):
        raise CompressError(f"sink sizes must be distinct and >= 0 (got {list(sink_sizes)})")
    if not samples_by_length:
        raise CompressError("no calibration samples given")


def _check_samples(samples_by_length, lengths: list[int], identity, allow_extrapolation: bool) -> None:
    for n in lengths:
        ss = samples_by_length[n]
        if n <= 1:
            raise CompressError(f"length {n}: profiling needs at least 2 tokens")
        if not ss:
            raise CompressError(f"length {n}: no samples")
        for i, s in enumerate(ss):
            if s.length != n:
                raise CompressError(f"length {n}: sample {i} has {s.length} tokens, not {n}")
            if not bool(s.loss_mask[1:].any()):
                raise CompressError(f"length {n}: sample {i} has no target tokens in its loss_mask")
        if identity.max_positions and n > identity.max_positions and not allow_extrapolation:
            raise CompressError(
                f"length {n} is beyond the model's max_position_embeddings ({identity.max_positions}); "
                "pass allow_extrapolation to profile it anyway"
            )


def _warn_native_window(model, mt: str, lengths: list[int]) -> dict:
    """The model's native window (see :func:`_native_window`), with a warning when it is shorter than a length."""
    window = _native_window(model)
    if window["sliding_window"] is not None and window["sliding_window"] < max(lengths):
        warnings.warn(
            f"model type {mt!r} has a native sliding window of {window['sliding_window']} tokens "
            f"(layer types: {window['layer_types'] or 'all layers'}); the profile respects it: influence outside "
            "the native window is zero on those layers", stacklevel=3)
    return window


def _open_partial(out_stem, recipe: str, resume: bool, samples_by_length, lengths):
    """(st, js, sums, done): the partial files and their progress (discarded first unless ``resume``)."""
    st, js = partial_paths(out_stem)
    if not resume:
        for p in (st, js):
            p.unlink(missing_ok=True)
    sums, done = _load_partial(st, js, recipe)
    for n in lengths:
        if done.get(n, 0) > len(samples_by_length[n]):
            raise CompressError(f"{st}: corrupt partial profile ({done[n]} samples done at length {n}, "
                                f"only {len(samples_by_length[n])} given)")
    return st, js, sums, done


def _progress_bar(samples_by_length, lengths, done, enabled: bool):
    """One line/bar for all lengths; the ETA is weighted by tokens (a sample of length N costs ~N)."""
    return progress_helper("profile", total=sum(len(samples_by_length[n]) for n in lengths), unit="samples",
                           done=sum(done.get(n, 0) for n in lengths),
                           work_total=sum(len(samples_by_length[n]) * n for n in lengths),
                           work_done=sum(done.get(n, 0) * n for n in lengths), enabled=enabled)


def _profile_one(model, coll: InfluenceCollector, sample: Sample, n: int, i: int, use_ltk: bool):
    """Forward + backward of one sample; returns its (dist, sinkdist)."""
    coll.begin_sample(n)
    with torch.enable_grad():
        loss = sample_loss(model, sample, use_ltk)
        if not torch.isfinite(loss):
            raise CompressError(f"length {n}: sample {i} has a non-finite loss ({loss.item()})")
        loss.backward()
    del loss
    return coll.end_sample()


def _profile_samples(model, coll, samples_by_length, lengths, partial, recipe, tick, on_sample) -> dict[str, float]:
    """Profile every sample not done yet, saving the running sums after each; returns seconds per length."""
    st, js, sums, done = partial
    use_ltk = accepts_logits_to_keep(model)
    info = {"lengths": lengths, "samples": {str(m): len(samples_by_length[m]) for m in lengths}}
    seconds: dict[str, float] = {}
    for n in lengths:
        ss = samples_by_length[n]
        tick(0, stage=f"profile N={n}")
        t0 = time.perf_counter()
        for i in range(done.get(n, 0), len(ss)):
            d, sd = _profile_one(model, coll, ss[i], n, i, use_ltk)
            kd, ks = f"sum.dist.{n}", f"sum.sinkdist.{n}"
            sums[kd] = sums[kd] + d if kd in sums else d
            sums[ks] = sums[ks] + sd if ks in sums else sd
            done[n] = i + 1
            _save_partial(st, js, sums, done, recipe, info)
            tick(1, work=n)
            if on_sample is not None:
                on_sample(n, i + 1)
        seconds[str(n)] = time.perf_counter() - t0
    return seconds


def _zero_sums(n: int, coll: InfluenceCollector) -> tuple[torch.Tensor, torch.Tensor]:
    """What a sample of length ``n`` adds to the sums when a rank has no sample left in a step."""
    nb = math.ceil(n / coll.block)
    return (torch.zeros(coll.num_layers, coll.num_heads, nb, dtype=torch.float64),
            torch.zeros(coll.num_layers, coll.num_heads, len(coll.sink_sizes), nb, dtype=torch.float64))


def _share_partial(dp, partial, lengths, coll: InfluenceCollector):
    """Rank 0's partial progress (samples done and sums per length) on every rank."""
    st, js, sums, done = partial
    counts = dp.broadcast(torch.tensor([done.get(n, 0) for n in lengths], dtype=torch.int64))
    done = {n: int(c) for n, c in zip(lengths, counts) if int(c) > 0}
    for n in lengths:
        if n in done:
            zd, zs = _zero_sums(n, coll)
            kd, ks = f"sum.dist.{n}", f"sum.sinkdist.{n}"
            sums[kd] = dp.broadcast(sums[kd] if dp.is_main else zd)
            sums[ks] = dp.broadcast(sums[ks] if dp.is_main else zs)
    return st, js, sums, done


def _profile_samples_dp(model, coll, samples_by_length, lengths, partial, recipe, report, dp) -> dict:
    """:func:`_profile_samples` over ``dp.world`` ranks: in each step rank r profiles sample ``start + r`` (or adds
    zeros when there is none), the step's sums are all-reduced and added on every rank, and rank 0 saves the
    partial files. Progress stays a prefix of the samples, so the partial files are those of a single process
    (a run may resume with any number of ranks); a rank killed mid-step loses only that step."""
    st, js, sums, done = partial
    tick, on_sample = report  # the progress tick and the caller's per-sample callback
    use_ltk = accepts_logits_to_keep(model)
    info = {"lengths": lengths, "samples": {str(m): len(samples_by_length[m]) for m in lengths}, "ranks": dp.world}
    seconds: dict[str, float] = {}
    for n in lengths:
        ss = samples_by_length[n]
        tick(0, stage=f"profile N={n}")
        t0 = time.perf_counter()
        for start in range(done.get(n, 0), len(ss), dp.world):
            i = start + dp.rank
            d, sd = _profile_one(model, coll, ss[i], n, i, use_ltk) if i < len(ss) else _zero_sums(n, coll)
            d, sd = dp.all_reduce_sum(d, sd)
            kd, ks = f"sum.dist.{n}", f"sum.sinkdist.{n}"
            sums[kd] = sums[kd] + d if kd in sums else d
            sums[ks] = sums[ks] + sd if ks in sums else sd
            step = min(len(ss), start + dp.world) - start
            done[n] = start + step
            if dp.is_main:
                _save_partial(st, js, sums, done, recipe, info)
            tick(step, work=n * step)
            if on_sample is not None:
                on_sample(n, done[n])
        seconds[str(n)] = time.perf_counter() - t0
    return seconds


def _profile_tensors(sums, done, lengths, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Means over samples, per query head and summed into KV heads."""
    tensors: dict[str, torch.Tensor] = {}
    for n in lengths:
        cnt = done[n]
        dq = sums[f"sum.dist.{n}"] / cnt
        sq = sums[f"sum.sinkdist.{n}"] / cnt
        tensors[f"dist.q.{n}"] = dq
        tensors[f"sinkdist.q.{n}"] = sq
        tensors[f"dist.kv.{n}"] = kv_aggregate(dq, num_kv_heads, 1)
        tensors[f"sinkdist.kv.{n}"] = kv_aggregate(sq, num_kv_heads, 1)
    return tensors


def run_profile(model, samples_by_length: dict[int, list[Sample]], out_stem: str | Path,
                args: InfluenceArgs = InfluenceArgs(), *, model_name: str | None = None,
                on_sample: Callable[[int, int], None] | None = None, dp=None) -> Profile:
    """Profile ``model`` on ``samples_by_length`` ({N: [Sample of length N, ...]}) with :class:`InfluenceArgs`
    ``args`` and write ``out_stem``'s ``.safetensors``/``.json`` (see profilers.profile_format). Returns the Profile.

    ``on_sample(N, k)`` is called after sample k (1-based) of length N is saved; raising from it stops the run
    and leaves the partial files for a later resume. ``resume=False`` discards any partial progress.
    ``dp`` (a :class:`compressor.distributed.DataParallel`): this process is one rank of a data-parallel run;
    every rank passes the same samples, rank 0 writes the files, every rank returns the profile."""
    block, sink_sizes, row_block, loss_mode = args.block, args.sink_sizes, args.row_block, args.loss_mode
    allow_extrapolation, resume, progress = args.allow_extrapolation, args.resume, args.progress
    max_block_elems = DEFAULT_MAX_BLOCK_ELEMS if args.max_block_elems is None else args.max_block_elems
    block = int(block)
    sink_sizes = tuple(int(s) for s in sink_sizes)
    _check_settings(block, sink_sizes, samples_by_length)
    mt = check_model_supported(model)
    identity = identity_from_config(model.config, name=model_name)
    lengths = sorted(int(n) for n in samples_by_length)
    _check_samples(samples_by_length, lengths, identity, allow_extrapolation)
    window = _warn_native_window(model, mt, lengths)

    recipe = recipe_hash(model, identity, {n: samples_by_length[n] for n in lengths},
                         block=block, sink_sizes=sink_sizes, loss_mode=loss_mode)
    if dp is not None and not dp.same_everywhere(int(recipe[:15], 16)):
        raise CompressError("data-parallel ranks disagree on the model, the calibration samples or the settings")
    coll = InfluenceCollector(identity.num_layers, identity.num_heads, block=block, sink_sizes=sink_sizes,
                              row_block=row_block, max_block_elems=max_block_elems)
    if dp is None or dp.is_main:
        partial = _open_partial(out_stem, recipe, resume, samples_by_length, lengths)
    else:
        partial = (*partial_paths(out_stem), {}, {})
    if dp is not None:
        partial = _share_partial(dp, partial, lengths, coll)
    st, js, sums, done = partial
    show = progress and (dp is None or dp.is_main)
    with influence_mode(model, coll), _progress_bar(samples_by_length, lengths, done, show) as tick:
        if dp is None:
            seconds = _profile_samples(model, coll, samples_by_length, lengths, partial, recipe, tick, on_sample)
        else:
            seconds = _profile_samples_dp(model, coll, samples_by_length, lengths, partial, recipe,
                                          (tick, on_sample), dp)

    meta = ProfileMeta(
        tool_version=tool_version(), method="taylor", model=identity, lengths=lengths,
        samples={n: done[n] for n in lengths}, loss_mode=loss_mode, block=block, sink_sizes=list(sink_sizes),
        extra={
            "influence": "|dL_ij| first-order (MoA), streamed recompute",
            "eps": FP32_EPS, "row_block": int(row_block), "dtype": str(next(model.parameters()).dtype),
            "native_window": window, "allow_extrapolation": bool(allow_extrapolation),
            "seconds_this_run": seconds, "recipe": recipe,
        },
    )
    if dp is not None:
        meta.extra["ranks"] = dp.world
    profile = Profile(meta=meta, tensors=_profile_tensors(sums, done, lengths, identity.num_kv_heads))
    if dp is None or dp.is_main:
        save_profile(profile, out_stem)
        for p in (st, js):
            p.unlink(missing_ok=True)
    return profile


__all__ = ["PARTIAL_FORMAT", "partial_paths", "recipe_hash", "run_profile", "sample_loss"]
