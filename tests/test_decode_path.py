"""The decode path reads only kept tokens: ring storage, the CPU SDPA decode, and PlanCache generation.

Expected values come from independent computations: the plain masked softmax over the whole history under
plans.span.sees, attention_kernels.reference.decode_reference in float64, and uncached greedy recomputation.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the Triton decode kernel runs in the interpreter on CPU
    _mod = sys.modules.get("attention_kernels.triton_decode")
    if _mod is not None and not _mod.INTERPRET:  # imported before the variable was set: redo
        importlib.reload(_mod)

import compressor
import attention_kernels.dispatch
from compressor.hf.plan_cache import PlanCache
from attention_kernels.cpu_decode import sdpa_decode
from attention_kernels.kv_groups import AttendSpec, RingGroup
from attention_kernels.reference import decode_reference
from plans.identity import identity_from_config
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern
from tests.conftest import tiny_model
from tests.test_apply import _recompute_greedy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_decode_equals_the_float64_reference(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g) for s in [(3, 6, 16), (3, 2, 50, 16), (3, 2, 50, 16)])
    for kv_len in (torch.tensor([[50, 50], [50, 50], [50, 50]]), torch.tensor([[50, 7], [0, 31], [1, 50]])):
        want = decode_reference(q.double(), k.double(), v.double(), kv_len)
        got = sdpa_decode(q.to(dtype), k.to(dtype), v.to(dtype), kv_len)
        assert got.dtype == dtype
        assert (got.double() - want).abs().max() < (1e-5 if dtype == torch.float32 else 3e-2)
    assert torch.equal(sdpa_decode(q, k, v, torch.tensor([[0, 5]] * 3))[:, :3], torch.zeros(3, 3, 16))


def _history_attention(q, keys, values, p, sink, window, scale):
    """Independent oracle: softmax over every key position j <= p with j < sink or p - j < window."""
    j = torch.arange(keys.shape[-2])
    ok = (j <= p) & ((j < sink) | (p - j < window))
    s = (q.double() @ keys[..., ok, :].double().transpose(-1, -2)) * scale
    return torch.softmax(s, -1) @ values[..., ok, :].double()


@pytest.mark.parametrize("sink,window,prompt,backend", [(4, 8, 30, "banded"), (0, 5, 3, "banded"),
                                                        (3, 16, 10, "banded"), (2, 1, 9, "banded"),
                                                        (4, 8, 30, "reference"), (3, 16, 10, "triton")])
def test_ring_group_decode_reads_only_the_kept_slots(sink, window, prompt, backend, monkeypatch):
    """Every decode step of a ring equals softmax over the whole history under sees(), through each backend of
    attention_kernels.dispatch.decode_attention (Triton under the interpreter on CPU), and hands it only the kept slots."""
    monkeypatch.setenv(attention_kernels.dispatch.ENV, backend)
    torch.manual_seed(1)
    steps, d, n_rep = (25, 16, 2) if backend != "triton" else (12, 16, 2)
    total = prompt + steps
    keys, values = torch.randn(1, 1, total, d), torch.randn(1, 1, total, d)
    queries = torch.randn(1, n_rep, total, d)
    kv = torch.tensor([0])
    s_t, w_t = torch.tensor([[sink]]), torch.tensor([[window]])
    ring = RingGroup.from_prefill(kv, keys[:, :, :prompt], values[:, :, :prompt], torch.arange(prompt)[None, None],
                                  s_t, w_t, uniform=True)
    seen = []
    real = attention_kernels.dispatch.decode_attention
    monkeypatch.setattr(attention_kernels.dispatch, "decode_attention",
                        lambda q, k, v, kv_len, scale=None: seen.append((k.shape[2], kv_len.clone())) or real(q, k, v, kv_len, scale))
    real_prefix = attention_kernels.dispatch.decode_attention_prefix  # the same step when every head holds n slots
    monkeypatch.setattr(attention_kernels.dispatch, "decode_attention_prefix",
                        lambda q, k, v, n, scale=None: seen.append((min(k.shape[2], n), torch.tensor(n)))
                        or real_prefix(q, k, v, n, scale))
    spec = AttendSpec(torch.full((1, n_rep), sink), torch.full((1, n_rep), window), scale=0.3)
    for p in range(prompt, total):
        ring.append(keys[:, :, p : p + 1], values[:, :, p : p + 1], torch.tensor([[p]]))
        got = ring.attend(queries[:, :, p : p + 1], torch.tensor([[p]]), spec, n_rep)
        want = _history_attention(queries[:, :, p : p + 1], keys, values, p, sink, window, 0.3)
        assert (got.double() - want).abs().max() < 1e-5, p
        slots, kv_len = seen[-1]
        visible = min(p + 1, sink + window)  # keys a query at p sees
        assert slots <= sink + window and int(kv_len) == visible
        kept = ring.pos[0, 0][ring.pos[0, 0] >= 0]
        assert sorted(kept.tolist()) == [j for j in range(p + 1) if j < sink or p - j < window]
    assert len(seen) == steps


def test_ring_group_chunk_after_past_uses_the_masked_path_and_stays_exact():
    torch.manual_seed(2)
    sink, window, d = 2, 6, 8
    keys, values, queries = torch.randn(1, 1, 40, d), torch.randn(1, 1, 40, d), torch.randn(1, 1, 40, d)
    ring = RingGroup.from_prefill(torch.tensor([0]), keys[:, :, :20], values[:, :, :20], torch.arange(20)[None, None],
                                  torch.tensor([[sink]]), torch.tensor([[window]]), uniform=True)
    spec = AttendSpec(torch.tensor([[sink]]), torch.tensor([[window]]))
    for lo, hi in ((20, 29), (29, 30), (30, 40)):  # a chunk longer than the window, one token, another chunk
        pos = torch.arange(lo, hi)
        ring.append(keys[:, :, lo:hi], values[:, :, lo:hi], pos[None])
        got = ring.attend(queries[:, :, lo:hi], pos[None], spec, 1)
        for i, p in enumerate(range(lo, hi)):
            want = _history_attention(queries[:, :, p : p + 1], keys, values, p, sink, window, d ** -0.5)
            assert (got[:, :, i : i + 1].double() - want).abs().max() < 1e-5, p


def _per_kv_head_plan(model) -> Plan:
    ident = identity_from_config(model.config)
    heads = [DensePattern(), SinkWindowPattern(sink=2, alpha=6)]
    return Plan(model=ident, granularity="kv_head",
                layers=[LayerPlan(heads=heads[li % 2:] + heads[: li % 2]) for li in range(ident.num_layers)])


def test_plan_cache_generation_takes_the_kept_token_path(monkeypatch):
    model = tiny_model("llama")
    compressor.apply(model, _per_kv_head_plan(model))
    ids = torch.randint(1, 90, (1, 30))
    want = _recompute_greedy(model, ids, 20)
    calls = []
    real = attention_kernels.dispatch.decode_attention
    monkeypatch.setattr(attention_kernels.dispatch, "decode_attention",
                        lambda q, k, v, kv_len, scale=None: calls.append(k.shape[2]) or real(q, k, v, kv_len, scale))
    real_prefix = attention_kernels.dispatch.decode_attention_prefix  # a full ring: every head holds n slots
    monkeypatch.setattr(attention_kernels.dispatch, "decode_attention_prefix",
                        lambda q, k, v, n, scale=None: calls.append(min(k.shape[2], n)) or real_prefix(q, k, v, n, scale))
    cache = PlanCache(model)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, cache=cache,
                         pad_token_id=0)
    assert torch.equal(got, want)
    layers = identity_from_config(model.config).num_layers
    assert len(calls) == 19 * layers * 2  # every decode step, every layer, the dense and the ring group
    assert min(calls) == 6  # a span-6 head (sink 2 + window 4) keeps a ring of 6 slots, never more


def test_query_heads_with_their_own_windows_decode_over_the_shared_ring(monkeypatch):
    """query_head plans: the query heads of one KV head keep different (sink, window); a decode step reads the
    KV head's ring once, each query head masked by its own rule — equal to uncached recomputation, batch and
    left padding included."""
    from attention_kernels.kv_groups import RingGroup
    from tests.runtime_oracle import oracle_logits

    model = tiny_model("llama")
    ident = identity_from_config(model.config)
    heads = [SinkWindowPattern(sink=2, alpha=6), SinkWindowPattern(sink=1, alpha=3, beta=0.2),
             SinkWindowPattern(sink=4, alpha=10), DensePattern()]
    plan = Plan(model=ident, granularity="query_head", layers=[LayerPlan(heads=heads)] * ident.num_layers)
    compressor.apply(model, plan)
    calls = []
    real = RingGroup._decode_per_query_head
    monkeypatch.setattr(RingGroup, "_decode_per_query_head",
                        lambda self, *a: calls.append(1) or real(self, *a))
    rows = [torch.randint(1, 90, (1, 30), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.ones(2, 30, dtype=torch.long)
    ids[0], ids[1, 9:], mask[1, :9] = rows[0][0], rows[1][0, 9:], 0
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             cache=PlanCache(model), pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert calls  # the shared-ring path ran
    stock = tiny_model("llama")
    for r, (lo, n0) in enumerate(((0, 30), (9, 21))):
        seq = got.sequences[r : r + 1, lo:]
        want = oracle_logits(stock, plan, seq, n0=n0)[0, n0 - 1 : -1]
        assert (torch.stack(got.logits)[:, r] - want).abs().max() < 1e-4, r
