"""Run-time semantics, third pass (issue 22 §1-6): the stock transformers paths — a folder loaded with
``from_pretrained``, ``pipeline()``, ``generate`` with the default cache or none, cache re-indexing, every mask
shape, ``output_attentions`` — give what the plan's rule gives, or are refused by name.

Expected values come from the explicit fp64-free oracle in ``tests/runtime_oracle.py`` (uncached recomputation,
each row's own N0), from the stock model (all-dense plans) or from stock eager attention."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache, pipeline

import compressor
from compressor import CompressError, PlanCache
from compressor.models import save_patched
from plans.schema import DensePattern, SinkWindowPattern
from tests.conftest import tiny_model, tiny_model_with_tokenizer
from tests.runtime_oracle import oracle_greedy, oracle_logits
from tests.test_runtime_semantics import same_heads_plan

GEN = dict(do_sample=False, pad_token_id=0)
GROWING = [SinkWindowPattern(sink=2, alpha=6, beta=0.1), SinkWindowPattern(sink=1, alpha=4, beta=0.25)]


def patched(heads=GROWING, seed=0, arch="llama"):
    m = tiny_model(arch, seed=seed)
    m.generation_config.eos_token_id = None  # greedy to the end, as the oracle's greedy loop
    plan = same_heads_plan(m, heads)
    compressor.apply(m, plan)
    return m, plan


def prompt(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(4, 90, (1, n), generator=torch.Generator().manual_seed(seed))


# -- §1 a patched folder through the stock loading and generation paths ---------------------------------------
@pytest.mark.parametrize("saved_by", ["save_pretrained", "compress_apply"])
def test_folder_generates_with_the_default_cache_like_the_oracle(tmp_path, saved_by):
    m, plan = patched()
    if saved_by == "save_pretrained":
        m.save_pretrained(tmp_path / "f")
    else:
        from tests.test_synthetic import make_tokenizer

        save_patched(m, make_tokenizer(), plan, tmp_path / "f")
    folder = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
    assert folder.config._attn_implementation == "compress"
    ids = prompt(30)
    with torch.no_grad():
        got = folder.generate(ids, max_new_tokens=25, min_new_tokens=25, **GEN)  # default DynamicCache
        with_plan_cache = folder.generate(ids, max_new_tokens=25, min_new_tokens=25, cache=PlanCache(folder), **GEN)
    want = oracle_greedy(tiny_model(seed=0), plan, ids, 25)  # N0 = 30 fixed, uncached recomputation
    assert torch.equal(got, want)
    assert torch.equal(with_plan_cache, want)


def test_folder_saved_again_after_loading_still_loads_patched(tmp_path):
    m, _ = patched()
    m.save_pretrained(tmp_path / "a")
    AutoModelForCausalLM.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b").config._attn_implementation == "compress"
    compressor.unapply(m)
    m.save_pretrained(tmp_path / "c")  # unapplied: the folder loads stock
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "c").config._attn_implementation != "compress"


def test_pipeline_on_a_folder_gives_the_plan_cache_tokens(tmp_path):
    m, tok = tiny_model_with_tokenizer("llama")
    plan = same_heads_plan(m, GROWING)
    compressor.apply(m, plan)
    save_patched(m, tok, plan, tmp_path / "f")
    text = "the quick brown fox jumps over the lazy dog and then " * 3
    gen = pipeline("text-generation", model=str(tmp_path / "f"), device="cpu")
    out = gen(text, max_new_tokens=20, min_new_tokens=20, do_sample=False, return_full_text=False,
              pad_token_id=tok.pad_token_id or 0)[0]["generated_text"]
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = m.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, cache=PlanCache(m),
                         pad_token_id=tok.pad_token_id or 0)
    assert out == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


# -- §2 N0 in every generate mode ------------------------------------------------------------------------------
def test_generate_without_cache_keeps_the_prompt_n0():
    m, plan = patched()
    ids = prompt(40, seed=5)
    with torch.no_grad():
        uncached = m.generate(ids, max_new_tokens=20, min_new_tokens=20, use_cache=False, **GEN)
        cached = m.generate(ids, max_new_tokens=20, min_new_tokens=20, **GEN)
    want = oracle_greedy(tiny_model(seed=0), plan, ids, 20)
    assert torch.equal(uncached, want)
    assert torch.equal(cached, want)


@pytest.mark.parametrize("use_cache", [False, True])
def test_generate_takes_a_declared_compress_n0(use_cache):
    m, plan = patched()
    ids = prompt(40, seed=6)
    with torch.no_grad():
        got = m.generate(ids, max_new_tokens=12, min_new_tokens=12, use_cache=use_cache, compress_n0=90, **GEN)
    assert torch.equal(got, oracle_greedy(tiny_model(seed=0), plan, ids, 12, n0=90))
    assert not torch.equal(got, oracle_greedy(tiny_model(seed=0), plan, ids, 12))  # N0 matters for this plan


def test_generate_without_cache_with_beams_equals_the_cached_run():
    m, _ = patched()
    ids = prompt(30, seed=8)
    kw = dict(max_new_tokens=10, min_new_tokens=10, num_beams=3, num_return_sequences=2, **GEN)
    with torch.no_grad():
        assert torch.equal(m.generate(ids, use_cache=False, **kw), m.generate(ids, **kw))


# -- §3 a PlanCache needs a model that runs a plan --------------------------------------------------------------
def test_plan_cache_on_a_model_without_a_plan_is_refused():
    with pytest.raises(CompressError, match="PlanCache needs a model that runs a plan"):
        PlanCache(tiny_model())


def test_plan_cache_used_after_unapply_is_refused_not_garbage():
    m, _ = patched()
    cache = PlanCache(m)
    compressor.unapply(m)
    with torch.no_grad(), pytest.raises(CompressError, match="does not run the plan"):
        m.generate(prompt(20), max_new_tokens=3, cache=cache, **GEN)


# -- §4 packed documents through restarting position_ids ---------------------------------------------------------
def test_packed_documents_keep_their_own_sinks_without_a_mask():
    m, plan = patched(heads=[SinkWindowPattern(sink=4, alpha=12), SinkWindowPattern(sink=2, alpha=8)])
    with torch.no_grad():  # sharpen the attention so losing a sink shows
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(3)
    a, b = prompt(40, seed=1), prompt(30, seed=2)
    ids, pos = torch.cat([a, b], 1), torch.cat([torch.arange(40), torch.arange(30)])[None]
    with torch.no_grad():
        packed = m(ids, position_ids=pos, use_cache=False).logits[0]
    stock = copy.deepcopy(m)
    compressor.unapply(stock)
    assert (packed[40:] - oracle_logits(stock, plan, b)[0]).abs().max() < 1e-4
    assert (packed[:40] - oracle_logits(stock, plan, a)[0]).abs().max() < 1e-4


# -- §5a re-indexing a cache keeps each row's N0 with its row ---------------------------------------------------
def _padded(rows: list[torch.Tensor]):
    n = max(r.shape[1] for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - r.shape[1]:], mask[i, n - r.shape[1]:] = r[0], 1
    return ids, mask


OPS = {  # operation -> (argument, which of the rows (a, b) each resulting row is)
    "reorder_cache": (torch.tensor([1, 0]), [1, 0]),
    "batch_select_indices": (torch.tensor([1]), [1]),
    "batch_repeat_interleave": (2, [0, 0, 1, 1]),
}


def _make_cache(kind, model):
    if kind == "plan":
        return PlanCache(model)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=64)
    return DynamicCache(config=model.config)


@pytest.mark.parametrize("kind,op", [("dynamic", o) for o in OPS] + [("plan", o) for o in OPS]
                         + [("static", "reorder_cache")])
def test_cache_reindexing_keeps_each_rows_prompt_length(kind, op):
    m, plan = patched()
    rows = [prompt(35, seed=11), prompt(23, seed=12)]  # N0 35 / 23: one token more moves the growing spans
    ids, mask = _padded(rows)
    cache = _make_cache(kind, m)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    arg, which = OPS[op]
    steps = torch.randint(4, 90, (len(which), 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        m(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        getattr(cache, op)(arg)
        mask, pos = mask[which], pos[which]
        got = []
        for t in range(steps.shape[1]):
            mask = torch.cat([mask, torch.ones(len(which), 1, dtype=torch.long)], 1)
            pos = torch.cat([pos, pos[:, -1:] + 1], 1)
            out = m(steps[:, t : t + 1], attention_mask=mask, position_ids=pos[:, -1:], cache=cache, use_cache=True)
            got.append(out.logits[:, -1])
    stock = copy.deepcopy(m)
    compressor.unapply(stock)
    for r, src in enumerate(which):
        seq = torch.cat([rows[src], steps[r : r + 1]], 1)
        want = oracle_logits(stock, plan, seq, n0=rows[src].shape[1])[0, -steps.shape[1]:]
        assert (torch.stack([g[r] for g in got]) - want).abs().max() < 1e-4, (kind, op, r)


def test_a_deep_copied_cache_reindexes_its_own_rows():
    m, _ = patched()
    ids, mask = _padded([prompt(36, seed=11), prompt(20, seed=12)])
    cache = DynamicCache(config=m.config)
    with torch.no_grad():
        m(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache)
    twin = copy.deepcopy(cache)
    twin.reorder_cache(torch.tensor([1, 0]))
    assert cache.compress_sequence.n0.tolist() == [36, 20]
    assert twin.compress_sequence.n0.tolist() == [20, 36]


# -- §5b every 4D mask shape stock sdpa accepts, honoured or refused by name ------------------------------------
def _block_mask(n=40, split=24):
    blk = torch.zeros(n, n, dtype=torch.bool)
    blk[:split, :split] = True
    blk[split:, split:] = True
    return (blk & torch.ones(n, n, dtype=torch.bool).tril())[None, None]


@pytest.mark.parametrize("form", ["bool_b1", "bool_heads", "float_inf", "float_min", "broadcast_batch"])
def test_every_4d_mask_form_of_stock_sdpa_is_honoured(form):
    ids = torch.cat([prompt(40, seed=1), prompt(40, seed=2)])
    mask = _block_mask()
    if form == "bool_b1":
        mask = mask.expand(2, 1, 40, 40)
    elif form == "bool_heads":
        mask = mask.expand(2, 4, 40, 40)
    elif form == "float_inf":
        mask = torch.zeros(2, 1, 40, 40).masked_fill(~mask, float("-inf"))
    elif form == "float_min":
        mask = torch.zeros(2, 1, 40, 40).masked_fill(~mask, torch.finfo(torch.float32).min)
    stock = tiny_model()
    m, _ = patched(heads=[DensePattern()] * 2)
    with torch.no_grad():
        want = stock(ids, attention_mask=mask).logits
        got = m(ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("form,match", [("per_head", "differs between heads"), ("bias", "finite biases"),
                                        ("rank3", "a mask of shape"), ("int", "dtype")])
def test_mask_forms_a_plan_cannot_honour_are_refused_by_name(form, match):
    ids = prompt(40)
    mask = _block_mask()
    if form == "per_head":
        mask = torch.cat([mask, mask.tril(-3), mask, mask], 1)
    elif form == "bias":
        mask = torch.zeros(1, 1, 40, 40).masked_fill(~mask, float("-inf")) + 0.5 * mask
    elif form == "rank3":
        mask = mask[0]
    else:
        mask = mask.long()
    m, _ = patched()
    with torch.no_grad(), pytest.raises(CompressError, match=match):
        m(ids, attention_mask=mask)


# -- §6 output_attentions --------------------------------------------------------------------------------------
def test_output_attentions_of_an_all_dense_plan_equal_stock_eager():
    ids = prompt(24)
    stock = tiny_model()
    stock.set_attn_implementation("eager")
    m, _ = patched(heads=[DensePattern()] * 2)
    with torch.no_grad():
        want = stock(ids, output_attentions=True).attentions
        got = m(ids, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    assert all((g - w).abs().max() < 1e-5 for g, w in zip(got, want))


def test_output_attentions_of_a_sparse_plan_follow_the_span_rule():
    m, _ = patched(heads=[SinkWindowPattern(sink=2, alpha=6), DensePattern()])
    with torch.no_grad():
        att = m(prompt(24), output_attentions=True).attentions
    i, j = torch.arange(24)[:, None], torch.arange(24)[None]
    rule = (j <= i) & ((j < 2) | (i - j < 4))  # S = 6, sink 2, window 4 — the README rule written out
    assert len(att) == 2
    for a in att:
        assert a.shape == (1, 4, 24, 24)
        assert torch.allclose(a.sum(-1), torch.ones(1, 4, 24))
        assert bool((a[0, :2][:, ~rule] == 0).all()) and bool((a[0, :2][:, rule] > 0).all())  # KV head 0: sparse
        assert bool((a[0, 2:][:, ~(j <= i)] == 0).all()) and bool((a[0, 2:][:, j <= i] > 0).all())  # dense


def test_output_attentions_with_a_plan_cache_past_is_refused_by_name():
    m, _ = patched()
    cache = PlanCache(m)
    with torch.no_grad():
        m(prompt(20), cache=cache)
        with pytest.raises(CompressError, match="output_attentions"):
            m(prompt(1), cache=cache, output_attentions=True)


# -- one way to switch a plan on and off around a measurement ---------------------------------------------------
def test_plan_applied_restores_the_models_own_implementation_and_plan():
    from compressor.patching import plan_applied

    m = tiny_model()
    m.set_attn_implementation("eager")
    plan = same_heads_plan(m, GROWING)
    ids = prompt(20)
    with torch.no_grad():
        stock = m(ids).logits
        with plan_applied(m, plan):
            assert m.config._attn_implementation == "compress"
            planned = m(ids).logits
        assert m.config._attn_implementation == "eager" and getattr(m.config, "compress_plan", None) is None
        assert torch.equal(m(ids).logits, stock)
        compressor.apply(m, plan)
        with pytest.raises(RuntimeError), plan_applied(m, None):  # restored on an error too
            assert m.config._attn_implementation == "eager"
            assert (m(ids).logits - stock).abs().max() < 1e-5
            raise RuntimeError
        assert m.config._attn_implementation == "compress"
        assert torch.equal(m(ids).logits, planned)
        compressor.unapply(m)  # back to the implementation apply replaced, not a hard-coded one
        assert m.config._attn_implementation == "eager"


# -- a 4D mask that hides pads: pads are pads (N0, positions), prefill and decode ----------------------------------
def _left_padded():
    ids = torch.randint(4, 90, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :8] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("form", ["bool", "bool_heads", "float"])
def test_a_4d_mask_hiding_left_pads_equals_the_padding_mask_and_the_oracle(form):
    m, plan = patched()
    ids, mask, pos = _left_padded()
    m4 = torch.ones(30, 30, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    if form == "bool_heads":
        m4 = m4.expand(2, 4, 30, 30)
    elif form == "float":
        m4 = torch.zeros(m4.shape).masked_fill(~m4, float("-inf"))
    with torch.no_grad():
        got = m(ids, attention_mask=m4, position_ids=pos).logits
    want = oracle_logits(tiny_model(seed=0), plan, ids[1:, 8:])[0]  # the padded row alone, N0 = its 22 real tokens
    assert (got[1, 8:] - want).abs().max() < 1e-4
    assert (got[0] - oracle_logits(tiny_model(seed=0), plan, ids[:1])[0]).abs().max() < 1e-4


def test_a_decode_step_with_a_4d_mask_equals_the_padding_mask():
    m, _ = patched()
    ids, mask, pos = _left_padded()
    tok, step_mask = torch.tensor([[7], [9]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    out = []
    with torch.no_grad():
        for am in (step_mask, step_mask.bool()[:, None, None, :]):
            cache = DynamicCache(config=m.config)
            m(ids, attention_mask=mask, position_ids=pos, cache=cache)
            out.append(m(tok, attention_mask=am, position_ids=pos[:, -1:] + 1, cache=cache).logits[:, -1])
        assert (out[0] - out[1]).abs().max() < 1e-5
        cache = PlanCache(m)
        m(ids, attention_mask=mask, position_ids=pos, cache=cache)
        with pytest.raises(CompressError, match="custom 4D attention mask cannot be combined with PlanCache"):
            m(tok, attention_mask=step_mask.bool()[:, None, None, :], position_ids=pos[:, -1:] + 1, cache=cache)


def test_a_2d_mask_of_another_batch_is_refused_by_name():
    m, _ = patched()
    with torch.no_grad(), pytest.raises(CompressError, match=r"a mask of shape \(30, 30\) for a batch of 2"):
        m(torch.randint(4, 90, (2, 30)), attention_mask=torch.ones(30, 30, dtype=torch.bool).tril())


def test_assisted_decoding_runs_with_the_default_cache_and_refuses_a_plan_cache_by_name():
    m, plan = patched()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10] * 6])
    kw = dict(max_new_tokens=8, min_new_tokens=8, **GEN)
    with torch.no_grad():
        assert torch.equal(m.generate(ids, prompt_lookup_num_tokens=3, **kw), oracle_greedy(tiny_model(seed=0), plan, ids, 8))
        with pytest.raises(CompressError, match="PlanCache cannot"):
            m.generate(ids, cache=PlanCache(m), prompt_lookup_num_tokens=3, **kw)
