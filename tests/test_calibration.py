"""Calibration sets: building, determinism, QA with a (stub and tiny) model, the on-disk cache."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from plans.errors import CompressError
from profilers.data import calibration
from profilers.data.calibration import (
    CalibrationRecipe,
    build_calibration,
    get_or_build_calibration,
    load_calibration,
    save_calibration,
)
from tests.test_synthetic import make_tokenizer

DATA = Path(__file__).parent / "data" / "pride_and_prejudice_ch1-12.txt"
CORPUS = str(DATA)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


def _recipe(**kw):
    base = dict(sources=[CORPUS, "passkey", "lines"], lengths=[512, 1024], samples_per_length=3, seed=1,
                model="tiny-test")
    base.update(kw)
    return CalibrationRecipe(**base)


def _same(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert len(a[n]) == len(b[n])
        for x, y in zip(a[n], b[n]):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
            assert x.answer == y.answer


def test_build_lengths_masks_sources(tok):
    out = build_calibration(tok, _recipe(), progress=False)
    assert sorted(out) == [512, 1024]
    for n, samples in out.items():
        assert [s.meta["source"] for s in samples] == [CORPUS, "passkey", "lines"]
        for s in samples:
            assert s.length == n and s.input_ids.dtype == torch.long
            assert not bool(s.loss_mask[0]) and int(s.loss_mask.sum()) > 0
        text, pk, lines = samples
        assert int(text.loss_mask.sum()) == n // 4 and text.loss_mask[-1]
        assert text.input_ids[0] == tok.bos_token_id
        assert tok.decode(pk.input_ids[pk.loss_mask].tolist()).strip() == pk.answer
        assert tok.decode(lines.input_ids[lines.loss_mask].tolist()) == lines.answer


def test_same_seed_same_samples(tok):
    a = build_calibration(tok, _recipe(), progress=False)
    b = build_calibration(tok, _recipe(), progress=False)
    _same(a, b)
    c = build_calibration(tok, _recipe(seed=2), progress=False)
    assert not torch.equal(a[512][0].input_ids, c[512][0].input_ids)
    # a sample depends on (seed, N, i, source) only: adding a length leaves the others unchanged
    d = build_calibration(tok, _recipe(lengths=[512, 700, 1024]), progress=False)
    _same(a, {n: d[n] for n in (512, 1024)})


def test_depths_are_stratified(tok):
    out = build_calibration(tok, _recipe(sources=["passkey"], lengths=[400], samples_per_length=4), progress=False)
    depths = [s.meta["depth"] for s in out[400]]
    for k, d in enumerate(depths):
        assert k / 4 <= d <= (k + 1) / 4


def test_calibration_text_comes_from_the_calibration_split(tok):
    from profilers.data.corpora import split_corpus
    held = split_corpus([DATA.read_text()], 0.2).heldout[0]
    out = build_calibration(tok, _recipe(sources=[CORPUS], lengths=[512], samples_per_length=6), progress=False)
    for s in out[512]:
        text = tok.decode(s.input_ids[1:].tolist())
        assert text[20:120] not in held


def test_qa_skipped_without_model(tok):
    with pytest.warns(UserWarning, match="'qa'"):
        out = build_calibration(tok, _recipe(sources=[CORPUS, "qa"], samples_per_length=2), progress=False)
    assert all(s.meta["source"] == CORPUS for ss in out.values() for s in ss)
    with pytest.raises(CompressError, match="no calibration sources"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_calibration(tok, _recipe(sources=["qa"]), progress=False)


class StubModel(torch.nn.Module):
    """Greedy 'answers' of fixed tokens, then EOS after ``stop`` of them (records the prompts it saw)."""

    def __init__(self, answer_ids, eos_id, stop):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answer_ids, self.stop, self.prompts = answer_ids, stop, []
        self.generation_config = type("G", (), {"eos_token_id": eos_id})()

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, **kw):
        self.prompts.append(input_ids[0].tolist())
        new = (self.answer_ids[:self.stop] + [self.generation_config.eos_token_id] + [0] * max_new_tokens)
        return torch.cat([input_ids, torch.tensor([new[:max_new_tokens]])], dim=1)


@pytest.mark.parametrize("stop", [3, 20])
def test_qa_with_stub_model_keeps_exact_length(tok, stop):
    answer_ids = tok("Mr. Bingley is a single man of large fortune; four or five thousand a year.",
                     add_special_tokens=False)["input_ids"]
    assert len(answer_ids) > 12
    model = StubModel(answer_ids, tok.eos_token_id, stop)
    recipe = _recipe(sources=["qa"], lengths=[300, 600], samples_per_length=4, haystack=CORPUS,
                     qa_max_new_tokens=12)
    out = build_calibration(tok, recipe, model=model, progress=False)
    for n, samples in out.items():
        for s in samples:
            assert s.length == n
            target = s.input_ids[s.loss_mask].tolist()
            expect = (answer_ids[:stop] + [tok.eos_token_id])[:12]
            assert target == expect
            assert s.loss_mask[-len(target):].all() and int(s.loss_mask.sum()) == len(target)
            assert s.meta["context_shift"] == 12 - len(target)
            assert s.meta["question"] in tok.decode(s.input_ids.tolist())
    assert len({s.meta["question"] for s in out[300]}) == 4  # the questions cycle
    # the prompt given to the model is the sample's prompt except for the context extension
    s, prompt = out[300][0], model.prompts[0]
    assert len(prompt) == 300 - 12
    if s.meta["about"] == "end":
        assert s.input_ids[:s.meta["prompt_len"]].tolist()[-20:] == prompt[-20:]


def test_qa_with_a_tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    recipe = _recipe(sources=["qa"], lengths=[200], samples_per_length=2, haystack=CORPUS, qa_max_new_tokens=6)
    a = build_calibration(tok, recipe, model=model, progress=False)
    b = build_calibration(tok, recipe, model=model, progress=False)
    _same(a, b)
    for s in a[200]:
        assert s.length == 200 and 1 <= int(s.loss_mask.sum()) <= 6
        assert s.meta["task"] == "qa"


def test_too_short_corpus_error(tok, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(DATA.read_text()[:3000])
    with pytest.raises(CompressError, match=r"small.txt.*too short for calibration length 4096.*characters"):
        build_calibration(tok, _recipe(sources=[str(small)], lengths=[4096]), progress=False)
    with pytest.raises(CompressError, match=r"too short for calibration length 4096"):
        build_calibration(tok, _recipe(sources=["passkey"], lengths=[4096], haystack=str(small)), progress=False)


def test_save_load_round_trip(tok, tmp_path):
    recipe = _recipe()
    out = build_calibration(tok, recipe, progress=False)
    path = save_calibration(tmp_path / "cal", out, recipe, {"tokenizer_fingerprint": "x"})
    assert sorted(p.name for p in path.iterdir()) == ["calibration.json", "samples.safetensors"]
    assert b"pickle" not in (path / "samples.safetensors").read_bytes()[:200]
    loaded = load_calibration(path)
    _same(out, loaded.samples)
    assert loaded.recipe == recipe and loaded.info["recipe_hash"] == recipe.recipe_hash()
    for n in out:
        for x, y in zip(out[n], loaded.samples[n]):
            assert json.loads(json.dumps(x.meta)) == y.meta
    with pytest.raises(CompressError, match="not a calibration folder"):
        load_calibration(tmp_path / "nope")


def test_get_or_build_caches_and_rebuilds(tok, tmp_path, monkeypatch):
    calls = []
    real = calibration.build_calibration

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(calibration, "build_calibration", counting)
    r1 = _recipe(lengths=[512], samples_per_length=2)
    a = get_or_build_calibration(tmp_path, tok, r1, progress=False)
    b = get_or_build_calibration(tmp_path, tok, r1, progress=False)
    assert len(calls) == 1
    _same(a, b)
    r2 = _recipe(lengths=[512], samples_per_length=2, seed=5)  # recipe change: rebuilt
    c = get_or_build_calibration(tmp_path, tok, r2, progress=False)
    assert len(calls) == 2 and not torch.equal(a[512][0].input_ids, c[512][0].input_ids)
    get_or_build_calibration(tmp_path, tok, r1, progress=False)  # the first one is still cached
    assert len(calls) == 2
    get_or_build_calibration(tmp_path, make_tokenizer(chat=False), r1, progress=False)  # other tokenizer
    assert len(calls) == 3
    # qa skipped for lack of a model -> rebuilt once a model is given
    r3 = _recipe(sources=[CORPUS, "qa"], lengths=[512], samples_per_length=2, haystack=CORPUS, qa_max_new_tokens=4)
    with pytest.warns(UserWarning):
        get_or_build_calibration(tmp_path, tok, r3, progress=False)
    model = StubModel([5, 6, 7], tok.eos_token_id, 2)
    out = get_or_build_calibration(tmp_path, tok, r3, model=model, progress=False)
    assert len(calls) == 5 and out[512][1].meta["source"] == "qa"
    get_or_build_calibration(tmp_path, tok, r3, model=model, progress=False)
    assert len(calls) == 5


def test_recipe_validation_and_hash():
    r = CalibrationRecipe()
    assert r.sources == ["austen", "passkey", "lines", "qa"] and r.haystack_corpus == "austen"
    assert CalibrationRecipe(lengths=[2048, 1024, 1024]).lengths == [1024, 2048]
    assert CalibrationRecipe(seed=1).recipe_hash() != r.recipe_hash()
    assert CalibrationRecipe().recipe_hash() == r.recipe_hash()
    assert CalibrationRecipe(sources=["wikipedia", "passkey"]).haystack_corpus == "wikipedia"
    with pytest.raises(ValueError):
        CalibrationRecipe(lengths=[0])
    with pytest.raises(ValueError):
        CalibrationRecipe(sources=[])
    with pytest.raises(ValueError):
        CalibrationRecipe(bogus=1)
