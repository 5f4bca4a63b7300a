"""Run-time semantics in ordinary use (issue 10): short prompts, chunked prefill, per-sequence state, every mask and
cache form stock sdpa accepts, model features of the attention call. Expected values come from the stock model
(all-dense plans), from uncached recomputation under the explicit oracle in ``tests/runtime_oracle.py``, or from
running each sequence alone."""

from __future__ import annotations

import math

import pytest
import torch

import compressor
from compressor import PlanCache
from plans.identity import identity_from_config
from plans.importers import from_moa
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern
from tests.conftest import tiny_model
from tests.runtime_oracle import oracle_greedy, oracle_logits

GEN = dict(do_sample=False, pad_token_id=0)


def same_heads_plan(model, heads, **kw) -> Plan:
    ident = identity_from_config(model.config)
    return Plan(model=ident, layers=[LayerPlan(heads=list(heads)) for _ in range(ident.num_layers)], **kw)


def patched(arch="llama", heads=None, seed=0, **over):
    m = tiny_model(arch, seed=seed, **over)
    plan = same_heads_plan(m, heads)
    compressor.apply(m, plan)
    return m, plan


def greedy(model, ids, steps, cache):
    """Greedy decoding by hand: the cache object carries the sequence."""
    seq, out = ids, model(ids, cache=cache, use_cache=True)
    for _ in range(steps):
        tok = out.logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, tok], 1)
        out = model(tok, cache=out.past_key_values, use_cache=True)
    return seq


# -- §1 spans are never narrowed by the prompt length ---------------------------------------------------------
@pytest.mark.parametrize("prompt", [1, 5, 20])
@pytest.mark.parametrize("cache_kind", ["plan", "dynamic"])
def test_short_prompt_decodes_like_dense_within_every_span(prompt, cache_kind):
    m, _ = patched(heads=[SinkWindowPattern(sink=4, alpha=64)] * 2)
    dense = tiny_model("llama")
    ids = torch.randint(4, 90, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    kw = {"cache": PlanCache(m)} if cache_kind == "plan" else {}
    with torch.no_grad():
        got = m.generate(ids, max_new_tokens=40, min_new_tokens=40, **GEN, **kw)
        want = dense.generate(ids, max_new_tokens=40, min_new_tokens=40, **GEN)
    assert torch.equal(got, want)


@pytest.mark.parametrize("chunks", [(40, 60), (7, 93), (1, 99), (33, 33, 34)])
@pytest.mark.parametrize("cache_kind", ["plan", "dynamic"])
def test_chunked_prefill_equals_one_shot(chunks, cache_kind):
    m, _ = patched(heads=[SinkWindowPattern(sink=4, alpha=16), SinkWindowPattern(sink=0, alpha=9)])
    ids = torch.randint(4, 90, (1, 100), generator=torch.Generator().manual_seed(1))
    from transformers import DynamicCache

    with torch.no_grad():
        one_shot = m(ids).logits[0]
        cache = PlanCache(m) if cache_kind == "plan" else DynamicCache(config=m.config)
        outs, s = [], 0
        for c in chunks:
            outs.append(m(ids[:, s : s + c], cache=cache, use_cache=True).logits[0])
            s += c
    assert (torch.cat(outs) - one_shot).abs().max() < 1e-4


def test_chunked_prefill_with_growing_spans_takes_the_declared_prompt_length():
    """beta > 0: N0 is the first forward's length unless ``compress_n0`` declares the whole prompt."""
    m, plan = patched(heads=[SinkWindowPattern(sink=2, alpha=4, beta=0.25), SinkWindowPattern(sink=0, alpha=6, beta=0.1)])
    ids = torch.randint(4, 90, (1, 80), generator=torch.Generator().manual_seed(2))
    want = oracle_logits(m, plan, ids, n0=80)[0]
    with torch.no_grad():
        cache, outs = PlanCache(m), []
        for s, c in ((0, 30), (30, 50)):
            outs.append(m(ids[:, s : s + c], cache=cache, use_cache=True, compress_n0=80).logits[0])
    assert (torch.cat(outs) - want).abs().max() < 1e-4


def test_plan_show_prints_the_span_that_runs(tmp_path):
    from typer.testing import CliRunner

    from compressor.cli import app
    from plans.io import save_plan

    m = tiny_model("llama")
    d = tmp_path / "m"
    m.save_pretrained(d)
    plan = same_heads_plan(m, [SinkWindowPattern(sink=4, alpha=256)] * 2)
    save_plan(plan, tmp_path / "p.json")
    r = CliRunner().invoke(app, ["plan", "show", str(tmp_path / "p.json"), "--n", "37"])
    assert r.exit_code == 0, r.output
    assert "256" in r.output


# -- MoA import decodes like MoA's run time -----------------------------------------------------------------
def moa_cache_size(alpha: float, beta: float, n0: int) -> int:
    """MoA's run-time cache size, written as in its code: C = ceil(max(min(int(a + b N'), N'), 128) / 64) * 64."""
    n_prime = n0 + 1024
    return math.ceil(max(min(int(alpha + beta * n_prime), n_prime), 128) / 64) * 64


@pytest.mark.parametrize("cache_kind", ["plan", "dynamic"])
def test_moa_import_decodes_like_moa_run_time(cache_kind):
    m = tiny_model("llama", max_position_embeddings=1024)
    ident = identity_from_config(m.config)
    # per query head (MoA's MHA expansion); cache sizes 128, 192, 256 and 128 at N0 = 150
    alphas = [[100.0, 150.0, 200.0, 10.0], [200.0, 10.0, 100.0, 150.0]]
    betas = [[0.0, 0.0, 0.0, 0.1], [0.0, 0.1, 0.0, 0.0]]
    plan = from_moa({"alphas": alphas, "betas": betas}, ident)
    compressor.apply(m, plan)
    n0, steps = 150, 70
    caps = {(li, h): moa_cache_size(alphas[li][h], betas[li][h], n0) for li in range(2) for h in range(4)}
    assert sorted(set(caps.values())) == [128, 192, 256]

    def moa_rule(layer, q_head, _n0):  # MoA: 64 sink tokens; nothing evicted before C tokens, then sink + last C-64
        return 64, caps[(layer, q_head)] - 64

    ids = torch.randint(4, 90, (1, n0), generator=torch.Generator().manual_seed(3))
    want = oracle_greedy(m, plan, ids, steps, n0=n0, head_rule_fn=moa_rule)
    kw = {"cache": PlanCache(m)} if cache_kind == "plan" else {}
    with torch.no_grad():
        got = m.generate(ids, max_new_tokens=steps, min_new_tokens=steps, **GEN, **kw)
    assert torch.equal(got, want)


# -- §2 the state of one sequence lives with that sequence ---------------------------------------------------
@pytest.mark.parametrize("cache_kind", ["plan", "dynamic", "static"])
def test_interleaved_sequences_equal_each_alone(cache_kind):
    from transformers import DynamicCache, StaticCache

    m, _ = patched(heads=[SinkWindowPattern(sink=2, alpha=6, beta=0.25), SinkWindowPattern(sink=1, alpha=4, beta=0.5)])
    a = torch.randint(4, 90, (1, 24), generator=torch.Generator().manual_seed(4))
    b = torch.randint(4, 90, (1, 61), generator=torch.Generator().manual_seed(5))

    def new_cache():
        if cache_kind == "plan":
            return PlanCache(m)
        if cache_kind == "static":
            return StaticCache(config=m.config, max_cache_len=128)
        return DynamicCache(config=m.config)

    with torch.no_grad():
        alone = [greedy(m, x, 15, new_cache()) for x in (a, b)]
        caches, seqs, outs = [new_cache(), new_cache()], [a, b], [None, None]
        for i in range(2):
            outs[i] = m(seqs[i], cache=caches[i], use_cache=True)
        for _ in range(15):
            for i in range(2):
                tok = outs[i].logits[:, -1:].argmax(-1)
                seqs[i] = torch.cat([seqs[i], tok], 1)
                outs[i] = m(tok, cache=caches[i], use_cache=True)
    assert torch.equal(seqs[0], alone[0]) and torch.equal(seqs[1], alone[1])
    # and each alone is the uncached recomputation with N0 = its prompt length
    plan = compressor.plan_of(m)
    assert torch.equal(alone[1], oracle_greedy(m, plan, b, 15))


# -- §3 every mask and cache form stock sdpa accepts --------------------------------------------------------------
def packed_inputs():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(4, 90, (1, 40), generator=g), torch.randint(4, 90, (1, 24), generator=g)
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(40), torch.arange(24)])[None]
    blk = torch.zeros(64, 64, dtype=torch.bool)
    blk[:40, :40] = True
    blk[40:, 40:] = True
    return a, b, ids, pos, (blk & torch.ones(64, 64, dtype=torch.bool).tril())[None, None]


@pytest.mark.parametrize("form", ["bool", "float"])
def test_custom_4d_mask_all_dense_equals_stock(form):
    a, _, ids, pos, mask = packed_inputs()
    if form == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    stock = tiny_model("llama")
    m, _ = patched(heads=[DensePattern()] * 2)
    with torch.no_grad():
        want = stock(ids, attention_mask=mask, position_ids=pos).logits
        got = m(ids, attention_mask=mask, position_ids=pos).logits
        alone = stock(a).logits
    assert (got - want).abs().max() < 1e-5
    assert (got[0, :40] - alone[0]).abs().max() < 1e-5


def test_custom_4d_mask_sparse_plan_equals_reference_and_documents_alone():
    a, b, ids, pos, mask = packed_inputs()
    m, plan = patched(heads=[SinkWindowPattern(sink=2, alpha=8), SinkWindowPattern(sink=0, alpha=12)])
    want = oracle_logits(m, plan, ids, attention_mask=mask, position_ids=pos, pos=pos, n0=64)
    with torch.no_grad():
        got = m(ids, attention_mask=mask, position_ids=pos).logits
        alone_b = m(b).logits
    assert (got - want).abs().max() < 1e-4
    assert (got[0, 40:] - alone_b[0]).abs().max() < 1e-4  # positions restart: document B keeps its own sinks


def test_restarting_position_ids_all_dense_equals_stock():
    a, b, ids, pos, _ = packed_inputs()
    stock = tiny_model("llama")
    m, _ = patched(heads=[DensePattern()] * 2)
    with torch.no_grad():
        want = stock(ids, position_ids=pos, use_cache=False).logits
        got = m(ids, position_ids=pos, use_cache=False).logits
    assert (got - want).abs().max() < 1e-5


def padded_batch(side: str):
    g = torch.Generator().manual_seed(7)
    lens, n = [50, 33, 12], 50
    ids = torch.zeros(3, n, dtype=torch.long)
    am = torch.zeros(3, n, dtype=torch.long)
    for r, L in enumerate(lens):
        sl = slice(n - L, n) if side == "left" else slice(0, L)
        ids[r, sl] = torch.randint(4, 90, (L,), generator=g)
        am[r, sl] = 1
    return ids, am


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_all_dense_equals_stock_and_sparse_equals_reference(side):
    ids, am = padded_batch(side)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    real = am.bool()
    stock = tiny_model("llama")
    m, _ = patched(heads=[DensePattern()] * 2)
    with torch.no_grad():
        want = stock(ids, attention_mask=am, position_ids=pos).logits
        got = m(ids, attention_mask=am, position_ids=pos).logits
    assert (got - want)[real].abs().max() < 1e-5
    m, plan = patched(heads=[SinkWindowPattern(sink=3, alpha=7, beta=0.125), SinkWindowPattern(sink=0, alpha=10)])
    want = oracle_logits(m, plan, ids, attention_mask=am, position_ids=pos)
    with torch.no_grad():
        got = m(ids, attention_mask=am, position_ids=pos).logits
    assert (got - want)[real].abs().max() < 1e-4


def test_static_cache_all_dense_equals_stock_and_sparse_equals_dynamic():
    ids = torch.randint(4, 90, (1, 30), generator=torch.Generator().manual_seed(1))
    gk = dict(max_new_tokens=20, min_new_tokens=20, output_logits=True, return_dict_in_generate=True, **GEN)
    stock = tiny_model("llama")
    m, _ = patched(heads=[DensePattern()] * 2)
    with torch.no_grad():
        want = stock.generate(ids, **gk)
        st = m.generate(ids, cache_implementation="static", **gk)
    assert (torch.stack(st.logits) - torch.stack(want.logits)).abs().max() < 1e-5
    m, _ = patched(heads=[SinkWindowPattern(sink=2, alpha=9), SinkWindowPattern(sink=0, alpha=14)])
    with torch.no_grad():
        dyn = m.generate(ids, **gk)
        st = m.generate(ids, cache_implementation="static", **gk)
        pc = m.generate(ids, cache=PlanCache(m), **gk)
    assert torch.equal(st.sequences, dyn.sequences) and torch.equal(pc.sequences, dyn.sequences)
    assert (torch.stack(st.logits) - torch.stack(dyn.logits)).abs().max() < 1e-4


def test_sliding_window_cache_all_dense_equals_stock():
    ids = torch.randint(4, 90, (2, 30), generator=torch.Generator().manual_seed(1))
    gk = dict(max_new_tokens=20, min_new_tokens=20, output_logits=True, return_dict_in_generate=True, **GEN)
    stock = tiny_model("mistral")  # sliding_window=24: DynamicCache builds sliding-window layers
    m = tiny_model("mistral")
    compressor.apply(m, same_heads_plan(m, [DensePattern()]))
    with torch.no_grad():
        want = stock.generate(ids, attention_mask=torch.ones_like(ids), **gk)
        got = m.generate(ids, attention_mask=torch.ones_like(ids), **gk)
    assert (torch.stack(got.logits) - torch.stack(want.logits)).abs().max() < 1e-5


# -- §4 model features of the attention call ------------------------------------------------------------------
def _arch_model(arch: str):
    from transformers import (
        Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GemmaConfig, GemmaForCausalLM,
        GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(0)
    c = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, pad_token_id=0)
    if arch == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=16,
                                              attn_logit_softcapping=2.0, **c))
    if arch == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=16, **c))
    if arch == "gemma":
        return GemmaForCausalLM(GemmaConfig(num_key_value_heads=1, head_dim=16, **c))
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(num_key_value_heads=2, head_dim=16, **c))
    if arch == "phi3":
        return Phi3ForCausalLM(Phi3Config(num_key_value_heads=2, **c))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=512))
    if arch == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=512, pad_token_id=1,
                                        word_embed_proj_dim=64))
    return tiny_model(arch)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
                                  "gpt_neox", "gpt2", "opt"])
def test_all_dense_plan_equals_stock_eager(arch):
    m = _arch_model(arch).eval()
    with torch.no_grad():
        for layer in range(2):  # larger logits so soft-capping (Gemma2) matters
            for name, p in m.named_parameters():
                if f".{layer}." in name and ("q_proj.weight" in name or "k_proj.weight" in name):
                    p.mul_(4)
    m.set_attn_implementation("eager")
    ids = torch.randint(4, 90, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m(ids).logits
    ident = identity_from_config(m.config)
    plan = Plan(model=ident, layers=[LayerPlan(heads=[DensePattern()] * ident.num_kv_heads)] * ident.num_layers)
    compressor.apply(m, plan)
    with torch.no_grad():
        got = m(ids).logits
    assert (got - want).abs().max() < 1e-5


def test_gemma2_softcap_is_honoured_in_sparse_plans():
    m = _arch_model("gemma2").eval()
    ident = identity_from_config(m.config)
    plan = Plan(model=ident, layers=[LayerPlan(heads=[SinkWindowPattern(sink=2, alpha=9)] * 2)] * 2)
    compressor.apply(m, plan)
    ids = torch.randint(4, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    want = oracle_logits(m, plan, ids)
    with torch.no_grad():
        got = m(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_dropout_in_train_mode_is_honoured():
    stock = tiny_model("llama", attention_dropout=0.5)
    m, _ = patched(heads=[DensePattern()] * 2, attention_dropout=0.5)
    stock.train()
    m.train()
    ids = torch.randint(4, 90, (1, 30), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    want = stock(ids).logits
    torch.manual_seed(11)
    got = m(ids).logits
    torch.manual_seed(12)
    other = m(ids).logits
    assert (got - want).abs().max() < 1e-5
    assert (other - got).abs().max() > 1e-3  # dropout really applied


def test_attention_sinks_s_aux_follow_the_eager_definition():
    """gpt-oss style learned sinks: one extra logit per head in the softmax denominator."""
    from attention_kernels.options import ScoreOptions
    from attention_kernels.reference import reference_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 12, 8, generator=g) for _ in range(3))
    s_aux = torch.randn(4, generator=g)
    sink, span = torch.full((4,), 2), torch.full((4,), 5)
    got = reference_attention(q, k, v, sink, span, 0.3, score=ScoreOptions(s_aux=s_aux))
    i, j = torch.arange(12)[:, None], torch.arange(12)[None]
    ok = (j <= i) & ((j < 2) | (i - j < 3))
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~ok, -math.inf)
    s = torch.cat([s, s_aux[None, :, None, None].expand(1, 4, 12, 1)], -1)
    want = torch.softmax(s, -1)[..., :-1] @ v
    assert (got - want).abs().max() < 1e-5


@pytest.mark.slow
def test_padded_batch_memory_stays_within_twice_the_unpadded_batch():
    """No N x N tensor at inference: at N = 4096 a left- or right-padded batch's peak extra memory stays within 2x of
    the same batch without padding (before the fix, right padding took ~660 MiB against ~35 MiB)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).parent / "scripts" / "padded_memory_probe.py"

    def extra_mib(side):
        r = subprocess.run([sys.executable, str(probe), side, "4096"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return float(r.stdout.split()[-2])

    base = max(extra_mib("none"), 16.0)
    for side in ("left", "right"):
        assert extra_mib(side) <= 2 * base, side


@pytest.mark.parametrize("attr, value", [("attention_chunk_size", 16), ("use_bidirectional_attention", True),
                                         ("is_causal", False)])
def test_attention_features_a_plan_cannot_express_are_refused_by_name(attr, value):
    from plans.errors import CompressError

    m = tiny_model("llama")
    setattr(m.config, attr, value)
    with pytest.raises(CompressError, match=attr):
        compressor.apply(m, same_heads_plan(m, [DensePattern()] * 2))
