"""`compress bench`: throughput at a KV memory budget and the whole-model fraction of ideal.

Expected values are computed here independently: dense KV bytes from the model geometry, Amdahl's bound by hand.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from compressor.bench import attention_share, ideal_model_speedup, throughput
from compressor.cli import app
from plans.identity import identity_from_config
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern
from tests.conftest import tiny_model

runner = CliRunner()


def test_ideal_speedup_is_amdahls_bound():
    assert ideal_model_speedup(0.5, 0.25) == pytest.approx(1 / (0.5 + 0.125))
    assert ideal_model_speedup(0.0, 0.1) == 1.0 and ideal_model_speedup(1.0, 0.25) == pytest.approx(4.0)
    assert attention_share(30.0, 120.0) == 0.25 and attention_share(None, 5.0) is None
    assert attention_share(130.0, 120.0) == 1.0


def _plan(model) -> Plan:
    ident = identity_from_config(model.config)
    return Plan(model=ident, granularity="kv_head",
                layers=[LayerPlan(heads=[DensePattern(), SinkWindowPattern(sink=2, alpha=16)])
                        for _ in range(ident.num_layers)])


def test_throughput_batch_is_the_largest_that_fits_the_budget():
    model = tiny_model("llama")
    ident = identity_from_config(model.config)
    n, steps = 200, 3
    dense_per_seq = 2 * ident.num_layers * ident.num_kv_heads * (n + 2 * steps) * ident.head_dim * 4  # K+V fp32
    budget = int(3.5 * dense_per_seq)
    with torch.no_grad():
        rows = throughput(model, _plan(model), [n], budget, max_batch=64, decode_steps=steps)
    by = {r.method: r for r in rows}
    assert set(by) == {"dense", "plan", "uniform"}
    assert by["dense"].kv_bytes_per_seq == dense_per_seq and by["dense"].batch == 3
    for r in rows:  # every batch is the largest that fits: one more sequence would not
        assert r.batch * r.kv_bytes_per_seq <= budget < (r.batch + 1) * r.kv_bytes_per_seq
        assert r.tok_s and r.tok_s > 0 and r.step_ms > 0
    # the plan keeps one KV head whole and one at 16 slots: about half the dense bytes, so a larger batch
    assert by["plan"].kv_bytes_per_seq < 0.6 * dense_per_seq and by["plan"].batch >= 5
    assert by["plan"].ratios["batch_vs_dense"] == by["plan"].batch / 3
    with pytest.raises(ValueError, match="positive KV budget"):
        throughput(model, _plan(model), [n], 0)


def test_bench_cli_throughput_and_bad_budget(tiny_model_dir, tmp_path):
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--density", "0.3", "--lengths", "128",
                            "--throughput", "--kv-budget", "0.001", "--max-batch", "4", "--decode-steps", "2", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout[r.stdout.index("{"):])["throughput"]
    assert [x["method"] for x in rows] == ["dense", "plan", "uniform"] and all(x["batch"] <= 4 for x in rows)
    bad = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--lengths", "128", "--throughput",
                              "--kv-budget", "0"])
    assert bad.exit_code == 2 and "--kv-budget" in bad.output


def _check_amdahl(res: list[dict], share: str, measured: tuple[str, str], density: str, speedup: str,
                  ideal_key: str, fraction: str) -> None:
    """The dense row's share a = attention ms / step ms (clipped to 1); every row's ideal 1/((1-a)+a*density)
    and the fraction of it reached."""
    dense = next(x for x in res if x["method"] == "dense")
    a = dense["ratios"][share]
    assert 0 < a <= 1 and a == pytest.approx(min(1.0, dense[measured[0]] / dense[measured[1]]))
    for x in res:
        ideal = 1 / ((1 - a) + a * x[density])
        assert x["ratios"][ideal_key] == pytest.approx(ideal)
        assert x["ratios"][fraction] == pytest.approx(x["ratios"][speedup] / ideal)


def test_bench_reports_the_fractions_of_ideal(tiny_model_dir):
    """Prefill: a = dense attention / dense whole-model prefill, at the prefill density. Decode: a = dense decode
    attention (every layer over an N-slot cache) / dense decode step, at the KV density."""
    r = runner.invoke(app, ["bench", "--model", str(tiny_model_dir), "--density", "0.3", "--lengths", "256",
                            "--repeats", "1", "--decode-steps", "3", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout[r.stdout.index("{"):])["results"]
    _check_amdahl(res, "attention_share", ("attn_prefill_ms", "model_prefill_ms"), "density",
                  "model_prefill_speedup", "ideal_model_speedup", "fraction_of_ideal")
    _check_amdahl(res, "decode_attention_share", ("attn_decode_ms", "decode_step_ms"), "kv_density",
                  "decode_step_speedup", "ideal_decode_speedup", "decode_fraction_of_ideal")
