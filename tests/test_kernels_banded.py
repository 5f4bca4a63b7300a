"""attention_kernels.banded.banded_attention equals the reference on every code path (small shapes, fp32/bf16)."""

from __future__ import annotations

import random

import pytest
import torch

import attention_kernels.banded as kb
import attention_kernels.native_cpu as native_cpu
from attention_kernels.banded import banded_attention
from attention_kernels.reference import reference_attention

torch.set_num_threads(1)
NATIVE = pytest.param(
    "native", marks=pytest.mark.skipif(native_cpu._compiler() is None, reason="no C compiler on this machine")
)
KERNELS = [NATIVE, "sdpa"]


def _inputs(b, hq, hkv, n, d, dtype, seed=0, layout="bhnd"):
    g = torch.Generator().manual_seed(seed)
    if layout == "bnhd":  # HF-style: (B, N, H, D) transposed to (B, H, N, D), non-contiguous
        q = torch.randn(b, n, hq, d, generator=g, dtype=torch.float64).transpose(1, 2)
        k = torch.randn(b, n, hkv, d, generator=g, dtype=torch.float64).transpose(1, 2)
        v = torch.randn(b, n, hkv, d, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        q = torch.randn(b, hq, n, d, generator=g, dtype=torch.float64)
        k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
        v = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _check(b, hq, hkv, n, d, sink, span, dtype=torch.float32, seed=0, layout="bhnd", scale=None, kernel="sdpa"):
    q, k, v = _inputs(b, hq, hkv, n, d, dtype, seed, layout)
    sink_t, span_t = torch.tensor(sink, dtype=torch.int64), torch.tensor(span, dtype=torch.int64)
    out = banded_attention(q, k, v, sink_t, span_t, scale, kernel=kernel)
    ref = reference_attention(q.double(), k.double(), v.double(), sink_t, span_t, scale)
    assert out.dtype == dtype and out.shape == (b, hq, n, d)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = (out.double() - ref).abs().max().item()
    assert err < tol, f"max abs error {err} (n={n}, sink={sink}, span={span}, {dtype})"


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrink the block/chunk constants so small N exercises every path (windowed, chunked, tails)."""
    monkeypatch.setattr(kb, "SMALL_N", 0)
    monkeypatch.setattr(kb, "BQ_SMALL", 8)
    monkeypatch.setattr(kb, "BQ_LARGE", 16)
    monkeypatch.setattr(kb, "BQ_SWITCH", 24)
    monkeypatch.setattr(kb, "CHUNK", 16)
    monkeypatch.setattr(kb, "CHUNK_SWITCH", 40)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_constants_mixed_heads(dtype, kernel):
    # GQA 8/2, odd length, dense head, sink 0, sink > span, spans not multiples of any block, both Bq sizes
    n = 1337
    sink = [64, 0, 64, 200, 3, 64, 64, 1]
    span = [64 + 32, 100, 64 + 600, 50, 5000, 1, 64 + 1100, 2]
    _check(1, 8, 2, n, 32, sink, span, dtype, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_chunked_path_default_constants(kernel):
    # windows >= CHUNK_SWITCH (4096): chunked decomposition with a partial last chunk, plus a full head
    n = 4096 + 64 + 300
    _check(1, 2, 1, n, 8, [64, 7], [64 + 4096, 4100], kernel=kernel)


@pytest.mark.skipif(native_cpu._compiler() is None, reason="no C compiler on this machine")
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize(
    "b, hq, hkv, n, d",
    [
        (2, 8, 4, 203, 16),  # batch, GQA, a 16-row block tail (203 = 12 * 16 + 11)
        (1, 4, 1, 100, 8),  # MQA, head dim below one 16-lane tile
        (1, 4, 2, 150, 100),  # head dim 6 tiles + a 4-wide tail
        (1, 4, 4, 64, 128),  # four full tiles of the head dim, N a whole number of blocks
        (3, 2, 1, 17, 20),  # one block and one row
    ],
)
def test_native_kernel_shapes(b, hq, hkv, n, d, layout):
    """Every shape path of csrc/sink_window_cpu.c: block tails, head-dim tails, GQA/MQA, batches, strided rows;
    windows below one block (1, 5), a sink longer than the sequence, sink 0, full heads."""
    pattern = [(4, 20), (0, 9), (16, 61), (500, 600), (2, 1000), (0, 1), (1, 6), (3, 35)]
    sink = [pattern[h % len(pattern)][0] for h in range(hq)]
    span = [pattern[(h + b) % len(pattern)][1] for h in range(hq)]
    _check(b, hq, hkv, n, d, sink, span, layout=layout, kernel="native")
    _check(b, hq, hkv, n, d, sink, span, dtype=torch.bfloat16, layout=layout, kernel="native", seed=1)


@pytest.mark.skipif(native_cpu._compiler() is None, reason="no C compiler on this machine")
def test_native_kernel_random_configs_two_threads():
    rng = random.Random(7)
    torch.set_num_threads(2)
    try:
        for seed in range(20):
            hkv = rng.choice([1, 2, 3])
            hq = hkv * rng.choice([1, 2, 4])
            n = rng.randint(1, 300)
            d = rng.choice([1, 3, 16, 24, 64])
            sink = [rng.choice([0, 1, 3, 8, 40, 64]) for _ in range(hq)]
            span = [rng.choice([1, 2, 9, 15, 16, 17, 33, 50, 96, 100, 400]) for _ in range(hq)]
            _check(rng.choice([1, 2]), hq, hkv, n, d, sink, span, seed=seed, kernel="native",
                   scale=rng.choice([None, 0.05]))
    finally:
        torch.set_num_threads(1)


def test_native_kernel_unavailable_falls_back(monkeypatch):
    """No compiler (or COMPRESS_NATIVE_CPU=0): auto uses the SDPA composition; an explicit native raises."""
    monkeypatch.setenv(native_cpu.ENV_OFF, "0")
    assert native_cpu.native_kernel() is None
    _check(1, 2, 1, 300, 16, [4, 0], [40, 300], kernel="auto")
    with pytest.raises(ValueError, match="not available"):
        _check(1, 2, 1, 300, 16, [4, 0], [40, 300], kernel="native")
    with pytest.raises(ValueError, match="one of"):
        _check(1, 2, 1, 30, 16, [4, 0], [40, 300], kernel="fast")


@pytest.mark.skipif(native_cpu._compiler() is None, reason="no C compiler on this machine")
def test_native_build_is_cached_by_content(monkeypatch, tmp_path):
    """The library is built once per (source, flags, compiler, CPU) into the cache and reused, never rebuilt."""
    monkeypatch.setenv("ATTENTION_COMPRESSOR_CACHE", str(tmp_path))
    cc = native_cpu._compiler()
    lib = native_cpu._build(cc)
    assert lib.is_file() and lib.is_relative_to(tmp_path / "kernels")
    stamp = lib.stat().st_mtime_ns
    assert native_cpu._build(cc) == lib and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary left behind


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_paths_small_blocks(small_blocks, dtype, layout):
    sink = [4, 0, 16, 50, 2, 4, 4, 0]
    span = [20, 9, 16 + 45, 30, 1000, 20, 20 + 24, 70]  # windows 16, 9, 45 (chunked), 1, full, 16, 24, 70
    _check(2, 8, 4, 203, 16, sink, span, dtype, layout=layout)


def test_tiny_sequences(small_blocks):
    for n in (1, 2, 3, 7):
        _check(1, 2, 1, n, 8, [1, 0], [2, 1])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n", [1, 5, 17, 127])
def test_small_n_masked_path(n, kernel):
    # N < SMALL_N: one masked SDPA call (N smaller than any block)
    _check(2, 4, 2, n, 16, [2, 0, 64, 1], [3, 1, 10, 1000], kernel=kernel)


def test_scale_and_mqa(small_blocks):
    _check(1, 6, 1, 150, 16, [3, 3, 0, 0, 9, 9], [12, 30, 12, 60, 10, 150], scale=0.3)


def test_random_configs(small_blocks):
    rng = random.Random(1)
    for seed in range(25):
        hkv = rng.choice([1, 2, 3])
        hq = hkv * rng.choice([1, 2, 3])
        n = rng.randint(1, 160)
        sink = [rng.choice([0, 1, 3, 8, 40]) for _ in range(hq)]
        span = [rng.choice([1, 2, 9, 17, 33, 50, 64, 100, 400]) for _ in range(hq)]
        _check(rng.choice([1, 2]), hq, hkv, n, 8, sink, span, seed=seed)


def test_float64_and_fp16_inputs(small_blocks):
    q, k, v = _inputs(1, 2, 2, 90, 8, torch.float64)
    s, sp = torch.tensor([3, 0]), torch.tensor([20, 50])
    ref = reference_attention(q, k, v, s, sp)
    assert (banded_attention(q, k, v, s, sp) - ref).abs().max() < 1e-12
    out16 = banded_attention(q.half(), k.half(), v.half(), s, sp)  # auto: native when it built
    assert out16.dtype == torch.float16 and (out16.double() - ref).abs().max() < 1e-2


def test_bad_inputs():
    q, k, v = _inputs(1, 4, 2, 16, 8, torch.float32)
    s = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple"):
        banded_attention(q, k[:, :1].expand(1, 3, 16, 8), v[:, :1].expand(1, 3, 16, 8), s, s + 4)
    with pytest.raises(ValueError, match="4-D"):
        banded_attention(q[0], k, v, s, s)
    with pytest.raises(ValueError, match="shape"):
        banded_attention(q, k, v, s[:3], s[:3])
    with pytest.raises(ValueError, match="integer"):
        banded_attention(q, k, v, s.float(), s)
    with pytest.raises(ValueError, match="dtype"):
        banded_attention(q, k.double(), v, s, s)
    with pytest.raises(ValueError, match="match"):
        banded_attention(q, k[:, :, :8], v[:, :, :8], s, s)
    with pytest.raises(ValueError, match="differ"):
        banded_attention(q, k, v[..., :4], s, s)


def test_benchmark_flex_attention_runs_the_same_pattern():
    """benchmarks/kernels_cpu.py compares against FlexAttention: its block mask must encode plans.span.sees."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from kernels_cpu import flex_runner

    from attention_kernels.reference import reference_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 256, 16, generator=g) for _ in range(3))
    sink, span = torch.tensor([0, 4, 64, 2]), torch.tensor([256, 40, 100, 9])
    run, compile_s, _ = flex_runner(q, k, v, sink, span)
    want = reference_attention(q.double(), k.double(), v.double(), sink, span)
    assert (run().double() - want).abs().max() < 1e-4 and compile_s >= 0
