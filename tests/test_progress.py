"""The one progress helper (profilers.progress): plain lines when stderr is not a TTY, a heartbeat during long
steps, and the long commands speaking through it (subprocess with stderr a pipe)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from profilers.progress import Progress, ProgressOutput, fmt_duration, progress
from tests.test_synthetic import DATA

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _lines(buf: io.StringIO) -> list[str]:
    return [ln for ln in buf.getvalue().splitlines() if ln]


def _progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("progress[")]


# ---- the plain writer ------------------------------------------------------------------------------------------
def test_plain_lines_rate_limited_with_eta_and_end_line():
    clock, buf = Clock(), io.StringIO()
    out = ProgressOutput(interval=30, stream=buf, clock=clock, heartbeat=False, mode="auto")
    with progress("profile", total=4, unit="samples", output=out) as tick:
        assert tick.mode == "plain"  # a StringIO is not a TTY
        assert _lines(buf) == []  # nothing before the first tick
        clock.t += 65
        tick()  # first tick: always a line
        assert _lines(buf) == ["[profile] 1/4 samples  elapsed 1m05s  eta 3m15s"]
        clock.t += 10
        tick()
        clock.t += 10
        tick()  # 20 s since the last line < 30 s: silent
        assert len(_lines(buf)) == 1
        clock.t += 15
        tick()  # 35 s since the last line: a line
        assert _lines(buf)[-1] == "[profile] 4/4 samples  elapsed 1m40s  eta 0s"
    assert _lines(buf)[-1] == "[profile] 4/4 samples  elapsed 1m40s  done"
    assert len(_lines(buf)) == 3


def test_plain_interval_zero_every_tick_stage_change_info_and_work_weighted_eta():
    clock, buf = Clock(), io.StringIO()
    out = ProgressOutput(interval=0, stream=buf, clock=clock, mode="plain")
    with progress("eval passkey", total=3, unit="samples", work_total=600, output=out) as tick:
        tick(0, stage="eval passkey: dense N=100")  # a new stage is worth a line, even before any step
        clock.t += 10
        tick(1, work=100, loss=0.5)
        tick(0, stage="eval passkey: plan N=500")
        clock.t += 50
        tick(1, work=500)
    lines = _lines(buf)
    assert lines[0] == "[eval passkey: dense N=100] 0/3 samples  elapsed 0s  eta --"
    # 100 of 600 work in 10 s: 500 left -> 50 s (a count-based ETA would say 20 s)
    assert lines[1] == "[eval passkey: dense N=100] 1/3 samples  elapsed 10s  eta 50s  loss 0.5"
    assert lines[2].startswith("[eval passkey: plan N=500] 1/3 samples")
    assert lines[3].startswith("[eval passkey: plan N=500] 2/3 samples  elapsed 1m00s")
    assert "  done" in lines[-1] and lines[-1].endswith("loss 0.5") and len(lines) == 5  # fields stay until changed


def test_resumed_progress_eta_uses_this_runs_rate():
    clock, buf = Clock(), io.StringIO()
    out = ProgressOutput(interval=0, stream=buf, clock=clock, mode="plain")
    with progress("profile", total=10, done=6, output=out) as tick:
        clock.t += 20
        tick()
    assert _lines(buf)[0] == "[profile] 7/10  elapsed 20s  eta 1m00s"


def test_eta_counts_down_during_a_long_step():
    clock = Clock()
    p = Progress("x", total=3, output=ProgressOutput(interval=0, stream=io.StringIO(), clock=clock, mode="plain",
                                                     heartbeat=False))
    with p as tick:
        clock.t += 10
        tick()
        assert p.eta() == pytest.approx(20)
        clock.t += 15
        assert p.eta() == pytest.approx(5)
        clock.t += 60
        assert p.eta() == 0


def test_heartbeat_during_a_long_step_and_thread_stops():
    buf = io.StringIO()
    out = ProgressOutput(interval=0.05, stream=buf, mode="plain")
    with progress("search", total=3, unit="trials", output=out) as tick:
        tick()
        n0 = len(_lines(buf))
        time.sleep(0.4)  # one very long step, no tick
        beats = _lines(buf)[n0:]
        assert len(beats) >= 2, buf.getvalue()
        assert all(b.startswith("[search] 1/3 trials  elapsed") and "eta" in b for b in beats)
        assert _progress_threads()
    assert not _progress_threads()
    n_end = len(_lines(buf))
    time.sleep(0.2)
    assert len(_lines(buf)) == n_end and _lines(buf)[-1].endswith("done")


def test_heartbeat_before_the_first_tick():
    buf = io.StringIO()
    with progress("profile", total=2, output=ProgressOutput(interval=0.05, stream=buf, mode="plain")):
        time.sleep(0.3)
    assert any(ln.startswith("[profile] 0/2  elapsed") and "eta --" in ln for ln in _lines(buf))


def test_nested_only_the_innermost_heartbeat_speaks():
    buf = io.StringIO()
    out = ProgressOutput(interval=0.05, stream=buf, mode="plain")
    with progress("run", total=2, unit="stages", output=out) as outer:
        outer(0, stage="run: profile")
        with progress("profile", total=1, output=out) as inner:
            time.sleep(0.3)
            inner()
        mark = len(_lines(buf))
        outer()
    lines = _lines(buf)
    inside = lines[1:mark]
    assert inside and all(ln.startswith("[profile]") for ln in inside), lines
    assert lines[-1].startswith("[run: profile] 1/2 stages") and lines[-1].endswith("done")


def test_env_interval_disabled_and_exception():
    os.environ["COMPRESS_PROGRESS_INTERVAL"] = "0.5"
    try:
        assert Progress("x", 1).interval == 0.5
    finally:
        del os.environ["COMPRESS_PROGRESS_INTERVAL"]
    assert Progress("x", 1).interval == 30

    buf = io.StringIO()
    with progress("x", total=3, enabled=False, output=ProgressOutput(stream=buf)) as tick:
        tick()
    assert buf.getvalue() == ""

    buf = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress("x", total=3, output=ProgressOutput(interval=0, stream=buf, mode="plain")) as tick:
            tick()
            raise RuntimeError("boom")
    assert _lines(buf)[-1].endswith("stopped (RuntimeError)")
    assert not _progress_threads()


def test_tty_gets_the_rich_bar_nested():
    buf = FakeTTY()
    with progress("outer", total=2, output=ProgressOutput(stream=buf)) as t1:
        assert t1.mode == "rich"
        # joins the same live display (no LiveError)
        with progress("inner", total=1, output=ProgressOutput(stream=buf)) as t2:
            assert t2.mode == "rich"
            t2()
        t1(2)
    assert "outer" in buf.getvalue() and "inner" in buf.getvalue()
    assert "[outer]" not in buf.getvalue()  # not the plain writer


def test_fmt_duration():
    assert [fmt_duration(s) for s in (0, 9.6, 65, 3599, 3600 * 2 + 180)] == ["0s", "10s", "1m05s", "59m59s", "2h03m"]


def test_compressor_progress_reexports_the_same_helper():
    import compressor.progress as cp
    import profilers.progress as pp

    assert cp.progress is pp.progress and cp.Progress is pp.Progress


# ---- the commands, stderr a pipe (not a TTY) -------------------------------------------------------------------
def _compress(args, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMPRESS_PROGRESS_INTERVAL="0", COMPRESS_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("COMPRESS_PROGRESS", None)
    r = subprocess.run([sys.executable, "-c", "from compressor.cli import main; main()", *args], env=env, cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_cli_profile_and_search_print_progress_lines(tiny_model_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--lengths", "256,320", "--samples", "2", "--sources",
              f"{DATA},passkey", "--sinks", "8", "--block", "16"]
    r = _compress(["profile", "--out", str(tmp_path / "prof"), *common], tmp_path)
    err = r.stderr
    assert "[calibration" in err
    assert "[profile N=256] 1/4 samples  elapsed" in err and "eta" in err
    assert "[profile N=320] 4/4 samples" in err and "done" in err
    r = _compress(["search", "--profile", str(tmp_path / "prof"), "--budget", "0.5", "--out", str(tmp_path / "s"),
                   "--trials", "2", "--json"], tmp_path)
    assert "[search] 1/2 trials  elapsed" in r.stderr and "[search] 2/2 trials" in r.stderr
    assert json.loads(r.stdout)["density"]  # stdout stays clean JSON


@pytest.mark.slow
def test_cli_eval_names_each_method(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from compressor.cli import app

    r = CliRunner().invoke(app, ["plan", "uniform", "--model", str(tiny_model_dir), "--span", "64", "--sink", "4",
                                 "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    r = _compress(["eval", "--model", str(tiny_model_dir), "--plan", str(tmp_path / "p.json"), "--task", "retrieval",
                   "--lengths", "600", "--depths", "0.5", "--samples", "1", "--json"], tmp_path)
    err = r.stderr
    for method in ("dense", "p", "uniform"):
        assert f"[eval retrieval: {method} N=600]" in err, err
    assert "[eval retrieval: uniform N=600] 3/3 samples" in err and "done" in err
    assert {row["method"] for row in json.loads(r.stdout)["summary"]} == {"dense", "p", "uniform"}
