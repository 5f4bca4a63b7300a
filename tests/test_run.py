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
            "--sources", f"{DATA},passkey", "--sinks", "8", "--block", "16", "--json"]
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
