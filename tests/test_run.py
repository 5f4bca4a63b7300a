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
    for f in ("profile.json", "profile.safetensors", "plans/0.5.json", "model/config.json", "model/plan.json",
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
