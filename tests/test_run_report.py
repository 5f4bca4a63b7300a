"""The report that ends `compress run`: speed / KV / accuracy / perplexity vs dense and vs the uniform window,
with Wilson intervals and McNemar p-values, on screen, in report.md / report.json, and as a PNG."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from compressor.evaluation import Cell, EvalReport
from compressor.run_report import build_report, markdown_section, print_report, report_png
from plans.identity import ModelIdentity
from plans.schema import uniform_plan

Z95 = 1.959963984540054


def wilson_by_formula(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval written out: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p, z2 = k / n, Z95 * Z95
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar_by_formula(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar: 2 · P(Binomial(d, 1/2) <= min(a_only, b_only)), capped at 1."""
    d = a_only + b_only
    if d == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(d, k) for k in range(min(a_only, b_only) + 1)) / 2 ** d)


IDENT = ModelIdentity(model_type="llama", num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)

# outcomes per (method, n, depth): the plan misses 3 items dense gets and gets 1 dense misses
OUTCOMES = {
    ("dense", 256, 0.5): [1, 1, 1, 1, 0], ("dense", 512, 0.5): [1, 1, 1, 0, 1],
    ("0.5", 256, 0.5): [1, 0, 1, 1, 1], ("0.5", 512, 0.5): [0, 0, 1, 0, 1],
    ("uniform", 256, 0.5): [0, 0, 0, 1, 0], ("uniform", 512, 0.5): [0, 0, 0, 0, 0],
}


def _evals() -> dict:
    acc = EvalReport(task="passkey", lengths=[256, 512], depths=[0.5], methods=["dense", "0.5", "uniform"])
    for (m, n, d), o in OUTCOMES.items():
        acc.cells.append(Cell(m, "passkey", n, d, correct=sum(o), total=len(o), loss_sum=1.0, tokens=5,
                              outcomes=[bool(x) for x in o]))
    ppl = EvalReport(task="ppl", lengths=[256, 512], depths=[], methods=["dense", "0.5", "uniform"])
    for m, loss in (("dense", 2.0), ("0.5", 2.1), ("uniform", 2.5)):
        for n in (256, 512):
            ppl.cells.append(Cell(m, "ppl", n, None, loss_sum=loss * n, tokens=n))
    # through the JSON a skipped stage is read back from
    return {"passkey": EvalReport.from_dict(json.loads(json.dumps(acc.to_dict()))),
            "ppl": EvalReport.from_dict(json.loads(json.dumps(ppl.to_dict())))}


BENCH = {"n": 512, "results": {"0.5": [
    {"method": "dense", "n": 512, "model_prefill_ms": 100.0, "decode_step_ms": 10.0, "kv_bytes": 1000},
    {"method": "plan", "n": 512, "model_prefill_ms": 50.0, "decode_step_ms": 8.0, "kv_bytes": 400},
    {"method": "uniform", "n": 512, "model_prefill_ms": 40.0, "decode_step_ms": 5.0, "kv_bytes": 300}]}}


def test_report_numbers_match_the_formulas(tmp_path):
    plans = {"0.5": uniform_plan(IDENT, 200, sink=8)}
    rep = build_report(plans, _evals(), BENCH)
    e = rep["budgets"]["0.5"]
    a = e["accuracy"]["passkey"]
    assert (a["dense"]["correct"], a["dense"]["n"]) == (8, 10) and (a["plan"]["correct"], a["plan"]["n"]) == (6, 10)
    for role in ("dense", "plan", "uniform"):
        assert a[role]["ci95"] == pytest.approx(wilson_by_formula(a[role]["correct"], a[role]["n"]), abs=1e-9)
        for n, by in a[role]["by_length"].items():
            assert by["ci95"] == pytest.approx(wilson_by_formula(by["correct"], 5), abs=1e-9)
    # paired over the same items: plan right & dense wrong once (256, item 4), dense right & plan wrong 3 times
    vd = a["plan_vs_dense"]
    assert (vd["a_only"], vd["b_only"], vd["n"]) == (1, 3, 10)
    assert vd["p_value"] == pytest.approx(mcnemar_by_formula(1, 3)) and vd["diff"] == pytest.approx(-0.2)
    vu = a["plan_vs_uniform"]
    assert (vu["a_only"], vu["b_only"]) == (5, 0) and vu["p_value"] == pytest.approx(mcnemar_by_formula(5, 0))
    # speed and memory from the same bench call; perplexity pooled over lengths
    sp = e["speed"]
    assert sp["plan"]["prefill_speedup"] == pytest.approx(2.0) and sp["plan"]["decode_speedup"] == pytest.approx(1.25)
    assert sp["plan"]["kv_fraction"] == pytest.approx(0.4) and sp["uniform"]["kv_fraction"] == pytest.approx(0.3)
    ppl = e["perplexity"]
    assert ppl["dense"] == pytest.approx(math.exp(2.0)) and ppl["plan_ratio"] == pytest.approx(math.exp(0.1))
    assert e["density"] == pytest.approx(plans["0.5"].density(512)) and e["at_n"] == 512
    # rendered: one rich table, markdown, PNG with dense / plan / uniform side by side
    buf = io.StringIO()
    print_report(rep, Console(file=buf, width=250))
    screen = buf.getvalue()
    assert "8/10 0.80" in screen and "6/10 0.60" in screen and f"{vd['p_value']:.3g}" in screen
    md = "\n".join(markdown_section(rep))
    assert "| dense |" in md and "| 0.5 |" in md and "| uniform |" in md and "plan vs uniform" in md
    png = tmp_path / "report.png"
    assert report_png(_evals(), plans, png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_outcomes_or_bench(tmp_path):
    """Eval files written before per-item outcomes, and no bench: intervals still, p-values and speed None."""
    evals = _evals()
    d = evals["passkey"].to_dict()
    for c in d["cells"]:
        del c["outcomes"]
    evals["passkey"] = EvalReport.from_dict(d)
    rep = build_report({"0.5": uniform_plan(IDENT, 200, sink=8)}, evals, None)
    a = rep["budgets"]["0.5"]["accuracy"]["passkey"]
    assert a["plan_vs_dense"]["p_value"] is None and a["plan"]["ci95"] == pytest.approx(wilson_by_formula(6, 10))
    assert rep["budgets"]["0.5"]["speed"] is None and rep["budgets"]["0.5"]["at_n"] == 512
    buf = io.StringIO()
    print_report(rep, Console(file=buf, width=250))
    assert "6/10" in buf.getvalue()


@pytest.mark.slow
def test_compress_run_writes_the_report(tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from compressor.cli import app
    from tests.test_synthetic import DATA

    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "--out", str(out), "--profile-lengths", "256",
            "--validate-length", "320", "--eval-lengths", "256,384", "--budget", "0.5", "--samples", "2",
            "--trials", "1", "--eval-tasks", "passkey,ppl", "--eval-depths", "0.25,0.75", "--eval-samples", "2",
            "--sources", f"{DATA},passkey", "--sinks", "8", "--block", "16", "--local-span", "64",
            "--retrieval-samples", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "compress run: plan vs dense vs the uniform window" in r.output  # the table on screen
    summary = json.loads((out / "report.json").read_text())
    rep = summary["report"]
    assert rep["bench_n"] == 384 and (out / "bench.json").exists()
    e = rep["budgets"]["0.5"]
    a = e["accuracy"]["passkey"]
    for role in ("dense", "plan", "uniform"):
        assert a[role]["n"] == 2 * 2 * 2  # lengths x depths x samples
        assert a[role]["ci95"] == pytest.approx(wilson_by_formula(a[role]["correct"], a[role]["n"]), abs=1e-9)
    for k in ("plan_vs_dense", "plan_vs_uniform"):
        assert 0.0 <= a[k]["p_value"] <= 1.0 and a[k]["n"] == 8
        assert a[k]["p_value"] == pytest.approx(mcnemar_by_formula(a[k]["a_only"], a[k]["b_only"]))
    for role in ("plan", "uniform"):
        sp = e["speed"][role]
        assert sp["prefill_speedup"] > 0 and sp["decode_speedup"] > 0 and 0 < sp["kv_fraction"] < 1
    assert e["perplexity"]["dense"] > 1 and e["perplexity"]["plan_ratio"] > 0
    assert summary["files"]["png"] == "report.png"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Summary" in md and "![accuracy" in md
