"""End to end: search() on a hand-built synthetic profile -> a valid plan that meets its budgets."""

import json

import numpy as np
import pytest

from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.io import load_plan
from plans.schema import DensePattern
from search_space.candidates import block_grid
from search_space.costs import LatencyTable
from search_space.problem import build_problem
from search_space.search import SearchArgs, search
from tests.test_search_synthetic import head_kind, make_profile

GRID = block_grid([512, 1024], block=32, sinks=(32, 64), alpha_step=128, betas=(0, 0.25, 0.5, 0.75, 1))


def _span(plan, layer, head, n):
    p = plan.layers[layer].heads[head]
    return n if isinstance(p, DensePattern) else p.span(n)


@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_search_emits_valid_plan_within_budget(tmp_path, granularity):
    prof = make_profile()
    r = search(prof, ["density=0.5", "density@1024=0.4"], SearchArgs(granularity=granularity, K=2, grid=GRID, time_limit=20), out_dir=tmp_path)
    plan = r.plan
    assert plan.source == "search" and plan.granularity == granularity
    assert plan.model == prof.meta.model
    assert plan.lengths == [512, 1024]
    assert plan.density(512) <= 0.5 + 1e-9 and plan.density(1024) <= 0.4 + 1e-9
    assert plan.density(512) >= 0.9 * 0.5 - 1e-9  # MoA's lower bound: the budget is used
    assert plan.predicted.density[1024] == pytest.approx(plan.density(1024), abs=1e-6)
    assert set(plan.predicted.loss) == {512, 1024} and plan.predicted.solver["status"] in ("optimal", "feasible")
    assert plan.predicted.solver["K"] == 2
    for layer in plan.layers:
        assert len({h.model_dump_json() for h in layer.heads}) <= 2
    # long-range heads get wider spans than local ones
    hp = plan.heads_per_layer
    kinds = [head_kind(l, h if granularity == "query_head" else 2 * h) for l in range(4) for h in range(hp)]
    spans = [_span(plan, l, h, 1024) for l in range(4) for h in range(hp)]
    long_ = np.mean([s for s, k in zip(spans, kinds) if k == "long"])
    local = np.mean([s for s, k in zip(spans, kinds) if k == "local"])
    assert long_ > 2 * local
    # files: the plan round-trips, the heatmap exists
    assert load_plan(tmp_path / "plan.json") == plan
    assert (tmp_path / "spans.png").stat().st_size > 1000
    # predicted losses agree with the profile: a wider plan loses less
    wide = search(prof, "density=0.9", SearchArgs(granularity=granularity, K=2, grid=GRID, time_limit=20))
    assert sum(wide.plan.predicted.loss.values()) < sum(plan.predicted.loss.values())


def test_search_kv_density_and_latency_budgets():
    prof = make_profile()
    table = LatencyTable(device="test", dtype="float32", head_dim=16,
                         entries={512: {32: 0.1, 512: 1.0}, 1024: {32: 0.2, 1024: 4.0}})
    dense_ms = 4.0 * 16  # 16 query heads at N=1024
    r = search(prof, ["kv_density=0.6", f"latency@1024<={0.5 * dense_ms}ms"], SearchArgs(granularity="query_head", K=2, grid=GRID, latency_table=table, time_limit=20))
    plan = r.plan
    assert plan.kv_density(512) <= 0.6 + 1e-9 and plan.kv_density(1024) <= 0.6 + 1e-9
    assert plan.predicted.latency_ms[1024] <= 0.5 * dense_ms + 1e-6
    with pytest.raises(CompressError, match="latency table"):
        search(prof, "latency@1024<=10ms", SearchArgs(grid=GRID))


def test_infeasible_budget_and_bad_inputs():
    prof = make_profile()
    with pytest.raises(CompressError, match=r"density@1024=0.01 at N=1024 is infeasible: .* costs 0\.2343 but the budget allows 0\.01"):
        search(prof, "density@1024=0.01", SearchArgs(grid=GRID))
    with pytest.raises(CompressError, match="accepted forms"):
        search(prof, "densty=0.5", SearchArgs(grid=GRID))
    with pytest.raises(CompressError, match="sink 16 was not profiled"):
        search(prof, "0.5", SearchArgs(sinks=[16], grid=GRID))
    with pytest.raises(CompressError, match="no budget"):
        search(prof, [], SearchArgs(grid=GRID))


def test_profile_model_mismatch():
    prof = make_profile()
    other = ModelIdentity(model_type="llama", num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16)
    with pytest.raises(CompressError, match="profile was made for num_layers=4, but the model has num_layers=6"):
        search(prof, "0.5", SearchArgs(grid=GRID), model=other)
    same = prof.meta.model.model_copy()
    assert search(prof, "0.5", SearchArgs(grid=GRID, K=1), model=same).plan.model == prof.meta.model


def test_search_from_saved_profile_and_extra_length(tmp_path):
    from profilers.profile_format import save_profile

    prof = make_profile()
    save_profile(prof, tmp_path / "profile")
    r = search(tmp_path / "profile", "density@2048=0.3", SearchArgs(lengths=[512, 1024], K=2, solver="greedy"))
    assert r.plan.lengths == [512, 1024, 2048]
    assert r.plan.density(2048) <= 0.3 + 1e-9
    assert r.solver.solver == "greedy"
    assert set(r.plan.predicted.loss) == {512, 1024}  # losses only where profiled
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["lengths"] == [512, 1024]


def test_build_problem_losses_match_profile():
    prof = make_profile()
    pb = build_problem(prof, "0.5", granularity="kv_head", grid=GRID, sinks=[32])
    c = next(i for i, c in enumerate(pb.candidates) if c.kind != "dense")
    cand = pb.candidates[c]
    span = cand.span(1024)
    expect = prof.masked_loss(1024, 32, span - 32, "kv").reshape(-1).numpy()
    assert np.allclose(pb.loss[1024][:, c], expect)
    assert (pb.loss[1024][:, 0] == 0).all()  # dense loses nothing
    assert pb.layer_of_head.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
