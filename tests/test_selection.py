"""Content-selected blocks (issue 24, kernel level): SnapKV votes, block choice, and the native CPU kernel and the
reference with selected blocks against an explicit fp64 masked computation."""

from __future__ import annotations

import math
import random

import pytest
import torch

import attention_kernels.native_cpu as native_cpu
from attention_kernels.banded import head_pattern
from attention_kernels.native_cpu import sink_window_prefill
from attention_kernels.options import KeyPositions
from attention_kernels.reference import reference_attention
from attention_kernels.selection import select_blocks, selected_keys, snapkv_votes

needs_cc = pytest.mark.skipif(native_cpu._compiler() is None, reason="no C compiler on this machine")


def _explicit(q, k, v, sink, span, sel_keys, scale):
    """Row-by-row fp64 softmax over the keys the rule allows: j <= i and (j < S or i - j < W or selected)."""
    b, hq, n, d = q.shape
    rep = hq // k.shape[1]
    out = torch.zeros(b, hq, n, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            s_eff = max(0, min(int(sink[h]), int(span[h]) - 1))
            w = int(span[h]) - s_eff
            kh, vh = k[bi, h // rep].double(), v[bi, h // rep].double()
            for i in range(n):
                keys = [j for j in range(i + 1) if j < s_eff or i - j < w or bool(sel_keys[bi, h // rep, j])]
                s = (kh[keys] @ q[bi, h, i].double()) * scale
                out[bi, h, i] = torch.softmax(s, 0) @ vh[keys]
    return out


def test_votes_equal_an_explicit_sum():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g)
    votes = snapkv_votes(q, k, pool=1)
    want = torch.zeros(2, 2, 30, dtype=torch.float64)
    for b in range(2):
        for h in range(4):
            for r in range(6):
                pos = 30 - 6 + r
                s = (k[b, h // 2, : pos + 1].double() @ q[b, h, r].double()) / math.sqrt(8)
                want[b, h // 2, : pos + 1] += torch.softmax(s, 0)
    assert torch.allclose(votes.double(), want, atol=1e-5)
    pooled = snapkv_votes(q, k, pool=3)
    padded = torch.nn.functional.pad(want, (1, 1), value=-1.0)
    assert torch.allclose(pooled.double(), padded.unfold(-1, 3, 1).amax(-1), atol=1e-5)


def test_select_blocks_takes_the_best_eligible_blocks():
    votes = torch.zeros(1, 2, 100)
    votes[0, 0, [5, 33, 34, 70, 95]] = torch.tensor([9.0, 1.0, 1.5, 2.0, 8.0])  # 5 in the sink, 95 in the window
    votes[0, 1, [12, 50]] = torch.tensor([1.0, 3.0])
    sel = select_blocks(votes, 2, 10, torch.tensor([10, 0]), torch.tensor([10, 10]))
    assert sel.shape == (1, 2, 10)
    assert sel[0, 0].nonzero().flatten().tolist() == [3, 7]  # block 3 (2.5) and block 7 (2.0); 0 and 9 excluded
    assert sel[0, 1].nonzero().flatten().tolist() == [1, 5]
    partly = select_blocks(votes, 1, 10, torch.tensor([8, 0]), torch.tensor([10, 10]))  # block 0 now reaches past
    assert partly[0, 0].nonzero().flatten().tolist() == [0]  # the sink (keys 8, 9), so key 5's 9.0 counts
    per_head = select_blocks(votes, torch.tensor([1, 0]), 10, torch.tensor([10, 0]), torch.tensor([10, 10]))
    assert per_head[0, 0].nonzero().flatten().tolist() == [3] and not per_head[0, 1].any()
    few = select_blocks(votes, 50, 10, torch.tensor([0, 0]), torch.tensor([60, 60]))  # 4 eligible blocks only
    assert few.sum(-1).tolist() == [[4, 4]]
    with pytest.raises(ValueError, match="block"):
        select_blocks(votes, 1, 0, torch.tensor([0, 0]), torch.tensor([1, 1]))


def test_a_needle_the_question_asks_for_is_selected():
    g = torch.Generator().manual_seed(1)
    d, n = 32, 512
    q, k = torch.randn(1, 4, n, d, generator=g), torch.randn(1, 2, n, d, generator=g)
    k[0, 0, 200] = 12 * q[0, :2, -8:].mean((0, 1))  # KV head 0's needle, aligned with its last rows' queries
    sel = select_blocks(snapkv_votes(q[:, :, -8:], k), 2, 16, torch.tensor([4, 4]), torch.tensor([64, 64]))
    assert bool(sel[0, 0, 200 // 16])


@needs_cc
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize(
    "b, hq, hkv, n, d, block",
    [(1, 4, 2, 150, 16, 16), (2, 4, 4, 77, 24, 32), (1, 3, 1, 203, 64, 8), (1, 2, 2, 40, 8, 64)],
)
def test_native_with_selected_blocks_equals_explicit(b, hq, hkv, n, d, block, layout):
    g = torch.Generator().manual_seed(n)
    if layout == "bnhd":
        q = torch.randn(b, n, hq, d, generator=g).transpose(1, 2)
        k, v = (torch.randn(b, n, hkv, d, generator=g).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(b, hq, n, d, generator=g)
        k, v = (torch.randn(b, hkv, n, d, generator=g) for _ in range(2))
    sink = torch.tensor([4, 0, 64, 1][:hq])
    span = torch.tensor([20, 9, 100, n][:hq])  # one full head: selection changes nothing there
    n_blocks = -(-n // block)
    sel = torch.rand(b, hkv, n_blocks, generator=g) < 0.35
    sel[..., 0] = True  # a block overlapping the sink
    sel[..., -1] = True  # a block inside the window of the last rows
    se, w = head_pattern(sink, span, n)
    out = sink_window_prefill(q, k, v, se, w, d**-0.5, selected=sel, block=block)
    keys = selected_keys(sel, block, n)
    want = _explicit(q, k, v, sink, span, keys, d**-0.5)
    assert (out.double() - want).abs().max() < 1e-5
    ref = reference_attention(q.double(), k.double(), v.double(), sink, span, positions=KeyPositions(selected=keys))
    assert (ref - want).abs().max() < 1e-10


@needs_cc
def test_native_selected_everything_is_dense_and_nothing_is_sink_window():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 130, 16, generator=g) for _ in range(3))
    sink, span = torch.tensor([2, 0]), torch.tensor([10, 5])
    se, w = head_pattern(sink, span, 130)
    dense = reference_attention(q.double(), k.double(), v.double(), torch.zeros(2, dtype=torch.int64),
                                torch.full((2,), 130))
    every = sink_window_prefill(q, k, v, se, w, 0.25, selected=torch.ones(1, 2, 5, dtype=torch.bool), block=32)
    assert (every.double() - dense).abs().max() < 1e-5
    none = sink_window_prefill(q, k, v, se, w, 0.25, selected=torch.zeros(1, 2, 5, dtype=torch.bool), block=32)
    assert torch.equal(none, sink_window_prefill(q, k, v, se, w, 0.25))
    with pytest.raises(ValueError, match="selected must be"):
        sink_window_prefill(q, k, v, se, w, 0.25, selected=torch.ones(1, 2, 4, dtype=torch.bool), block=32)


@needs_cc
def test_native_random_selection_configs():
    rng = random.Random(5)
    for seed in range(12):
        hkv = rng.choice([1, 2])
        hq = hkv * rng.choice([1, 2])
        n, d, block = rng.randint(1, 120), rng.choice([8, 16, 20]), rng.choice([1, 4, 16, 50])
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, hq, n, d, generator=g)
        k, v = (torch.randn(1, hkv, n, d, generator=g) for _ in range(2))
        sink = torch.tensor([rng.choice([0, 1, 8]) for _ in range(hq)])
        span = torch.tensor([rng.choice([1, 3, 17, 40, 200]) for _ in range(hq)])
        sel = torch.rand(1, hkv, -(-n // block), generator=g) < rng.random()
        se, w = head_pattern(sink, span, n)
        out = sink_window_prefill(q, k, v, se, w, 0.3, selected=sel, block=block)
        want = _explicit(q, k, v, sink, span, selected_keys(sel, block, n), 0.3)
        assert (out.double() - want).abs().max() < 1e-5, (seed, n, block)
