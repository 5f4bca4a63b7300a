"""`compress run` end to end on a tiny model (profile -> search -> apply -> eval), then a rerun that skips."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from compressor.cli import app
from tests.test_synthetic import DATA

runner = CliRunner()


@pytest.mark.slow
def test_compress_run_smoke_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--profile-lengths", "256,512",
            "--validate-length", "640", "--eval-lengths", "512", "--budget", "0.5", "--budget", "density@512=0.3",
            "--samples", "2", "--trials", "2", "--eval-tasks", "passkey,ppl", "--eval-depths", "0.5",
            "--sources", f"{DATA},passkey", "--sinks", "8", "--block", "16", "--plan-shape", "search", "--json"]
    r = runner.invoke(app, args + [])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    for f in ("profile.json", "profile.safetensors", "retrieval.json", "retrieval.safetensors", "plans/0.5.json",
              "model/config.json", "model/plan.json",
              "eval_passkey.json", "eval_passkey.png", "eval_ppl.json", "report.json", "report.md"):
        assert (out / f).exists(), f
    assert (out / "search_0.5" / "pareto.csv").exists()
    methods = {row["method"] for row in summary["eval"]["passkey"]}
    assert {"dense", "0.5", "uniform[0.5]"} <= methods
    assert summary["plans"]["0.5"]["density"]["512"] <= 0.5 + 1e-6 or summary["plans"]["0.5"]["density"][512] <= 0.5 + 1e-6
    # a rerun skips every stage
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout[r2.stdout.index("{"):])["stage_seconds"] == {}


def test_compress_run_default_keeps_retrieval_heads_dense(tiny_model_dir, tmp_path, monkeypatch):
    """The default plan shape: no influence profile; per budget the largest k whose top-k-dense + local-span plan
    meets the budget at the eval lengths (checked here by recomputing densities with k and k + 1)."""
    from plans.io import load_plan
    from plans.schema import DensePattern
    from profilers.retrieval import load_retrieval
    from search_space.keep_dense import keep_dense_plan

    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--profile-lengths", "256",
            "--validate-length", "320", "--eval-lengths", "512", "--budget", "density@512=0.6", "--eval-tasks", "ppl",
            "--eval-samples", "1", "--sinks", "8", "--local-span", "64", "--retrieval-samples", "2",
            "--bench-length", "0", "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert not (out / "profile.safetensors").exists()
    plan = load_plan(out / "plans" / "density_512_0.6.json")
    ranked = load_retrieval(out / "retrieval").top(4)
    k = sum(isinstance(h, DensePattern) for layer in plan.layers for h in layer.heads)
    assert plan.density(512) <= 0.6 + 1e-9
    assert all(isinstance(plan.layers[li].heads[h], DensePattern) for li, h in ranked[:k])
    if k < 4:
        assert keep_dense_plan(plan.model, ranked[:k + 1], 64, 8).density(512) > 0.6
    bad = runner.invoke(app, args[:-1] + ["--local-span", "512", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "lower --local-span" in bad.output


def test_cli_profile_search_and_gates_distill(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    common = ["--model", str(tiny_model_dir), "--lengths", "256", "--samples", "1", "--sources", f"{DATA},passkey",
              "--sinks", "8", "--block", "16"]
    r = runner.invoke(app, ["profile", "--out", str(tmp_path / "prof"), *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "--profile", str(tmp_path / "prof"), "--budget", "0.5", "--out",
                            str(tmp_path / "s"), "--model", str(tiny_model_dir), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout[r.stdout.index("{"):])
    assert info["status"] == "optimal" and info["density"]["256"] <= 0.5 + 1e-6
    r = runner.invoke(app, ["search", "--profile", str(tmp_path / "prof"), "--budget", "0.01", "--out", str(tmp_path / "s2")])
    assert r.exit_code == 2 and "infeasible" in r.output
    r = runner.invoke(app, ["search", "--profile", str(tmp_path / "prof"), "--budget", "half", "--out", str(tmp_path / "s3")])
    assert r.exit_code == 2
    # gates: a profile of learned per-head gates, same file format
    r = runner.invoke(app, ["profile", "--method", "gates", "--gate-steps", "3", "--gate-window", "32",
                            "--out", str(tmp_path / "gates"), *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["distill", str(tmp_path / "s" / "plan.json"), "--model", str(tiny_model_dir), "--out",
                            str(tmp_path / "d"), "--steps", "2", "--lengths", "256", "--samples", "1", "--sources",
                            f"{DATA},passkey"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "model" / "plan.json").exists()


def test_cli_bench_json_and_kernel_table(tiny_model_dir, tmp_path):
    table = tmp_path / "table.json"
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--density", "0.3", "--lengths", "192",
                            "--repeats", "1", "--kernel-table", str(table), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{"):])
    by = {x["method"]: x for x in data["results"]}
    assert set(by) == {"dense", "plan", "uniform"}
    assert by["plan"]["ratios"]["kv_bytes_fraction"] < 0.6  # bounded cache after the prompt
    assert by["dense"]["decode_step_ms"] > 0 and by["plan"]["attn_prefill_ms"] > 0
    from search_space.costs import LatencyTable

    t = LatencyTable.load(table)
    assert t.ms(192, 64) > 0
    assert set(t.operators) >= {"softmax", "sink_window", "relu_softmax", "linear"}  # cost entries per operator
    assert all(t.operators[op][192] > 0 for op in t.operators)


def test_search_keep_dense_shape_is_the_plan_compress_run_writes(tiny_model_dir, tmp_path, monkeypatch):
    """`compress profile --method retrieval` -> `compress search --plan-shape keep_dense` gives, layer for layer, the
    plan `compress run` writes from the same retrieval scores: one path from the commands to the plan."""
    from plans.io import load_plan

    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    run_out = tmp_path / "run"
    r = runner.invoke(app, ["run", "--model", str(tiny_model_dir), "--out", str(run_out), "--profile-lengths", "256",
                            "--validate-length", "320", "--eval-lengths", "512", "--budget", "density@512=0.6",
                            "--eval-tasks", "ppl", "--eval-samples", "1", "--sinks", "8", "--local-span", "64",
                            "--retrieval-samples", "2", "--bench-length", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["profile", "--method", "retrieval", "--model", str(tiny_model_dir), "--lengths", "256",
                            "--samples", "2", "--out", str(tmp_path / "ret")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["search", "--plan-shape", "keep_dense", "--retrieval", str(tmp_path / "ret"),
                            "--budget", "density@512=0.6", "--lengths", "512", "--local-span", "64", "--sinks", "8",
                            "--out", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    ours = load_plan(tmp_path / "s" / "plan.json")
    theirs = load_plan(run_out / "plans" / "density_512_0.6.json")
    assert ours.model_dump()["layers"] == theirs.model_dump()["layers"]
    assert any(h.kind == "dense" for layer in ours.layers for h in layer.heads)  # not vacuous: heads were kept


def test_keep_dense_refuses_scores_of_another_model_shape():
    import torch

    from compressor.args import PlanArgs
    from compressor.pipeline import make_plan
    from plans.errors import CompressError
    from plans.identity import ModelIdentity
    from profilers.retrieval import RetrievalScores
    from search_space.args import SearchArgs

    ident = ModelIdentity(model_type="llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    scores = RetrievalScores(scores=torch.rand(3, 2), halves=torch.rand(2, 3, 2), meta={})
    args = PlanArgs(budgets=("0.5",), shape="keep_dense", search=SearchArgs(lengths=(512,), sinks=(8,)), local_span=64)
    with pytest.raises(CompressError, match="3 x 2.*2 layers x 2 KV heads"):
        make_plan(args, retrieval=scores, ident=ident)
    ok = make_plan(args, retrieval=RetrievalScores(scores=torch.rand(2, 2), halves=torch.rand(2, 2, 2), meta={}),
                   ident=ident)
    assert ok.plan.density(512) <= 0.5 + 1e-9
