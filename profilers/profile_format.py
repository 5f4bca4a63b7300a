"""The profile file: what `compress profile` writes and `compress search` reads.

Two files side by side: ``<stem>.safetensors`` (tensors, no pickle) and ``<stem>.json`` (ProfileMeta).

Tensors, for each profiled length N (``nb = ceil(N / block)`` distance buckets, bucket b holds i - j in
[b*block, (b+1)*block)), all float64 and averaged over the calibration samples at that length:

- ``dist.q.{N}``      [L, Hq, nb]          influence summed by distance bucket, per query head
- ``sinkdist.q.{N}``  [L, Hq, nS, nb]      the same restricted to keys j < sink_sizes[s]
- ``dist.kv.{N}``, ``sinkdist.kv.{N}``     the same summed over the query heads of each KV head

For the ``taylor`` method (``compress profile --method influence``; the stored name) the influence is |dL_ij| (MoA); for ``gates`` it is a keep score spread the same way.

The masked loss of a sink+window config with (sink S, window w) -- see plans.span -- is the influence of
entries with i - j >= w and j >= S: a suffix sum over buckets, see :func:`masked_loss`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from plans.defaults import DEFAULT_BLOCK
from plans.atomic import atomic_path, write_text_atomic
from plans.errors import CompressError
from plans.identity import ModelIdentity

PROFILE_FORMAT_VERSION = 1


class ProfileMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format_version: int = PROFILE_FORMAT_VERSION
    tool_version: str
    method: Literal["taylor", "gates"] = "taylor"
    model: ModelIdentity
    lengths: list[int]
    samples: dict[int, int] = Field(default_factory=dict, description="calibration samples per length")
    loss_mode: str = "answer_ce"
    block: int = DEFAULT_BLOCK
    sink_sizes: list[int] = Field(default_factory=lambda: [64])
    complete: bool = True
    extra: dict = Field(default_factory=dict)


class Profile(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    meta: ProfileMeta
    tensors: dict[str, torch.Tensor]

    def dist(self, n: int, per: Literal["q", "kv"] = "kv") -> torch.Tensor:
        return self._get(f"dist.{per}.{n}")

    def sinkdist(self, n: int, per: Literal["q", "kv"] = "kv") -> torch.Tensor:
        return self._get(f"sinkdist.{per}.{n}")

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise CompressError(f"profile has no tensor {key!r} (lengths: {self.meta.lengths})")
        return self.tensors[key]

    def masked_loss(self, n: int, sink: int, window: int, per: Literal["q", "kv"] = "kv") -> torch.Tensor:
        """[L, H] predicted loss of masking everything outside (sink, window) at length n."""
        if sink not in self.meta.sink_sizes and sink != 0:
            raise CompressError(f"sink {sink} was not profiled (profile sink sizes: {self.meta.sink_sizes})")
        d = self.dist(n, per)
        sd = self.sinkdist(n, per)[:, :, self.meta.sink_sizes.index(sink)] if sink else torch.zeros_like(d)
        return masked_loss(d, sd, window, self.meta.block)


def normalize_profile(profile: Profile, by: Literal["none", "layer"] = "layer") -> Profile:
    """Rescale each (length, layer)'s influence to sum to 1 (MoA's ``--normalize_by_layer``).

    First-order influence is small in late layers, so an unnormalised objective cuts all of them to the
    narrowest span at once; per-layer normalisation makes the search spread the budget within each layer.
    """
    if by == "none":
        return profile
    if by != "layer":
        raise CompressError(f"unknown normalisation {by!r} (none, layer)")
    out = {}
    for key, t in profile.tensors.items():
        if key.startswith(("dist.", "sinkdist.")):
            _, per, n = key.split(".")
            total = profile.tensors[f"dist.{per}.{n}"].sum(dim=(1, 2)).clamp(min=1e-30)
            out[key] = t / total.reshape((-1,) + (1,) * (t.ndim - 1))
        else:
            out[key] = t
    return Profile(meta=profile.meta, tensors=out)


def merge_profiles(profiles: list[Profile]) -> Profile:
    """One profile from profiles of disjoint calibration samples of the same model and settings: per length, the
    sample-weighted mean of every tensor (each file already holds the mean over its own samples), so the result is
    what profiling all the samples at once gives. Lengths may differ between the inputs (a length only some have
    is averaged over those). Raises CompressError when the model, method, block, sink sizes or loss mode differ.
    Used to report how stable a head ranking is between two halves of the calibration data."""
    if not profiles:
        raise CompressError("merge_profiles needs at least one profile")
    first = profiles[0].meta
    keys = ("model", "method", "block", "sink_sizes", "loss_mode")
    for p in profiles[1:]:
        bad = [k for k in keys if getattr(p.meta, k) != getattr(first, k)]
        if bad:
            raise CompressError(f"cannot merge profiles that differ in {', '.join(bad)}")
    lengths = sorted({n for p in profiles for n in p.meta.lengths})
    samples = {n: sum(p.meta.samples.get(n, 0) for p in profiles if n in p.meta.lengths) for n in lengths}
    tensors: dict[str, torch.Tensor] = {}
    for key in sorted({k for p in profiles for k in p.tensors}):
        n = int(key.rsplit(".", 1)[1]) if key.rsplit(".", 1)[-1].isdigit() else None
        have = [p for p in profiles if key in p.tensors]
        if n is None or not samples.get(n):
            tensors[key] = have[0].tensors[key]
            continue
        tensors[key] = sum(p.tensors[key] * p.meta.samples.get(n, 0) for p in have) / samples[n]
    meta = first.model_copy(update={"lengths": lengths, "samples": samples,
                                    "complete": all(p.meta.complete for p in profiles),
                                    "extra": {**first.extra, "merged_from": len(profiles)}})
    return Profile(meta=meta, tensors=tensors)


def masked_loss(dist: torch.Tensor, sinkdist: torch.Tensor, window: int, block: int) -> torch.Tensor:
    """Influence at distances >= window outside the sink: sum over buckets, linear inside the boundary bucket."""
    outside = dist - sinkdist  # [..., nb]
    nb = outside.shape[-1]
    b, r = divmod(int(window), block)
    if b >= nb:
        return outside.new_zeros(outside.shape[:-1])
    tail = outside[..., b + 1 :].sum(-1)
    return tail + outside[..., b] * (1 - r / block)


def save_profile(profile: Profile, stem: str | Path) -> tuple[Path, Path]:
    """Write ``stem.safetensors`` and ``stem.json`` atomically (tensors first, so the json marks completion)."""
    stem = Path(stem)
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    with atomic_path(st) as tmp:
        save_file({k: v.contiguous() for k, v in profile.tensors.items()}, str(tmp))
    write_text_atomic(js, profile.meta.model_dump_json(indent=2))
    return st, js


def load_profile(stem: str | Path) -> Profile:
    """Load a profile from its stem, its .json or its .safetensors path, with clear errors."""
    stem = Path(stem)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    st, js = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for p in (js, st):
        if not p.exists():
            raise CompressError(f"profile file not found: {p}")
    try:
        meta = ProfileMeta.model_validate(json.loads(js.read_text()))
    except (json.JSONDecodeError, ValueError) as e:
        raise CompressError(f"{js}: not a valid profile metadata file: {e}") from None
    if meta.format_version > PROFILE_FORMAT_VERSION:
        raise CompressError(f"{js}: profile format {meta.format_version} is newer than this tool ({PROFILE_FORMAT_VERSION})")
    try:
        tensors = load_file(str(st))
    except Exception as e:  # safetensors raises its own error types
        raise CompressError(f"{st}: not a readable safetensors file: {e}") from None
    return Profile(meta=meta, tensors=tensors)
