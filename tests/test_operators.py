"""attention_kernels.cheap_operators (linear / ReLU-softmax attention) and search_space.operator_selection (cost entries, selection)."""

from __future__ import annotations


import pytest
import torch

from attention_kernels.cheap_operators import (
    LinearState, linear_attention, linear_attention_quadratic, linear_decode_step, relu_softmax_attention,
)
from attention_kernels.reference import pattern_mask
from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.schema import DensePattern, LinearPattern, SinkWindowPattern
from plans.span import kept_entries
from profilers.gates import gate_profile_tensors
from profilers.profile_format import Profile, ProfileMeta
from search_space.operator_selection import (
    OPERATOR_COSTS, OPERATORS, GateInfo, measure_operator_costs, operator_cost, plan_cost, select_operators,
)


def qkv(b=2, hq=4, hkv=2, nq=37, nk=None, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    nk = nk or nq
    return (torch.randn(b, hq, nq, d, generator=g).to(dtype), torch.randn(b, hkv, nk, d, generator=g).to(dtype),
            torch.randn(b, hkv, nk, d, generator=g).to(dtype))


def direct_linear(q, k, v, scale, valid=None):
    """Row by row, head by head, straight from the definition (independent of the vectorised oracle)."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    g = hq // k.shape[1]
    out = torch.zeros(b, hq, nq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for h in range(hq):
            for r in range(nq):
                i = nk - nq + r
                js = [j for j in range(i + 1) if valid is None or bool(valid[bi, j])]
                acc = sum(((q[bi, h, r] @ k[bi, h // g, j]) * scale * v[bi, h // g, j] for j in js),
                          torch.zeros(v.shape[-1], dtype=q.dtype))
                out[bi, h, r] = acc / max(1, len(js))
    return out


# ---------------------------------------------------------------------------------------------------- linear
def test_quadratic_oracle_matches_definition():
    q, k, v = qkv(b=1, nq=9, d=4)
    valid = torch.ones(1, 9, dtype=torch.bool)
    valid[0, :3] = False
    assert torch.allclose(linear_attention_quadratic(q, k, v, 0.3), direct_linear(q, k, v, 0.3), atol=1e-12)
    assert torch.allclose(linear_attention_quadratic(q, k, v, 0.3, k_valid=valid),
                          direct_linear(q, k, v, 0.3, valid), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 37, 64, 65])
@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 200])
def test_linear_equals_quadratic_fp64(n, chunk):
    q, k, v = qkv(nq=n, seed=n)
    ref = linear_attention_quadratic(q, k, v)
    out = linear_attention(q, k, v, chunk=chunk)
    assert out.shape == (2, 4, n, 8) and out.dtype == torch.float64
    assert (out - ref).abs().max() <= 1e-10


def test_linear_fp32_gqa_mha_and_later_chunk():
    for hq, hkv in ((4, 2), (6, 1), (3, 3)):
        q, k, v = qkv(hq=hq, hkv=hkv, nq=77, d=16, dtype=torch.float32, seed=hq)
        ref = linear_attention_quadratic(q.double(), k.double(), v.double(), 0.25)
        out = linear_attention(q, k, v, 0.25, chunk=16)
        assert out.dtype == torch.float32 and (out.double() - ref).abs().max() <= 1e-5
    # queries are the last nq of nk keys (a later prefill chunk)
    q, k, v = qkv(nq=11, nk=50, seed=3)
    assert (linear_attention(q, k, v, chunk=4) - linear_attention_quadratic(q, k, v)).abs().max() <= 1e-10
    # half precision is computed in float32 and cast back
    q, k, v = qkv(nq=33, dtype=torch.bfloat16)
    out = linear_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert (out.double() - linear_attention_quadratic(q.double(), k.double(), v.double())).abs().max() < 0.05


def test_linear_padding():
    q, k, v = qkv(b=2, nq=30, seed=5)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, :7] = False  # left padding on sample 0
    out = linear_attention(q, k, v, k_valid=valid, chunk=8)
    ref = linear_attention_quadratic(q, k, v, k_valid=valid)
    assert (out - ref).abs().max() <= 1e-10
    assert not out[0, :, :7].any()  # pad queries see nothing
    # real rows equal the unpadded computation of the real tokens, whatever is in the pads
    alone = linear_attention(q[:1, :, 7:], k[:1, :, 7:], v[:1, :, 7:], chunk=8)
    assert (out[:1, :, 7:] - alone).abs().max() <= 1e-10
    k2 = k.clone()
    k2[0, :, :7] = 1e3
    assert (linear_attention(q, k2, v, k_valid=valid)[:, :, 7:] - out[:, :, 7:]).abs().max() <= 1e-9
    # the divisor counts real keys: constant v gives back v when all scores are 1/scale
    ones = torch.ones(1, 1, 12, 4, dtype=torch.float64)
    vv = torch.arange(4, dtype=torch.float64).expand(1, 1, 12, 4)
    val = torch.ones(1, 12, dtype=torch.bool)
    val[0, :5] = False
    o = linear_attention(ones, ones, vv, 0.25, k_valid=val)
    assert torch.allclose(o[0, 0, 5:], vv[0, 0, 5:])


def test_linear_decode_state_equals_quadratic_every_step():
    q, k, v = qkv(b=2, nq=40, d=8, seed=7)
    prefill = 13
    ref = linear_attention_quadratic(q, k, v)
    out, state = linear_attention(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], return_state=True, chunk=5)
    assert (out - ref[:, :, :prefill]).abs().max() <= 1e-10
    s2 = LinearState.from_prefill(k[:, :, :prefill], v[:, :, :prefill])
    assert torch.allclose(state.S, s2.S, atol=1e-12) and torch.equal(state.count, s2.count)
    assert state.S.shape == (2, 2, 8, 8) and state.nbytes() == (2 * 2 * 64 + 2) * 8  # no N in it
    for t in range(prefill, 40):
        o, state = linear_decode_step(state, q[:, :, t], k[:, :, t], v[:, :, t])
        assert o.shape == (2, 4, 8)
        assert (o - ref[:, :, t]).abs().max() <= 1e-10, t
    assert torch.equal(state.count, torch.full((2,), 40.0, dtype=torch.float64))
    # several new tokens at once (a chunk) and an empty start
    st = LinearState.empty(2, 2, 8, dtype=torch.float64)
    o, st = linear_decode_step(st, q[:, :, :20], k[:, :, :20], v[:, :, :20])
    o2, st = linear_decode_step(st, q[:, :, 20:], k[:, :, 20:], v[:, :, 20:])
    assert (torch.cat([o, o2], 2) - ref).abs().max() <= 1e-10
    # padded decode tokens add nothing
    st3 = LinearState.from_prefill(k, v)
    _, st4 = linear_decode_step(st3, q[:, :, :1], k[:, :, :1], v[:, :, :1],
                                k_valid=torch.tensor([[False], [True]]))
    assert torch.equal(st4.S[0], st3.S[0]) and st4.count.tolist() == [40.0, 41.0]


def test_linear_gradients():
    q, k, v = qkv(b=1, hq=2, hkv=1, nq=9, d=3, seed=11)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: linear_attention(a, b, c, chunk=4), (q, k, v))


# ---------------------------------------------------------------------------------------------------- relu
def direct_relu(q, k, v, allowed, scale, eps):
    b, hq, nq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(b, hq, nq, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for h in range(hq):
            s = torch.relu(q[bi, h] @ k[bi, h // g].T * scale) * allowed[bi, h]
            out[bi, h] = (s / (s.sum(-1, keepdim=True) + eps)) @ v[bi, h // g]
    return out


def test_relu_softmax_causal_and_masked():
    q, k, v = qkv(nq=45, seed=2)
    causal = torch.ones(45, 45, dtype=torch.bool).tril().expand(2, 4, 45, 45)
    ref = direct_relu(q, k, v, causal, 0.35, 1e-6)
    assert (relu_softmax_attention(q, k, v, None, 0.35) - ref).abs().max() <= 1e-12
    assert (relu_softmax_attention(q, k, v, None, 0.35, row_chunk=8) - ref).abs().max() <= 1e-12
    # a per-head sink+window mask (the key set of a relu sink_window head)
    pos = torch.arange(45).expand(2, 45)
    mask = pattern_mask(pos, pos, torch.ones(2, 45, dtype=torch.bool), torch.tensor([0, 2, 4, 1]),
                        torch.tensor([45, 8, 12, 5]))
    out = relu_softmax_attention(q, k, v, mask, 0.35, eps=1e-5, row_chunk=16)
    assert (out - direct_relu(q, k, v, mask, 0.35, 1e-5)).abs().max() <= 1e-12
    # a shared (B, 1, q, k) mask and queries = last nq keys
    q2, k2, v2 = qkv(nq=6, nk=20, seed=4)
    m = torch.rand(2, 1, 6, 20, generator=torch.Generator().manual_seed(0)) > 0.4
    assert (relu_softmax_attention(q2, k2, v2, m) - direct_relu(q2, k2, v2, m.expand(2, 4, 6, 20), 8 ** -0.5, 1e-6)
            ).abs().max() <= 1e-12
    causal_tail = torch.arange(20)[None, :] <= torch.arange(14, 20)[:, None]
    assert torch.allclose(relu_softmax_attention(q2, k2, v2), relu_softmax_attention(q2, k2, v2, causal_tail[None, None]))
    # all-negative rows give 0, no NaN; fp32 / bf16 dtypes kept
    qq = torch.ones(1, 1, 3, 2)
    kk = -torch.ones(1, 1, 3, 2)
    assert not relu_softmax_attention(qq, kk, torch.randn(1, 1, 3, 2)).any()
    assert relu_softmax_attention(q.float(), k.float(), v.float()).dtype == torch.float32
    assert relu_softmax_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="boolean"):
        relu_softmax_attention(q, k, v, mask.float())


# ---------------------------------------------------------------------------------------------------- costs
def test_cost_entries():
    assert set(OPERATOR_COSTS) == set(OPERATORS) == {"softmax", "sink_window", "relu_softmax", "linear"}
    d = 64
    for op in OPERATORS:
        c = [operator_cost(op, n, d, span=256) for n in (1024, 2048, 4096, 8192)]
        assert all(x > 0 for x in c) and c == sorted(c) and len(set(c)) == 4, op
    r = operator_cost("softmax", 8192, d) / operator_cost("softmax", 4096, d)
    assert 3.9 < r < 4.1  # quadratic
    for op in ("linear", "sink_window"):
        r = operator_cost(op, 8192, d, span=256) / operator_cost(op, 4096, d, span=256)
        assert 1.9 < r < 2.1, op  # linear in N
    assert operator_cost("relu_softmax", 4096, d) == operator_cost("softmax", 4096, d)
    assert operator_cost("sink_window", 4096, d, span=4096) == operator_cost("softmax", 4096, d)
    assert operator_cost("softmax", 4096, d) == 2 * d * kept_entries(4096, 4096)
    assert operator_cost("linear", 4096, d) < operator_cost("sink_window", 4096, d, span=256) < operator_cost("softmax", 4096, d)
    with pytest.raises(CompressError, match="unknown operator"):
        operator_cost("flash", 10, 4)
    # a measured table: interpolation inside, power law outside
    table = {"softmax": {1024: 1.0, 2048: 4.0}, "linear": {1024: 1.0, 2048: 2.0}}
    assert operator_cost("softmax", 1536, d, cost_table=table) == pytest.approx(2.5)
    assert operator_cost("softmax", 4096, d, cost_table=table) == pytest.approx(16.0)
    assert operator_cost("linear", 512, d, cost_table=table) == pytest.approx(0.5)
    with pytest.raises(CompressError, match="no row"):
        operator_cost("relu_softmax", 1024, d, cost_table=table)


def test_measure_operator_costs():
    t = measure_operator_costs((64, 128), head_dim=16, window=(4, 16), repeats=1)
    assert set(t) == set(OPERATORS)
    for op, row in t.items():
        assert set(row) == {64, 128} and all(ms > 0 for ms in row.values()), op


# ---------------------------------------------------------------------------------------------------- selection
IDENT = ModelIdentity(model_type="llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
GATES_KV = torch.tensor([[0.9, 0.1], [0.3, 0.7]], dtype=torch.float64)


def gates_profile(pair="softmax_vs_linear"):
    gq = GATES_KV.repeat_interleave(2, dim=1)
    meta = ProfileMeta(tool_version="t", method="gates", model=IDENT, lengths=[256], block=64, sink_sizes=[8],
                       extra={"pair": pair, "window": [8, 32], "granularity": "kv_head",
                              "gates_kv": GATES_KV.tolist(), "gates_q": gq.tolist()})
    return Profile(meta=meta, tensors=gate_profile_tensors(gq, GATES_KV, [256], 64))


def test_select_operators_pairs():
    cheap = {"softmax_vs_linear": LinearPattern(), "softmax_vs_relu": DensePattern(operator="relu_softmax"),
             "full_vs_window": SinkWindowPattern(sink=8, alpha=32, beta=0.0)}
    for pair, pat in cheap.items():
        plan = select_operators(gates_profile(pair), 0.5)
        assert plan.granularity == "kv_head" and plan.source == "gates" and plan.lengths == [256]
        assert [l.heads for l in plan.layers] == [[DensePattern(), pat], [pat, DensePattern()]], pair
        assert plan.predicted.solver["expensive_heads"] == 2 and plan.predicted.solver["threshold"] == 0.7
    plan = select_operators(gates_profile(), 0.25)
    assert plan.operators(0) == ["softmax", "softmax", "linear", "linear"]
    assert plan.operators(1) == ["linear"] * 4
    assert all(isinstance(p, LinearPattern) for l in select_operators(gates_profile(), 0.0).layers for p in l.heads)
    assert select_operators(gates_profile(), 1.0).is_dense()
    rc = plan.predicted.solver["relative_cost"][256]
    ratio = operator_cost("linear", 256, 16) / operator_cost("softmax", 256, 16)
    assert rc == pytest.approx((1 + 3 * ratio) / 4)  # one dense KV head of four
    assert select_operators(gates_profile(), 0.25, length=8192).predicted.solver["relative_cost"][8192] < 0.27


def test_select_operators_granularity_and_tensor_source():
    q_gates = torch.tensor([[0.9, 0.2, 0.1, 0.3], [0.5, 0.6, 0.8, 0.05]])
    relu = GateInfo(identity=IDENT, pair="softmax_vs_relu")
    plan = select_operators(q_gates, 0.25, info=relu, granularity="query_head")
    assert plan.granularity == "query_head"
    assert [h.operator for h in plan.layers[0].heads] == ["softmax", "relu_softmax", "relu_softmax", "relu_softmax"]
    assert [h.operator for h in plan.layers[1].heads] == ["relu_softmax", "relu_softmax", "softmax", "relu_softmax"]
    kv = select_operators(q_gates, 0.5, info=relu, granularity="kv_head")
    # KV gates = group max: [[0.9, 0.3], [0.6, 0.8]] -> keep (0, 0) and (1, 1)
    assert [[p.operator for p in l.heads] for l in kv.layers] == [["softmax", "relu_softmax"], ["relu_softmax", "softmax"]]
    qp = select_operators(gates_profile(), 0.5, granularity="query_head")
    assert qp.operators(0) == ["softmax", "softmax", "linear", "linear"]
    with pytest.raises(CompressError, match="identity"):
        select_operators(q_gates, 0.5)
    with pytest.raises(CompressError, match="exactly one"):
        select_operators(gates_profile(), 0.5, cost_budget=0.5)
    with pytest.raises(CompressError, match="exactly one"):
        select_operators(gates_profile())
    with pytest.raises(CompressError, match=r"\[0, 1\]"):
        select_operators(gates_profile(), 1.5)
    with pytest.raises(CompressError, match="shape"):
        select_operators(torch.zeros(3, 2), 0.5, info=GateInfo(identity=IDENT))
    with pytest.raises(CompressError, match="not 'gates'"):
        p = gates_profile()
        p.meta.method = "taylor"
        select_operators(p, 0.5)


def test_select_operators_cost_budget():
    prof = gates_profile("full_vs_window")
    n = 4096
    dense_all = 2 * 4 * operator_cost("softmax", n, 16)
    for budget in (0.3, 0.55, 0.8, 1.0):
        plan = select_operators(prof, cost_budget=budget, length=n)
        cost = plan_cost(plan, n)
        assert cost <= budget * dense_all * (1 + 1e-9)
        k = plan.predicted.solver["expensive_heads"]
        assert plan.predicted.solver["relative_cost"][n] == pytest.approx(cost / dense_all)
        # one more expensive KV head would break the budget (greedy by gate, uniform costs)
        extra = 2 * (operator_cost("softmax", n, 16) - operator_cost("sink_window", n, 16, span=32))
        assert k == 4 or cost + extra > budget * dense_all
        assert plan.predicted.solver["length"] == n
    assert select_operators(prof, cost_budget=0.55, length=n).predicted.solver["expensive_heads"] == 2
    assert select_operators(prof, cost_budget=0.3, length=n).layers[0].heads[0] == DensePattern()
    with pytest.raises(CompressError, match="below the all-"):
        select_operators(gates_profile("softmax_vs_relu"), cost_budget=0.5, length=n)
    table = {"softmax": {n: 10.0}, "linear": {n: 1.0}}
    plan = select_operators(gates_profile(), cost_budget=0.6, length=n, cost_table=table)  # 8 + 2 x 18 <= 48
    assert plan.predicted.solver["expensive_heads"] == 2 and plan.predicted.solver["cost_units"] == "ms"


# ---------------------------------------------------------------------------------------------------- patching
def test_apply_runs_operators_per_head():
    """compressor.apply with relu_softmax / linear / window / dense heads matches a per-head oracle."""
    import compressor
    from plans.identity import identity_from_config
    from plans.schema import LayerPlan, Plan
    from tests.conftest import tiny_model

    m = tiny_model("llama")
    ident = identity_from_config(m.config)
    plan = Plan(model=ident, granularity="query_head", layers=[
        LayerPlan(heads=[DensePattern(), LinearPattern(), DensePattern(operator="relu_softmax"),
                         SinkWindowPattern(sink=2, alpha=5, operator="relu_softmax")]),
        LayerPlan(heads=[LinearPattern(), SinkWindowPattern(sink=1, alpha=4), DensePattern(), LinearPattern()]),
    ])
    ids = torch.randint(1, 90, (2, 19), generator=torch.Generator().manual_seed(0))
    captured = {}

    def oracle(module, q, k, v, mask, scaling=None, **kw):
        b, hq, n, d = q.shape
        outs = []
        for h in range(hq):
            p = plan.pattern(module.layer_idx, h)
            kh, vh = k[:, h // 2: h // 2 + 1], v[:, h // 2: h // 2 + 1]
            qh = q[:, h: h + 1]
            if isinstance(p, LinearPattern):
                outs.append(linear_attention_quadratic(qh, kh, vh, scaling))
                continue
            span = n if isinstance(p, DensePattern) else p.span(n)
            pos = torch.arange(n).expand(b, n)
            mk = pattern_mask(pos, pos, torch.ones(b, n, dtype=torch.bool), torch.tensor([p.sink_tokens]),
                              torch.tensor([span]))
            if p.operator == "relu_softmax":
                outs.append(relu_softmax_attention(qh, kh, vh, mk, scaling))
            else:
                outs.append(torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mk, scale=scaling))
        captured[module.layer_idx] = True
        return torch.cat(outs, 1).transpose(1, 2).contiguous(), None

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("test_op_oracle", oracle)
    AttentionMaskInterface.register("test_op_oracle", lambda *a, **k: None)
    m.set_attn_implementation("test_op_oracle")
    with torch.no_grad():
        ref = m(ids).logits
    compressor.apply(m, plan)
    with torch.no_grad():
        out = m(ids).logits
    assert captured and (out - ref).abs().max() < 1e-4
