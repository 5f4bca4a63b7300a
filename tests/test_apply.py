"""compressor.apply: per-head masked outputs, dense equivalence, span isolation, generate with the bounded cache."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import compressor
from compressor.hf.plan_cache import PlanCache, dense_cache_bytes
from plans.identity import identity_from_config
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern
from plans.span import visible
from tests.conftest import tiny_model


def mixed_plan(model, granularity="kv_head", seed=0) -> Plan:
    ident = identity_from_config(model.config)
    n = ident.num_heads if granularity == "query_head" else ident.num_kv_heads
    g = torch.Generator().manual_seed(seed)
    layers = []
    for li in range(ident.num_layers):
        heads = []
        for h in range(n):
            r = int(torch.randint(0, 4, (1,), generator=g))
            if r == 0 and (li + h) % 3 == 0:
                heads.append(DensePattern())
            else:
                heads.append(SinkWindowPattern(sink=int(torch.randint(0, 5, (1,), generator=g)),
                                               alpha=float(torch.randint(2, 9, (1,), generator=g)),
                                               beta=[0.0, 0.125, 0.25][r % 3]))
        layers.append(LayerPlan(heads=heads))
    return Plan(model=ident, granularity=granularity, layers=layers)


# an independent oracle: eager softmax with a per-head mask built entry by entry from plans.span.visible
_ORACLE_PLAN = {}


def _oracle(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    plan: Plan = _ORACLE_PLAN["plan"]
    b, hq, n, d = q.shape
    rep = hq // k.shape[1]
    out = torch.zeros_like(q)
    for h in range(hq):
        p = plan.pattern(module.layer_idx, h)
        span = n if isinstance(p, DensePattern) else p.span(n)
        sink = 0 if isinstance(p, DensePattern) else p.sink
        mask = torch.tensor([[bool(visible(i, j, sink, span)) for j in range(n)] for i in range(n)])
        s = (q[:, h] @ k[:, h // rep].transpose(-1, -2)) * scaling
        s = s.masked_fill(~mask, -math.inf)
        out[:, h] = torch.softmax(s.double(), -1).to(q.dtype) @ v[:, h // rep]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("oracle_test", _oracle)
AttentionMaskInterface.register("oracle_test", sdpa_mask)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt_neox"])
@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_masked_output_matches_independent_oracle(arch, granularity):
    over = {"sliding_window": None} if arch == "mistral" else {}
    model = tiny_model(arch, **over)
    plan = mixed_plan(model, granularity)
    ids = torch.randint(1, 90, (2, 37))
    _ORACLE_PLAN["plan"] = plan
    model.set_attn_implementation("oracle_test")
    ref = model(ids).logits
    compressor.apply(model, plan)
    got = model(ids).logits  # differentiable: the masked reference path
    with torch.no_grad():
        fast = model(ids).logits  # inference: the fast kernel (banded on CPU)
    assert not plan.is_dense()
    assert (got - ref).abs().max() < 1e-4
    assert (fast - ref).abs().max() < 1e-4


def test_all_dense_plan_reproduces_unpatched_logits(tiny_llama):
    ids = torch.randint(1, 90, (2, 50))
    ref = tiny_llama(ids).logits
    ident = identity_from_config(tiny_llama.config)
    plan = Plan(model=ident, layers=[LayerPlan(heads=[DensePattern()] * ident.num_kv_heads)] * ident.num_layers)
    compressor.apply(tiny_llama, plan)
    assert tiny_llama.config._attn_implementation == "compress"
    assert (tiny_llama(ids).logits - ref).abs().max() <= 1e-5


def test_token_outside_every_span_cannot_change_later_logits(tiny_llama):
    ident = identity_from_config(tiny_llama.config)
    pat = SinkWindowPattern(sink=2, alpha=6, beta=0.0)
    plan = Plan(model=ident, layers=[LayerPlan(heads=[pat] * ident.num_kv_heads)] * ident.num_layers)
    compressor.apply(tiny_llama, plan)
    ids = torch.randint(1, 90, (1, 40))
    ids2 = ids.clone()
    ids2[0, 10] = (ids[0, 10] + 1) % 90 + 1  # position 10: not a sink, leaves every window after 10 + 2 layers*5
    a, b = tiny_llama(ids).logits, tiny_llama(ids2).logits
    # receptive field grows by window-1 = 3 per layer: positions >= 10 + 2*(6-2-1) + 1 are untouched
    assert (a[0, 17:] - b[0, 17:]).abs().max() == 0
    assert (a[0, 10] - b[0, 10]).abs().max() > 0  # the token itself does change


def test_left_padded_batch_equals_unpadded_rows(tiny_llama):
    compressor.apply(tiny_llama, mixed_plan(tiny_llama))
    rows = [torch.randint(1, 90, (n,)) for n in (30, 22, 15)]
    width = 30
    ids = torch.zeros(3, width, dtype=torch.long)
    am = torch.zeros(3, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        am[i, width - len(r):] = 1
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = tiny_llama(ids, attention_mask=am, position_ids=pos).logits
    with torch.no_grad():  # the kernel path, sample by sample over the real suffix
        fast = tiny_llama(ids, attention_mask=am, position_ids=pos).logits
    for i, r in enumerate(rows):
        single = tiny_llama(r[None]).logits
        assert (out[i, width - len(r):] - single[0]).abs().max() < 1e-4
        assert (fast[i, width - len(r):] - single[0]).abs().max() < 1e-4


def _recompute_greedy(model, ids, steps, am=None):
    """Uncached greedy decoding: the whole sequence each step, spans fixed at the prompt length."""
    n0 = (am.sum(-1) if am is not None else torch.full((ids.shape[0],), ids.shape[1]))
    for _ in range(steps):
        full_am = am if am is not None else torch.ones_like(ids)
        pos = (full_am.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=full_am, position_ids=pos, compress_n0=n0, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if am is not None:
            am = torch.cat([am, torch.ones_like(nxt)], dim=1)
    return ids


@pytest.mark.parametrize("arch,prompt", [("llama", 33), ("llama", 5), ("qwen2", 70), ("gpt_neox", 33)])
def test_generate_with_bounded_cache_equals_recompute(arch, prompt):
    model = tiny_model(arch)
    compressor.apply(model, mixed_plan(model, seed=3))
    ids = torch.randint(1, 90, (1, prompt))
    want = _recompute_greedy(model, ids, 40)
    cache = PlanCache(model)
    got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                         cache=cache, pad_token_id=0)
    assert torch.equal(got, want)
    assert cache.nbytes() < dense_cache_bytes(model, got.shape[1] - 1)


def test_generate_left_padded_beam_and_sampling(tiny_llama):
    model = tiny_llama
    compressor.apply(model, mixed_plan(model, seed=5))
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
                        [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
    am = (torch.arange(16)[None] >= torch.tensor([[3], [0]])).long()
    want = _recompute_greedy(model, ids, 8, am)
    got = model.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, cache=PlanCache(model),
                         pad_token_id=0)
    assert torch.equal(got, want)
    # beam search and sampling: bounded cache == the same plan with a full DynamicCache
    for kw in ({"num_beams": 3}, {"do_sample": True, "num_return_sequences": 2}):
        torch.manual_seed(0)
        a = model.generate(ids, attention_mask=am, max_new_tokens=6, cache=PlanCache(model), pad_token_id=0, **kw)
        torch.manual_seed(0)
        b = model.generate(ids, attention_mask=am, max_new_tokens=6, pad_token_id=0, **kw)
        assert torch.equal(a, b), kw


def test_native_sliding_window_is_intersected():
    model = tiny_model("mistral")  # sliding_window=24
    plan = mixed_plan(model)
    compressor.apply(model, plan)
    ids = torch.randint(1, 90, (1, 60))
    got = model(ids).logits
    model.config.sliding_window = None
    model.set_attn_implementation("compress")
    no_native = model(ids).logits
    assert (got - no_native).abs().max() > 1e-4  # the native window still acts



def test_mixed_operator_plan_applies_and_generates():
    from plans.schema import LinearPattern

    model = tiny_model("llama")
    ident = identity_from_config(model.config)
    plan = Plan(model=ident, granularity="kv_head", layers=[
        LayerPlan(heads=[LinearPattern(), SinkWindowPattern(sink=2, alpha=8, beta=0.0, operator="relu_softmax")]),
        LayerPlan(heads=[DensePattern(operator="relu_softmax"), SinkWindowPattern(sink=2, alpha=10, beta=0.125)]),
    ])
    compressor.apply(model, plan)
    ids = torch.randint(1, 90, (1, 29))
    dense = tiny_model("llama")(ids).logits
    with torch.no_grad():
        got = model(ids).logits
    assert torch.isfinite(got).all() and (got - dense).abs().max() > 1e-3
    want = _recompute_greedy(model, ids, 8)
    cache = PlanCache(model)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         cache=cache, pad_token_id=0)
    assert torch.equal(gen, want)
    # the all-linear KV head of layer 0 holds a D x D state, not its tokens
    from attention_kernels.kv_groups import LinearGroup

    linear_group = [g for g in cache.layers[0].groups if isinstance(g, LinearGroup)]
    assert len(linear_group) == 1 and linear_group[0].state.S.shape[-2:] == (16, 16)
