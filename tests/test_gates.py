"""Gates (profilers.gates, compressor.gate_profile, compressor.hf.gate_attention): gates find the long-range head of
a hand-built model; profile encoding; model state restored."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compressor.gate_profile import GateArgs, run_gates
from compressor.hf.gate_attention import GATES_ATTN
from compressor.hf.modules import attention_modules, module_state
from plans.errors import CompressError
from profilers.gates import PAIRS, profile_gates
from profilers.profile_format import load_profile
from profilers.data.samples import Sample
from tests.conftest import tiny_model

VOCAB, N, COPY = 16, 64, 40
CONST, COPY_DIMS, LOCAL_DIMS, L1_DIMS = 16, 17, 33, 49  # residual layout (first dim of each subspace)
HD = 16


def _offset_qk(model, offset: int, sharp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant q, k (head_dim) whose RoPE'd score is sharp * sum_f cos(theta_f (d - offset)), d = i - j:
    it peaks at distance ``offset`` (k = (1..1 | 0..0), q = R_{-offset} k in HF's rotate_half convention)."""
    th = model.model.rotary_emb.inv_freq.double()
    k = torch.cat([torch.ones(HD // 2), torch.zeros(HD // 2)]).double()
    q = torch.cat([torch.cos(offset * th), -torch.sin(offset * th)]) * sharp
    return q.float(), k.float()


def copy_model() -> LlamaForCausalLM:
    """2 layers, 4 query heads, 2 KV heads. Layer 0: KV head 0 fetches the token 39 back, so position t - 1 predicts
    token t = token t - COPY (COPY = 40; long range), KV head 1
    the previous token (local). Layer 1: both KV heads are local (distance 2 and 5). MLPs are zero.

    Residual: one-hot token in dims 0..15, a constant 1 in dim 16 (every embedding has the same norm, so after
    RMSNorm q and k -- read from the constant dim only -- are position-independent and RoPE alone sets the pattern);
    heads write what they fetch (the one-hot of the attended token) into their own subspace."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=100.0,
                      tie_word_embeddings=False, pad_token_id=None)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    m.set_attn_implementation("sdpa")
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.fill_(1.0)
        emb = m.model.embed_tokens.weight
        emb[torch.arange(VOCAB), torch.arange(VOCAB)] = 1.0
        emb[:, CONST] = 1.0
        plan = {0: [(COPY - 1, COPY_DIMS), (1, LOCAL_DIMS)], 1: [(2, L1_DIMS), (5, L1_DIMS)]}
        for li, heads in plan.items():
            at = m.model.layers[li].self_attn
            for kv, (off, out0) in enumerate(heads):
                q, k = _offset_qk(m, off, sharp=4.0)
                at.k_proj.weight[kv * HD:(kv + 1) * HD, CONST] = k
                width = min(HD, 64 - out0)
                at.v_proj.weight[kv * HD + torch.arange(width), torch.arange(width)] = 1.0
                for qh in (2 * kv, 2 * kv + 1):  # the two query heads of this KV head
                    at.q_proj.weight[qh * HD:(qh + 1) * HD, CONST] = q
                    at.o_proj.weight[out0 + torch.arange(width), qh * HD + torch.arange(width)] = 0.5
        m.lm_head.weight[torch.arange(VOCAB), COPY_DIMS + torch.arange(VOCAB)] = 1.0
    return m


def copy_samples(k: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        x = torch.randint(0, VOCAB, (N,), generator=g)
        x[COPY:] = x[: N - COPY].clone()
        lm = torch.zeros(N, dtype=torch.bool)
        lm[COPY:] = True
        out.append(Sample(x, lm))
    return out


def test_hand_built_model_copies():
    m = copy_model()
    s = copy_samples(4)
    ids = torch.stack([x.input_ids for x in s])
    with torch.no_grad():
        pred = m(ids).logits.argmax(-1)
    acc = (pred[:, COPY - 1:-1] == ids[:, COPY:]).float().mean()
    assert acc > 0.95, acc


def test_gates_find_the_long_range_head(tmp_path):
    m = copy_model()
    impl = m.config._attn_implementation
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    prof = run_gates(m, {N: copy_samples(4)}, tmp_path / "gates", GateArgs(pair="full_vs_window", window=(4, 16), steps=30, lr=0.2, l1=0.05, block=16, progress=True, seed=0), model_name="copy")
    # the model is untouched
    assert m.config._attn_implementation == impl
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert len(attention_modules(m)) == 2
    assert all(module_state(mod).controller is None for mod in attention_modules(m))

    g = prof.tensors["gate.kv"]
    assert g.shape == (2, 2)
    assert int(g.argmax()) == 0, g  # layer 0, KV head 0: the copy head
    assert g[0, 0] > 0.8 and g[0, 1] < 0.3 and g[1].max() < 0.3, g
    assert torch.equal(prof.tensors["gate.q"], g.repeat_interleave(2, dim=1))

    # profile encoding: gate in the last bucket, zero elsewhere; the existing masked_loss reads it back
    loaded = load_profile(tmp_path / "gates")
    assert loaded.meta.method == "gates" and loaded.meta.block == 16 and loaded.meta.sink_sizes == [4]
    ex = loaded.meta.extra
    assert ex["pair"] == "full_vs_window" and ex["window"] == [4, 16] and ex["granularity"] == "kv_head"
    assert torch.allclose(torch.tensor(ex["gates_kv"], dtype=torch.float64), g)
    d = loaded.dist(N, "kv")
    assert d.shape == (2, 2, 4) and torch.equal(d[..., -1], g) and not d[..., :-1].any()
    assert loaded.sinkdist(N, "q").shape == (2, 4, 1, 4) and not loaded.sinkdist(N, "q").any()
    for w in (1, 12, 16, 48):
        assert torch.allclose(loaded.masked_loss(N, 4, w), g)
    assert torch.allclose(loaded.masked_loss(N, 4, 56), g * 0.5)  # inside the last bucket: linear taper
    assert not loaded.masked_loss(N, 4, 64).any()
    assert ex["history"][-1] < ex["history"][0]
    pg = profile_gates(loaded)
    assert pg["pair"] == "full_vs_window" and pg["window"] == (4, 16) and torch.equal(pg["kv"], g)


def test_gates_query_head_granularity_and_other_pairs(tmp_path):
    m = copy_model()
    prof = run_gates(m, {N: copy_samples(2)}, None, GateArgs(pair="full_vs_window", window=(4, 16), steps=25, lr=0.25, l1=0.05, block=16, granularity="query_head", progress=False))
    gq, gkv = prof.tensors["gate.q"], prof.tensors["gate.kv"]
    assert gq.shape == (2, 4) and torch.equal(gkv, gq.view(2, 2, 2).amax(-1))
    assert gq[0, :2].min() > gq[0, 2:].max() and gq[0, :2].min() > gq[1].max(), gq
    assert not (tmp_path / "x.json").exists()
    for pair in ("softmax_vs_relu", "softmax_vs_linear"):
        p = run_gates(tiny_model("llama"), {24: [Sample(torch.arange(1, 25), torch.ones(24, dtype=torch.bool)
                                                       .index_fill(0, torch.tensor([0]), False))]}, tmp_path / pair, GateArgs(pair=pair, steps=3, progress=False, window=(4, 8), block=8))
        assert p.meta.extra["pair"] == pair and p.tensors["gate.kv"].shape == (2, 2)
        assert math.isfinite(p.meta.extra["history"][-1])
        assert (p.tensors["gate.kv"] < 1).all() and (p.tensors["gate.kv"] > 0).all()


def test_gates_errors():
    m = tiny_model("llama")
    s = {16: [Sample(torch.arange(16), torch.ones(16, dtype=torch.bool))]}
    with pytest.raises(CompressError, match="pair"):
        run_gates(m, s, None, GateArgs(pair="nope", steps=1, progress=False))
    with pytest.raises(CompressError, match="tokens"):
        run_gates(m, {17: s[16]}, None, GateArgs(steps=1, progress=False))
    with pytest.raises(CompressError, match="no calibration"):
        run_gates(m, {}, None, GateArgs(steps=1, progress=False))
    assert set(PAIRS) == {"full_vs_window", "softmax_vs_relu", "softmax_vs_linear"} and GATES_ATTN
