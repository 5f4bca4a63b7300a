import numpy as np
import pytest

from plans.errors import CompressError
from plans.schema import DensePattern, SinkWindowPattern
from search_space.candidates import DENSE, Candidate, block_grid, candidate_grid, dedupe_by_spans, moa_grid


def test_moa_grid_reproduces_48_configs():
    g = moa_grid([2048, 4096, 8192], extra_lengths=[12288, 16384], block=64, sinks=(64,))
    assert g[0] == DENSE
    sw = g[1:]
    assert len(sw) == 48
    pairs = {(c.alpha, c.beta) for c in sw}
    assert (1024.0, 0.0) in pairs and (0.0, 1.0) in pairs and (-1024.0, 1.0) in pairs
    # sorted by span at the longest length; every rule valid at every length
    spans = [c.span(16384) for c in sw]
    assert spans == sorted(spans)
    for c in sw:
        for n in (2048, 4096, 8192, 12288, 16384):
            assert c.sink < c.span(n) <= n
    # the alpha grid is MoA's: linspace(-2048, 8192, 11)
    assert {c.alpha for c in sw} <= set(np.linspace(-2048, 8192, 11).tolist())


def test_moa_grid_one_set_per_sink():
    g = moa_grid([2048, 4096, 8192], [12288, 16384], sinks=(64, 128))
    assert sum(c.sink == 64 for c in g[1:]) == 48
    assert 0 < sum(c.sink == 128 for c in g[1:]) <= 48  # sink 128 drops rules whose span is <= 128 somewhere
    assert all(c.span(2048) > c.sink for c in g[1:])


def test_block_grid_valid_everywhere():
    lengths = [256, 512, 1024]
    g = block_grid(lengths, block=32, sinks=(32,))
    assert g[0].kind == "dense"
    assert len(g) > 10
    for c in g[1:]:
        assert c.alpha % 32 == 0
        for n in lengths:
            assert 32 < c.span(n) <= n
            assert c.alpha + c.beta * n <= n
    assert any(c.alpha < 0 for c in g[1:])  # negative alphas allowed


def test_candidate_to_pattern_span_matches():
    c = Candidate("sink_window", 64, -1024.0, 0.75, 64)
    p = c.to_pattern()
    assert isinstance(p, SinkWindowPattern) and p.block == 64 and p.alpha == -1024
    for n in (2048, 3000, 8192):
        assert p.span(n) == c.span(n)
    assert isinstance(DENSE.to_pattern(), DensePattern)
    assert DENSE.span(777) == 777
    floored = c.to_pattern(floor_length=2048)  # below the shortest target length the span stays at its value there
    assert floored.min_span == 512 and floored.span(37) == 512  # -1024 + 0.75 * 2048
    for n in (2048, 3000, 8192):
        assert floored.span(n) == c.span(n)


def test_dedupe_and_grid_errors():
    a = Candidate("sink_window", 32, 64.0, 0.0, 32)
    b = Candidate("sink_window", 32, 40.0, 0.0, 32)  # rounds up to the same 64-token span
    assert dedupe_by_spans([a, b], [256, 512]) == [a]
    with pytest.raises(CompressError, match="no sink\\+window candidate"):
        candidate_grid([64], block=64, sinks=(64,))


def test_layer_normalisation_rescales_each_layer_to_one():
    import torch

    from plans.identity import ModelIdentity
    from profilers.profile_format import Profile, ProfileMeta, normalize_profile

    ident = ModelIdentity(model_type="llama", num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    d = torch.tensor([[[1.0, 3.0], [2.0, 2.0]], [[0.1, 0.1], [0.2, 0.0]]], dtype=torch.float64)
    t = {"dist.q.128": d, "sinkdist.q.128": d[:, :, None] / 2, "dist.kv.128": d.sum(1, keepdim=True),
         "sinkdist.kv.128": d.sum(1, keepdim=True)[:, :, None] / 2}
    p = Profile(meta=ProfileMeta(tool_version="t", model=ident, lengths=[128], block=64), tensors=t)
    n = normalize_profile(p)
    assert torch.allclose(n.dist(128, "q").sum((1, 2)), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(n.sinkdist(128, "q")[1, 0, 0], torch.tensor([0.125, 0.125], dtype=torch.float64))
    assert normalize_profile(p, "none") is p
