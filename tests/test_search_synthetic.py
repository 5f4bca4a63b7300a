"""A hand-built synthetic Profile for the search tests (local heads vs long-range heads), and its sanity checks."""

from __future__ import annotations

import math

import numpy as np
import torch

from plans.identity import ModelIdentity
from profilers.profile_format import Profile, ProfileMeta

LENGTHS = (512, 1024)
BLOCK = 32
SINKS = (32, 64)


def head_kind(layer: int, q_head: int, n_heads: int = 4) -> str:
    """KV head 0 (query heads 0,1) is local in even layers, long-range in odd ones; KV head 1 the opposite."""
    kv = q_head // 2
    return "local" if (kv + layer) % 2 == 0 else "long"


def _influence(kind: str, d: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "local":
        return np.exp(-d / rng.uniform(8.0, 48.0))
    return rng.uniform(0.02, 0.2) + (d / n) ** rng.uniform(0.5, 2.0)  # grows with distance: needs a wide window


def make_profile(
    n_layers: int = 4, n_heads: int = 4, n_kv: int = 2, lengths=LENGTHS, block: int = BLOCK, sinks=SINKS,
    model_type: str = "llama", seed: int = 0,
) -> Profile:
    ident = ModelIdentity(model_type=model_type, num_layers=n_layers, num_heads=n_heads, num_kv_heads=n_kv,
                          head_dim=16, max_positions=4096, config_hash="synthetic", name="synthetic")
    g = n_heads // n_kv
    tensors = {}
    for n in lengths:
        nb = math.ceil(n / block)
        d = np.arange(n)
        pairs = n - d  # causal pairs (i, j) at distance d
        dist = np.zeros((n_layers, n_heads, nb))
        sinkd = np.zeros((n_layers, n_heads, len(sinks), nb))
        for layer in range(n_layers):
            for h in range(n_heads):
                rng = np.random.default_rng([seed, layer, h])  # the same head shape at every length
                f = _influence(head_kind(layer, h, n_heads), d, n, rng) * rng.uniform(0.5, 2.0)
                f = f / (f * pairs).sum() * rng.uniform(0.5, 2.0)  # total influence ~1 per head
                dist[layer, h] = np.bincount(d // block, weights=f * pairs, minlength=nb)
                for si, s in enumerate(sinks):
                    sinkd[layer, h, si] = np.bincount(d // block, weights=f * np.minimum(s, pairs), minlength=nb)
        dq = torch.tensor(dist)
        sq = torch.tensor(sinkd)
        tensors[f"dist.q.{n}"] = dq
        tensors[f"sinkdist.q.{n}"] = sq
        tensors[f"dist.kv.{n}"] = dq.reshape(n_layers, n_kv, g, nb).sum(2)
        tensors[f"sinkdist.kv.{n}"] = sq.reshape(n_layers, n_kv, g, len(sinks), nb).sum(2)
    meta = ProfileMeta(tool_version="test", model=ident, lengths=list(lengths), samples={n: 1 for n in lengths},
                       block=block, sink_sizes=list(sinks))
    return Profile(meta=meta, tensors=tensors)


def test_synthetic_profile_masked_loss_is_monotone():
    p = make_profile()
    for n in LENGTHS:
        prev = None
        for w in (32, 64, 128, 256, n):
            v = p.masked_loss(n, 32, w, "kv")
            assert v.shape == (4, 2)
            assert (v >= -1e-12).all()
            if prev is not None:
                assert (v <= prev + 1e-12).all()
            prev = v
        assert torch.allclose(p.masked_loss(n, 32, n, "kv"), torch.zeros(4, 2, dtype=torch.float64))
