"""Past one machine: one Optuna study shared by several `compress search` workers (PostgreSQL, and SQLite on one
machine), data-parallel `compress profile` under torchrun (gloo), and models split across devices
(``--device-map``/``--max-memory``, disk offload)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from typer.testing import CliRunner

from compressor.args import CalibrationArgs, InfluenceArgs, ProfileArgs, args_to_json
from compressor.cli import app
from plans.io import load_plan
from search_space.storage import WORKER_ATTR, open_storage
from search_space.study import _choose, _collect_rows

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ, COMPRESS_HOME=str(tmp_path / "home"), COMPRESS_PROGRESS_INTERVAL="0", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _compress(args: list[str], tmp_path: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compressor.cli", *args], cwd=ROOT, env=_env(tmp_path, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        o, e = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, o, e


# -- search: many workers, one study ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_profiled(tmp_path_factory):
    """(model folder, profile stem): a tiny Llama with a tokenizer and its influence profile at 64 and 128."""
    from compressor.influence_profile import run_profile
    from compressor.models import load_model
    from tests.conftest import tiny_model_with_tokenizer
    from tests.test_profile_influence import make_sample

    d = tmp_path_factory.mktemp("scale_out")
    m, tok = tiny_model_with_tokenizer("llama", max_position_embeddings=8192)
    m.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    model, _ = load_model(d / "model")
    samples = {64: [make_sample(64, 32, seed=1)], 128: [make_sample(128, 64, seed=2)]}
    run_profile(model, samples, d / "profile", InfluenceArgs(block=16, sink_sizes=[4, 8], progress=False))
    return d / "model", d / "profile"


def _expected_plan(study) -> dict:
    """The plan of the best feasible trial of the whole study (lowest loss on the feasible Pareto front)."""
    rows = _collect_rows(study)
    _, chosen = _choose(rows, len(study.trials))
    return json.loads(study.trials[chosen.trial].user_attrs["plan"])


def _check_shared_study(study, n_total: int, plan_path: Path) -> None:
    trials = study.trials
    assert len(trials) == n_total  # no trial lost, none extra
    assert [t.number for t in trials] == list(range(n_total))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs[WORKER_ATTR] for t in trials}) == 2  # both workers ran trials
    draws = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(draws)) == n_total  # no trial run twice: every trial drew its own parameters
    # the plan written last (both workers write it, atomically) is the best feasible trial of the whole study
    assert load_plan(plan_path).model_dump() == _plan_dump(_expected_plan(study))


def _plan_dump(d: dict) -> dict:
    from plans.io import plan_from_dict

    return plan_from_dict(d, "expected").model_dump()


def _two_workers(args: list[str], tmp_path: Path, storage: str, study_name: str, proc=None) -> None:
    """Worker 1 in a subprocess (``proc``, default: `compress ARGS`); once it has started a trial, worker 2 in this
    process (`compress ARGS`)."""
    proc = proc or _compress(args, tmp_path)
    try:
        deadline = time.monotonic() + 300
        for_sqlite = storage[len("sqlite:///"):] if storage.startswith("sqlite:///") else None
        if for_sqlite:
            Path(for_sqlite).parent.mkdir(parents=True, exist_ok=True)
        opened = open_storage(storage, heartbeat=False)  # (SQLite: its tables are created under a file lock)
        while True:
            assert proc.poll() is None or proc.returncode == 0, proc.communicate()[1][-3000:]
            try:
                if optuna.load_study(study_name=study_name, storage=opened).trials:
                    break
            except KeyError:  # no such study yet
                pass
            assert time.monotonic() < deadline, "worker 1 never started a trial"
            time.sleep(0.3)
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
    finally:
        rc, _o, e = _finish(proc)
    assert rc == 0, e[-3000:]


def test_two_workers_share_one_postgres_study(pg_server, tiny_profiled, tmp_path):
    """`compress search --storage postgresql://… --study-name S --resume` in two processes at once."""
    model, profile = tiny_profiled
    url = pg_server.create_database("two_workers")
    out = tmp_path / "shared"
    args = ["search", "--profile", str(profile), "--budget", "0.5", "--trials", "3", "--storage", url,
            "--study-name", "S", "--resume", "--model", str(model), "--time-limit", "10", "--out", str(out)]
    _two_workers(args, tmp_path, url, "S")
    _check_shared_study(optuna.load_study(study_name="S", storage=url), 6, out / "plan.json")
    assert not (out / "optuna.db").exists()  # the study lives in PostgreSQL only
    # a worker resuming later (elsewhere) adds its trial to the same study and chooses from all of them
    later = [*args[:-1], str(tmp_path / "later")]
    later[later.index("--trials") + 1] = "1"
    r = runner.invoke(app, later + ["--json"])
    assert r.exit_code == 0, r.output
    study = optuna.load_study(study_name="S", storage=url)
    assert len(study.trials) == 7
    assert load_plan(tmp_path / "later" / "plan.json").model_dump() == _plan_dump(_expected_plan(study))


SEARCH_WORKER = """
import sys
from search_space.search import SearchArgs, search
search(sys.argv[1], "0.5", SearchArgs(trials=3, resume=True, time_limit=10), out_dir=sys.argv[2])
"""


def test_two_processes_share_one_sqlite_file(tiny_profiled, tmp_path):
    """The README's claim: processes on one machine may share one SQLite study file (here the default optuna.db
    of a shared --out folder, both writing plan.json there). Worker 1 calls the search API (what `compress search`
    runs, without importing transformers: a lighter process), worker 2 is `compress search`."""
    _, profile = tiny_profiled
    out = tmp_path / "shared"
    args = ["search", "--profile", str(profile), "--budget", "0.5", "--trials", "3", "--resume", "--out", str(out),
            "--time-limit", "10"]
    db = f"sqlite:///{out / 'optuna.db'}"
    proc = subprocess.Popen([sys.executable, "-c", SEARCH_WORKER, str(profile), str(out)], cwd=ROOT,
                            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _two_workers(args, tmp_path, db, "compress-search", proc)
    _check_shared_study(optuna.load_study(study_name="compress-search", storage=db), 6, out / "plan.json")


def test_workers_opening_a_fresh_database_at_once(pg_server):
    """Optuna creates its tables on first use; workers doing so at the same moment race (duplicate tables and types
    on PostgreSQL): open_storage retries, so every one of them opens the storage."""
    import threading

    url = pg_server.create_database("fresh")
    start, opened, errors = threading.Barrier(6), [], []

    def worker():
        start.wait()
        try:
            opened.append(open_storage(url))
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(opened) == 6
    assert optuna.study.get_all_study_names(opened[0]) == []


@pytest.mark.parametrize("url, message", [
    ("postgresql://nobody@127.0.0.1:1/none", "cannot be opened"),
    ("not a url", "is not a database URL"),
    ("mysql://u:secret@127.0.0.1:1/x", "no database driver for 'mysql'"),
    ("sqlite:////nonexistent-compress-dir/optuna.db", "cannot be opened"),
])
def test_bad_storage_is_a_clear_error(tiny_profiled, tmp_path, url, message):
    _, profile = tiny_profiled
    r = runner.invoke(app, ["search", "--profile", str(profile), "--budget", "0.5", "--trials", "1", "--storage", url,
                            "--resume", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "secret" not in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s" / "plan.json").exists()


# -- profile: data parallel under torchrun ------------------------------------------------------------------------
PROFILE_KW = dict(lengths=[128, 256], samples=3, sources=[str(ROOT / "tests/data/pride_and_prejudice_ch1-12.txt")],
                  sinks=[4, 8], block=16, seed=0)
PROFILE_ARGS = ProfileArgs(
    calibration=CalibrationArgs(lengths=tuple(PROFILE_KW["lengths"]), samples=PROFILE_KW["samples"],
                                sources=tuple(PROFILE_KW["sources"]), seed=PROFILE_KW["seed"]),
    influence=InfluenceArgs(block=PROFILE_KW["block"], sink_sizes=tuple(PROFILE_KW["sinks"])))


def _profile_args(out: Path, model: Path) -> list[str]:
    k = PROFILE_KW
    return ["profile", "--out", str(out), "--model", str(model), "--lengths", ",".join(map(str, k["lengths"])),
            "--samples", str(k["samples"]), "--sources", ",".join(k["sources"]), "--sinks",
            ",".join(map(str, k["sinks"])), "--block", str(k["block"]), "--seed", str(k["seed"])]


@pytest.fixture(scope="module")
def single_process_profile(tiny_profiled, tmp_path_factory):
    """(model folder, reference profile): `compress profile` in one process (COMPRESS_HOME set for the module, so
    the calibration set it builds is the one the workers load)."""
    from compressor.pipeline import profile

    model, _ = tiny_profiled
    d = tmp_path_factory.mktemp("dp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPRESS_HOME", str(d / "home"))
        mp.setenv("COMPRESS_PROGRESS_INTERVAL", "0")
        prof = profile(d / "single", str(model), PROFILE_ARGS)
        yield model, prof


def _assert_same_profile(a, b) -> None:
    assert a.meta.samples == b.meta.samples and a.meta.lengths == b.meta.lengths
    assert a.meta.extra["recipe"] == b.meta.extra["recipe"]  # same model, samples and settings
    assert set(a.tensors) == set(b.tensors)
    for k, x in a.tensors.items():
        y = b.tensors[k]
        assert x.shape == y.shape and x.dtype == y.dtype, k
        assert (x - y).abs().max() <= 1e-6 * x.abs().max(), k  # 1e-6 relative (in fact equal to float64 rounding)


def test_torchrun_profile_equals_single_process(single_process_profile, tmp_path):
    """`compress profile --workers 2` launches `torchrun --nproc-per-node 2 -m compressor.cli profile` (gloo):
    each rank profiles half the samples, the sums are all-reduced, rank 0 writes; the profile equals one process."""
    from profilers.profile_format import load_profile

    model, ref = single_process_profile
    out = tmp_path / "dp"
    r = runner.invoke(app, [*_profile_args(out, model), "--workers", "2"])
    assert r.exit_code == 0, r.output
    prof = load_profile(out)
    _assert_same_profile(ref, prof)
    assert prof.meta.extra["ranks"] == 2
    assert not Path(str(out) + ".partial.safetensors").exists()  # rank 0 removed its partial files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp.json", "dp.safetensors"]


def test_killed_rank_resumes_without_loss(single_process_profile, tmp_path):
    """Rank 1 of a 2-rank torchrun profile is SIGKILLed after its 2nd of 4 steps; rank 0's partial files hold whole
    steps only, and rerunning the command (here in one process: a rerun may use any number of ranks) ends with the
    single-process profile: no sample lost or counted twice."""
    from compressor.influence_profile import partial_paths
    from profilers.profile_format import load_profile

    model, ref = single_process_profile
    out = tmp_path / "dp"
    kw = {"out": str(out), "model": str(model), "args": args_to_json(PROFILE_ARGS)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests/scripts/profile_kill_rank.py"), "1", "2", json.dumps(kw)]
    killed = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path, COMPRESS_HOME=os.environ["COMPRESS_HOME"]),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr or "-9" in killed.stderr, killed.stderr[-3000:]
    st, js = partial_paths(out)
    assert st.exists() and not Path(str(out) + ".json").exists()  # partial progress only, no profile
    done = json.loads(js.read_text())["done"]
    assert 0 < sum(done.values()) < 6 and all(v in (0, 2, 3) for v in done.values())  # whole steps of 2 samples
    r = runner.invoke(app, _profile_args(out, model))
    assert r.exit_code == 0, r.output
    _assert_same_profile(ref, load_profile(out))
    assert not st.exists() and not js.exists()


def test_data_parallel_rank_resumes_rank0_partial(single_process_profile, tmp_path):
    """The data-parallel driver in this process (one gloo rank): it resumes from a partial file through rank 0's
    broadcast of the samples done and the sums, and ends with the single-process profile."""
    import torch.distributed as dist

    from compressor import distributed
    from compressor.pipeline import profile

    model, ref = single_process_profile

    class Stop(Exception):
        pass

    def stop_after_two(n, k):
        if (n, k) == (128, 2):
            raise Stop

    with pytest.raises(Stop):  # a single-process run stopped after 2 samples leaves the partial files
        profile(tmp_path / "p", str(model), PROFILE_ARGS, on_sample=stop_after_two)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            dp = distributed.DataParallel(rank=0, world=1, local_rank=0, backend="gloo", device=torch.device("cpu"))
            mp.setattr(distributed, "from_env", lambda: dp)
            prof = profile(tmp_path / "p", str(model), PROFILE_ARGS)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    _assert_same_profile(ref, prof)
    assert prof.meta.extra["ranks"] == 1


def test_bad_workers_is_a_clear_error(single_process_profile, tmp_path):
    model, _ = single_process_profile
    for extra, message in ((["--workers", "0"], "--workers must be >= 1"),
                           (["--workers", "2", "--method", "gates"], "is for --method influence"),
                           (["--max-memory", "cpu=lots"], "--max-memory size"),
                           (["--device-map", "{not json"], "not valid JSON")):
        r = runner.invoke(app, [*_profile_args(tmp_path / "p", model), *extra])
        assert r.exit_code == 2 and message in r.output, (extra, r.output)
        assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


# -- models split across devices -----------------------------------------------------------------------------------
SPLIT = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.norm": "cpu", "lm_head": "cpu"}


def test_model_split_across_cpu_and_disk_matches_one_piece(single_process_profile, tmp_path):
    """--device-map / --max-memory (accelerate, disk offload): the same logits (dense and patched) and the same
    profile as the model in one piece, through load_model and through the CLI (profile, apply, eval, bench)."""
    import torch
    from transformers import AutoModelForCausalLM

    from compressor.influence_profile import run_profile
    from compressor.models import load_model
    from compressor.patching import apply
    from compressor.placement import placement_kwargs
    from compressor.pipeline import make_uniform_plan
    from profilers.profile_format import load_profile
    from tests.test_profile_influence import make_sample

    model, ref = single_process_profile
    whole, _ = load_model(model)
    split, _ = load_model(model, **placement_kwargs(json.dumps(SPLIT), None, tmp_path / "offload"))
    auto, _ = load_model(model, **placement_kwargs(None, "cpu=500KB"))
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    assert set(auto.hf_device_map.values()) == {"cpu", "disk"}  # max_memory alone: device_map auto, offloaded
    ids = torch.randint(1, 90, (2, 96), generator=torch.Generator().manual_seed(0))
    plan = make_uniform_plan(str(model), span=32, length=96, sink=4)
    with torch.no_grad():
        dense = whole(ids).logits
        for m in (split, auto):
            assert torch.equal(m(ids).logits, dense)
        apply(whole, plan)
        patched = whole(ids).logits
        for m in (split, auto):
            apply(m, plan)
            assert torch.equal(m(ids).logits, patched)
    samples = {64: [make_sample(64, 32, seed=3), make_sample(64, 20, seed=4)]}
    profiles = [run_profile(m, samples, tmp_path / f"p{i}", InfluenceArgs(block=16, sink_sizes=[4], progress=False))
                for i, m in enumerate(load_model(model, **kw)[0] for kw in
                                      ({}, placement_kwargs(json.dumps(SPLIT), None, None)))]
    _assert_same_profile(*profiles)

    # the CLI: profile, apply, eval and bench with the model split
    r = runner.invoke(app, [*_profile_args(tmp_path / "split", model), "--max-memory", "cpu=500KB"])
    assert r.exit_code == 0, r.output
    _assert_same_profile(ref, load_profile(tmp_path / "split"))
    plan_path = tmp_path / "uniform.json"
    make_uniform_plan(str(model), span=32, length=96, sink=4, out=plan_path)
    for name, extra in (("whole", []), ("split", ["--device-map", json.dumps(SPLIT)])):
        r = runner.invoke(app, ["apply", str(plan_path), "--model", str(model), "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
    with torch.no_grad():
        a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / n)(ids).logits for n in ("whole", "split"))
    assert torch.equal(a, b)
    evals = []
    for extra in ([], ["--max-memory", "cpu=500KB"]):
        r = runner.invoke(app, ["eval", "--task", "ppl", "--plan", str(plan_path), "--model", str(model), "--lengths",
                                "128", "--samples", "1", "--corpus", PROFILE_KW["sources"][0], "--json", *extra])
        assert r.exit_code == 0, r.output
        evals.append(json.loads(r.stdout[r.stdout.index("{"):]))
    assert evals[0] == evals[1]
    r = runner.invoke(app, ["bench", "--model", str(model), "--plan", str(plan_path), "--lengths", "96", "--repeats",
                            "1", "--no-decode", "--json", "--device-map", json.dumps(SPLIT)])
    assert r.exit_code == 0, r.output
