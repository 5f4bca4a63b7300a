"""compressor.fidelity: equal-cost baselines, cells, comparisons on a tiny model (expected values recomputed here)."""

from __future__ import annotations

import pytest
import torch

from compressor.evaluation import answer_score
from compressor.fidelity import FidelityGrid, methods_at, run_fidelity, uniform_matched
from plans.identity import identity_from_config
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern
from profilers.data import ruler
from tests.conftest import tiny_model_with_tokenizer


def mixed_plan(model) -> Plan:
    ident = identity_from_config(model.config)
    heads = [DensePattern(), SinkWindowPattern(sink=4, alpha=32)]
    return Plan(model=ident, layers=[LayerPlan(heads=heads) for _ in range(ident.num_layers)])


@pytest.mark.parametrize("n", [300, 1000])
def test_uniform_baselines_match_the_plan_on_their_axis(n):
    model, _ = tiny_model_with_tokenizer()
    plan = mixed_plan(model)
    pre, kv = uniform_matched(plan, n, "prefill_density"), uniform_matched(plan, n, "kv_density")
    span_pre = pre.layers[0].heads[0].span(n)
    # independent: prefill density of a uniform span s is (s(s+1)/2 + (n-s)s) / (n(n+1)/2); the smallest s >= target
    dens = lambda s: (s * (s + 1) / 2 + (n - s) * s) / (n * (n + 1) / 2)  # noqa: E731
    target = (1.0 + dens(32)) / 2  # half the KV heads dense, half span 32
    assert dens(span_pre) >= target - 1e-12 > dens(span_pre - 1)
    assert abs(kv.kv_density(n) - (1.0 + 32 / n) / 2) <= 1 / n
    assert pre.kv_density(n) < kv.kv_density(n)  # at equal prefill density the uniform window keeps fewer KV bytes


def test_run_fidelity_cells_and_paired_comparisons():
    model, tok = tiny_model_with_tokenizer(max_position_embeddings=2048)
    plan = mixed_plan(model)
    grid = FidelityGrid(tasks=("niah_single", "variable_tracking"), lengths=(320,), n_per_cell=3, style="plain")
    rep = run_fidelity(model, tok, {"p": plan}, grid, "tiny")
    names = [m.name for m in methods_at({"p": plan}, 320)]
    assert names == ["dense", "p", "uniform[p|prefill_density]", "uniform[p|kv_density]"]
    assert len(rep.cells) == 2 * len(names) and all(c.n == 3 for c in rep.cells)
    assert model.config._attn_implementation != "compress"  # restored
    # dense outcomes recomputed directly on the same items
    from compressor.fidelity import make_cell_items

    items = make_cell_items("niah_single", tok, 320, grid, "plain", ruler.NOISE)
    with torch.no_grad():
        want = [answer_score(model, ruler.to_sample(it, tok))[0] for it in items]
    assert rep.outcomes[("niah_single", 320, "dense")] == want
    rows = rep.to_dict()
    assert {r["axis"] for r in rows["comparisons"]} == {"prefill_density", "kv_density", "none"}
    assert all(0 <= r["p_value"] <= 1 for r in rows["comparisons"])
    assert all(r["ci95"][0] <= r["correct"] / r["n"] <= r["ci95"][1] for r in rows["cells"])


def test_checkpoint_resumes_measured_cells_and_refuses_another_grid(tmp_path):
    import json

    from plans.errors import CompressError

    model, tok = tiny_model_with_tokenizer(max_position_embeddings=2048)
    plan = mixed_plan(model)
    grid = FidelityGrid(tasks=("niah_single",), lengths=(320,), n_per_cell=2, style="plain")
    ck = tmp_path / "ck.json"
    first = run_fidelity(model, tok, {"p": plan}, grid, "tiny", checkpoint=ck)
    saved = json.loads(ck.read_text())
    assert saved["outcomes"]["niah_single|320|dense"] == [int(x) for x in first.outcomes[("niah_single", 320, "dense")]]
    # a resumed run takes the stored outcomes as measured: flip them and they come back flipped
    flipped = [1 - x for x in saved["outcomes"]["niah_single|320|p"]]
    saved["outcomes"]["niah_single|320|p"] = flipped
    ck.write_text(json.dumps(saved))
    again = run_fidelity(model, tok, {"p": plan}, grid, "tiny", checkpoint=ck)
    assert again.outcomes[("niah_single", 320, "p")] == [bool(x) for x in flipped]
    assert again.outcomes[("niah_single", 320, "dense")] == first.outcomes[("niah_single", 320, "dense")]
    with pytest.raises(CompressError, match="another grid"):
        run_fidelity(model, tok, {"p": plan}, FidelityGrid(tasks=("niah_single",), lengths=(320,), n_per_cell=3,
                                                            style="plain"), "tiny", checkpoint=ck)
