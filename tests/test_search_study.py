"""The Optuna study around the MILP: SQLite storage, resume, evaluate hook, constraint, files."""

import csv

import optuna
import pytest

from plans.errors import CompressError
from plans.io import load_plan
from search_space.search import SearchArgs, search
from tests.test_search_e2e import GRID
from tests.test_search_synthetic import make_profile


def test_study_sqlite_resume_and_files(tmp_path):
    prof = make_profile()
    r = search(prof, "density=0.5", SearchArgs(trials=3, grid=GRID, time_limit=10, seed=0), out_dir=tmp_path)
    db = tmp_path / "optuna.db"
    assert db.exists()
    st = optuna.load_study(study_name="compress-search", storage=f"sqlite:///{db}")
    assert len(st.trials) == 3
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    for t in complete:
        assert t.params["K"] in (1, 2, 3, 4) and t.params["sink"] in (32, 64)
        assert t.params["granularity"] in ("kv_head", "query_head")
        assert "scale:density@512" in t.params and "weight@1024" in t.params
    # files
    rows = list(csv.DictReader(open(tmp_path / "pareto.csv")))
    assert rows and {"trial", "loss", "latency", "density@512", "density@1024", "K", "sink", "granularity"} <= set(rows[0])
    chosen = [row for row in rows if row["chosen"] == "1"]
    assert len(chosen) == 1 and int(chosen[0]["trial"]) == r.study.chosen_trial
    assert float(chosen[0]["loss"]) == min(float(row["loss"]) for row in rows)  # lowest loss on the front
    for name in ("pareto.png", "spans.png"):
        assert (tmp_path / name).stat().st_size > 1000
    plan = load_plan(tmp_path / "plan.json")
    assert plan == r.plan and plan.source == "search"
    for n in (512, 1024):
        assert plan.density(n) <= 0.5 + 1e-9
    # without resume the stored study is not silently reused
    with pytest.raises(CompressError, match="--resume"):
        search(prof, "density=0.5", SearchArgs(trials=1, grid=GRID), out_dir=tmp_path)
    # resume adds trials to the same study
    r2 = search(prof, "density=0.5", SearchArgs(trials=2, grid=GRID, time_limit=10, seed=0, resume=True), out_dir=tmp_path)
    assert len(optuna.load_study(study_name="compress-search", storage=f"sqlite:///{db}").trials) == 5
    assert len(r2.study.study.trials) == 5
    # a resumed study must keep its budgets
    with pytest.raises(CompressError, match="was run with budgets"):
        search(prof, "density=0.4", SearchArgs(trials=1, grid=GRID, resume=True), out_dir=tmp_path)


def test_study_evaluate_hook_and_latency_constraint(tmp_path):
    prof = make_profile()
    seen = []

    def evaluate(plan):
        seen.append(plan)
        # pretend latency is proportional to density at 1024: 100 ms dense
        return {"loss": sum(plan.predicted.loss.values()), "latency_ms": 100 * plan.density(1024)}

    from search_space.costs import LatencyTable

    table = LatencyTable(device="test", dtype="float32", head_dim=16, entries={1024: {32: 0.1, 1024: 100 / 16}})
    r = search(prof, ["density=0.6", "latency@1024<=45ms"], SearchArgs(trials=3, latency_table=table, grid=GRID, time_limit=10, seed=1, storage=f"sqlite:///{tmp_path}/s.db", study_name="hook"), evaluate=evaluate)
    assert len(seen) >= 1
    assert r.plan.predicted.validation["latency_ms"] <= 45
    assert all(row.feasible == (row.latency <= 45) for row in r.study.rows)
    with pytest.raises(CompressError, match="must return a dict with loss and latency_ms"):
        search(prof, "density=0.6", SearchArgs(trials=1, grid=GRID), evaluate=lambda p: {"loss": 1.0})
