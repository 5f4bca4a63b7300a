"""Plan schema, JSON I/O, importers and the `compress plan` / `compress apply` CLI on tiny models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

import compressor
from compressor.cli import app
from plans.errors import CompressError
from plans.identity import identity_from_config
from plans.atomic import write_text_atomic
from plans.importers import from_duo, from_moa
from plans.io import SCHEMA_PATH, load_plan, plan_json_schema, save_plan
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern, span_for_density, uniform_plan
from plans.span import decode_density, kept_entries, prefill_density, span_at, split_span, visibility_mask
from tests.conftest import tiny_model

runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path):
    m = tiny_model("llama")
    d = tmp_path / "tiny-llama"
    m.save_pretrained(d)
    return d


def test_span_semantics():
    assert span_at(64, 0.25, 1024, block=64) == 320
    assert span_at(-1024, 1.0, 4096) == 3072
    assert span_at(10, 0, 5) == 10  # never capped by N: a short prompt decodes densely up to the span
    assert span_at(0, 0.1, 100, min_span=128) == 128
    assert kept_entries(10, 5) == 15 and decode_density(10, 5) == 1.0  # accounting uses min(S, N)
    assert split_span(10, 64) == (9, 1)  # a sink larger than the span keeps the query itself
    m = visibility_mask(6, 6, torch.tensor([1]), torch.tensor([3]))[0]
    assert m.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]
    assert kept_entries(3, 6) == int(m.sum())
    for d in (0.1, 0.25, 0.5, 0.9):
        s = span_for_density(d, 4096)
        assert prefill_density(s, 4096) >= d > prefill_density(s - 1, 4096)


def test_shipped_schema_is_current():
    """plans/plan.schema.json matches the Plan model. After changing the model, regenerate the file with
    ``COMPRESS_WRITE_SCHEMA=1 python -m pytest tests/test_plans.py -k shipped_schema`` (the same text as
    ``compress plan schema``)."""
    if os.environ.get("COMPRESS_WRITE_SCHEMA") == "1":
        write_text_atomic(SCHEMA_PATH, json.dumps(plan_json_schema(), indent=2) + "\n")
    assert json.loads(SCHEMA_PATH.read_text()) == plan_json_schema()


def test_plan_round_trip_and_errors(tmp_path):
    ident = identity_from_config(tiny_model("llama").config)
    p = uniform_plan(ident, 100, sink=4, lengths=[512])
    path = save_plan(p, tmp_path / "p.json")
    assert load_plan(path) == p
    data = json.loads(path.read_text())

    def bad(mutate, match):
        d = json.loads(json.dumps(data))
        mutate(d)
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(CompressError, match=match):
            load_plan(tmp_path / "bad.json")

    bad(lambda d: d["layers"].pop(), "layers")
    bad(lambda d: d["layers"][0]["heads"].pop(), r"layers\[0\] has 1 heads")
    bad(lambda d: d["layers"][1]["heads"][0].update(kind="diagonal"), "layers.1.heads.0")
    bad(lambda d: d["layers"][0]["heads"][0].update(alpha=-5.0, beta=0.0), "negative span")
    bad(lambda d: d.update(format_version=99), "newer than this tool")
    (tmp_path / "nj.json").write_text("{not json")
    with pytest.raises(CompressError, match="not a JSON file"):
        load_plan(tmp_path / "nj.json")
    with pytest.raises(CompressError, match="not found"):
        load_plan(tmp_path / "missing.json")


def test_plan_for_another_model_is_refused(tiny_llama):
    other = tiny_model("llama", num_hidden_layers=3)
    plan = uniform_plan(identity_from_config(other.config), 8)
    with pytest.raises(CompressError, match="num_layers=3"):
        compressor.apply(tiny_llama, plan)


def to_moa(plan: Plan) -> dict:
    """Plan -> MoA alphas/betas (per query head; dense heads become alpha=0, beta=1): the test's inverse of
    :func:`plans.importers.from_moa`."""
    alphas, betas = [], []
    for li in range(plan.model.num_layers):
        ra, rb = [], []
        for h in range(plan.model.num_heads):
            p = plan.pattern(li, h)
            ra.append(0.0 if isinstance(p, DensePattern) else p.alpha)
            rb.append(1.0 if isinstance(p, DensePattern) else p.beta)
        alphas.append(ra)
        betas.append(rb)
    return {"alphas": alphas, "betas": betas}


def test_moa_import_semantics_and_apply(tiny_llama):
    ident = identity_from_config(tiny_llama.config)
    data = {"alphas": [[0, 1024, -1024, 0]] * 2, "betas": [[0.5, 0.0, 1.0, 0.125]] * 2}
    plan = from_moa(data, ident)
    assert plan.granularity == "query_head" and plan.length_offset == 1024
    # MoA run time at N = 3000: N' = 4024; cache = ceil(max(min(int(a + b N'), N'), 128) / 64) * 64, capped at N
    n = 3000
    moa = []
    for a, b in zip(data["alphas"][0], data["betas"][0]):
        npr = n + 1024
        cache = -(-max(min(int(a + b * npr), npr), 128) // 64) * 64
        moa.append(min(cache, n))
    assert [min(int(s), n) for s in plan.spans(0, n)] == moa
    assert to_moa(plan) == {k: [[float(x) for x in r] for r in v] for k, v in data.items()}
    compressor.apply(tiny_llama, plan)
    assert torch.isfinite(tiny_llama(torch.randint(1, 90, (1, 300))).logits).all()


def test_duo_import(tiny_llama):
    ident = identity_from_config(tiny_llama.config)
    plan = from_duo([[0.9, 0.1], [0.2, 0.7]], ident, threshold=0.5, sink=4, recent=16)
    assert isinstance(plan.layers[0].heads[0], DensePattern)
    assert plan.layers[0].heads[1].span(1000) == 20
    with pytest.raises(CompressError, match="expected 2 heads"):
        from_duo([[0.9], [0.2]], ident)


def test_cli_plan_commands(model_dir, tmp_path):
    out = tmp_path / "u.json"
    r = runner.invoke(app, ["plan", "uniform", "--model", str(model_dir), "--density", "0.25", "--length", "1024",
                            "--sink", "8", "--out", str(out)])
    assert r.exit_code == 0, r.output
    p = load_plan(out)
    assert abs(p.density(1024) - 0.25) < 0.01
    r = runner.invoke(app, ["plan", "show", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["n"] == 1024
    moa = tmp_path / "moa.json"
    moa.write_text(json.dumps({"alphas": [[0, 0, 0, 0]] * 2, "betas": [[0.5] * 4] * 2}))
    r = runner.invoke(app, ["plan", "import", str(moa), "--model", str(model_dir), "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["plan", "uniform", "--model", str(model_dir), "--out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "exactly one of" in r.output


def test_cli_apply_round_trip_and_bad_inputs(model_dir, tmp_path):
    plan = tmp_path / "p.json"
    save_plan(Plan(model=identity_from_config(tiny_model("llama").config),
                   layers=[LayerPlan(heads=[SinkWindowPattern(sink=2, alpha=8, beta=0.25), DensePattern()])] * 2), plan)
    out = tmp_path / "patched"
    tok_free = runner.invoke(app, ["apply", str(plan), "--model", str(model_dir), "--out", str(out)])
    # the tiny model has no tokenizer: a clear error and nothing half-written
    assert tok_free.exit_code == 2 and "tokenizer" in tok_free.output and not out.exists()

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(plan.read_text()), "layers": []}))
    r = runner.invoke(app, ["apply", str(bad), "--model", str(model_dir), "--out", str(out)])
    assert r.exit_code == 2 and "layers" in r.output and not out.exists()
    r = runner.invoke(app, ["apply", str(plan), "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code == 2 and "not found" in r.output and not out.exists()


def test_model_outside_attention_interface_is_refused():
    from transformers import BloomConfig, BloomForCausalLM

    # Bloom (transformers 5.25) still computes attention in its own module; Falcon moved to AttentionInterface
    m = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=32, n_head=4, n_layer=1))
    plan = uniform_plan(identity_from_config(m.config), 8)
    with pytest.raises(CompressError, match="bloom"):
        compressor.apply(m, plan)
