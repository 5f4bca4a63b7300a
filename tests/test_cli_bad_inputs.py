"""Bad input at the CLI (issue 22 §7-11): one shared table of bad inputs swept over every command — missing and
corrupt files, an --out that cannot be written, out-of-range numbers, lengths past the model's positions — each
must end in exit code 2, exactly one line on stderr naming the problem, no traceback, and nothing written.
Then the kinds one by one: plan numbers bounded at load, a plan of another model of the same shape, user text
printed literally, files written with the user's umask."""

from __future__ import annotations

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from compressor.cli import app
from tests.conftest import tiny_model, tiny_model_with_tokenizer

runner = CliRunner()
MAX_POS = 512


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model folder with a tokenizer (512 positions), a valid plan for it, a corrupt file, a regular file."""
    root = tmp_path_factory.mktemp("cli_bad")
    m, tok = tiny_model_with_tokenizer("llama", max_position_embeddings=MAX_POS)
    m.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    r = runner.invoke(app, ["plan", "uniform", "--model", str(root / "model"), "--span", "32", "--sink", "4",
                            "--out", str(root / "plan.json")])
    assert r.exit_code == 0, r.output
    (root / "corrupt.json").write_text('{"format_version": 1, "layers": [')
    (root / "afile").write_text("x")
    return root


def _table(root):
    """(case, argv, path that must not appear) for every command x kind of bad input."""
    m, plan, bad, afile = root / "model", root / "plan.json", root / "corrupt.json", root / "afile"
    missing = root / "missing.json"
    under_file = afile / "out"  # a path below a regular file: unwritable for anyone, root included
    mm = ["--model", str(m)]
    long = str(4 * MAX_POS)
    return [
        # plan show
        ("show/missing", ["plan", "show", missing], None),
        ("show/corrupt", ["plan", "show", bad], None),
        ("show/n0", ["plan", "show", plan, "--n", "0"], None),
        ("show/n-huge", ["plan", "show", plan, "--n", str(2**40)], None),
        # plan uniform
        ("uniform/sink", ["plan", "uniform", *mm, "--span", "32", "--sink", "-3", "--out", root / "u1.json"], root / "u1.json"),
        ("uniform/span", ["plan", "uniform", *mm, "--span", "0", "--out", root / "u2.json"], root / "u2.json"),
        ("uniform/density", ["plan", "uniform", *mm, "--density", "1.5", "--out", root / "u3.json"], root / "u3.json"),
        ("uniform/out-under-file", ["plan", "uniform", *mm, "--span", "32", "--out", under_file / "u.json"], None),
        ("uniform/out-is-folder", ["plan", "uniform", *mm, "--span", "32", "--out", root], None),
        ("uniform/missing-model", ["plan", "uniform", "--model", root / "nomodel", "--span", "32", "--out",
                                   root / "u4.json"], root / "u4.json"),
        # plan import
        ("import/missing", ["plan", "import", missing, *mm, "--out", root / "i1.json"], root / "i1.json"),
        ("import/corrupt", ["plan", "import", bad, *mm, "--out", root / "i2.json"], root / "i2.json"),
        ("import/out-under-file", ["plan", "import", bad, *mm, "--out", under_file / "i.json"], None),
        # plan schema
        ("schema/out-under-file", ["plan", "schema", "--out", under_file / "s.json"], None),
        # apply
        ("apply/missing", ["apply", missing, *mm, "--out", root / "a1"], root / "a1"),
        ("apply/corrupt", ["apply", bad, *mm, "--out", root / "a2"], root / "a2"),
        ("apply/out-is-file", ["apply", plan, *mm, "--out", afile], None),
        ("apply/out-under-file", ["apply", plan, *mm, "--out", under_file], None),
        # data
        ("data-build/lengths", ["data", "build", *mm, "--lengths", long, "--sources", "passkey", "--out",
                                root / "d1"], root / "d1"),
        ("data-build/samples", ["data", "build", *mm, "--lengths", "128", "--samples", "0", "--sources", "passkey",
                                "--out", root / "d2"], root / "d2"),
        ("data-build/out-is-file", ["data", "build", *mm, "--lengths", "128", "--out", afile], None),
        ("data-show/missing", ["data", "show", root / "nodata"], None),
        # profile
        ("profile/lengths", ["profile", *mm, "--lengths", long, "--out", root / "p1"], root / "p1.json"),
        ("profile/samples", ["profile", *mm, "--lengths", "128", "--samples", "0", "--out", root / "p2"],
         root / "p2.json"),
        ("profile/out-under-file", ["profile", *mm, "--lengths", "128", "--out", under_file / "p"], None),
        # search
        ("search/missing", ["search", "--profile", root / "noprofile", "--budget", "0.5", "--out", root / "s1"],
         root / "s1"),
        ("search/corrupt", ["search", "--profile", bad, "--budget", "0.5", "--out", root / "s2"], root / "s2"),
        ("search/budget", ["search", "--profile", bad, "--budget", "1.5", "--out", root / "s3"], root / "s3"),
        ("search/out-is-file", ["search", "--profile", bad, "--budget", "0.5", "--out", afile], None),
        # eval
        ("eval/missing", ["eval", "--plan", missing, *mm, "--task", "ppl", "--lengths", "128"], None),
        ("eval/corrupt", ["eval", "--plan", bad, *mm, "--task", "ppl", "--lengths", "128"], None),
        ("eval/lengths", ["eval", "--plan", plan, *mm, "--task", "ppl", "--lengths", long, "--out", root / "e1"],
         root / "e1"),
        ("eval/out-is-file", ["eval", "--plan", plan, *mm, "--task", "ppl", "--lengths", "128", "--out", afile], None),
        # bench
        ("bench/missing", ["bench", "--plan", missing, *mm, "--lengths", "128"], None),
        ("bench/corrupt", ["bench", "--plan", bad, *mm, "--lengths", "128"], None),
        ("bench/lengths", ["bench", "--plan", plan, *mm, "--lengths", long, "--out", root / "b1.json"],
         root / "b1.json"),
        ("bench/repeats", ["bench", "--plan", plan, *mm, "--lengths", "128", "--repeats", "0", "--out",
                           root / "b2.json"], root / "b2.json"),
        ("bench/out-under-file", ["bench", "--plan", plan, *mm, "--lengths", "128", "--out", under_file / "b.json"],
         None),
        # distill
        ("distill/missing", ["distill", missing, *mm, "--out", root / "k1"], root / "k1"),
        ("distill/corrupt", ["distill", bad, *mm, "--out", root / "k2"], root / "k2"),
        ("distill/steps", ["distill", plan, *mm, "--steps", "0", "--lengths", "256", "--out", root / "k3"], root / "k3"),
        ("distill/out-is-file", ["distill", plan, *mm, "--out", afile], None),
        # run
        ("run/lengths", ["run", *mm, "--eval-lengths", long, "--profile-lengths", "256", "--validate-length", "400", "--out", root / "r1"],
         root / "r1"),
        ("run/out-is-file", ["run", *mm, "--out", afile], None),
    ]


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_every_command_refuses_bad_input_in_one_line_and_writes_nothing(env):
    failures = []
    for case, argv, target in _table(env):
        before = _listing(env)
        r = runner.invoke(app, [str(a) for a in argv], env={"COLUMNS": "400"})
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        after = _listing(env)
        problems = []
        if r.exit_code != 2:
            problems.append(f"exit {r.exit_code}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} lines on stderr")
        if "Traceback" in r.stderr or r.exception and not isinstance(r.exception, SystemExit):
            problems.append(f"traceback / {type(r.exception).__name__}")
        if after != before:
            problems.append(f"wrote {sorted(set(after) - set(before))}")
        if target is not None and target.exists():
            problems.append(f"{target.name} exists")
        if problems:
            failures.append(f"{case}: {', '.join(problems)}: {r.stderr.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)


# -- §7 every plan number is bounded at load -------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("alpha", 1e19), ("max_span", 10**30), ("min_span", 2**31), ("sink", 2**40),
                                         ("block", 2**33)])
def test_overflowing_plan_numbers_are_refused_at_load_by_every_command(env, tmp_path, field, value):
    data = json.loads((env / "plan.json").read_text())
    data["layers"][0]["heads"][0][field] = value
    bad = tmp_path / "huge.json"
    bad.write_text(json.dumps(data))
    for argv in (["plan", "show", bad], ["apply", bad, "--model", env / "model", "--out", tmp_path / "out"]):
        r = runner.invoke(app, [str(a) for a in argv], env={"COLUMNS": "400"})
        assert r.exit_code == 2, r.output
        assert field in r.stderr and "less than or equal" in r.stderr
    assert not (tmp_path / "out").exists()


def test_plan_numbers_at_the_bound_still_load_and_run(env, tmp_path):
    """The bound is a range, not a refusal of big spans: a 2^31-1 span loads and runs as a dense head."""
    import torch

    import compressor
    from plans.io import load_plan

    data = json.loads((env / "plan.json").read_text())
    data["layers"][0]["heads"][0].update(alpha=2**31 - 1, max_span=2**31 - 1)
    p = tmp_path / "big.json"
    p.write_text(json.dumps(data))
    plan = load_plan(p)
    m = tiny_model("llama", max_position_embeddings=MAX_POS)
    dense = tiny_model("llama", max_position_embeddings=MAX_POS)
    m.config.vocab_size = dense.config.vocab_size
    compressor.apply(m, plan, allow_other_model=True)
    ids = torch.randint(1, 90, (1, 40))
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()


# -- §8 a plan made for another model of the same shape --------------------------------------------------------
def test_a_plan_of_another_model_of_the_same_shape_is_refused_unless_allowed(env, tmp_path):
    import compressor
    from plans.io import load_plan
    from plans.errors import CompressError

    other = tmp_path / "other"
    m, tok = tiny_model_with_tokenizer("llama", max_position_embeddings=2 * MAX_POS)  # same shape, other positions
    m.save_pretrained(other)
    tok.save_pretrained(other)
    r = runner.invoke(app, ["apply", str(env / "plan.json"), "--model", str(other), "--out", str(tmp_path / "o")],
                      env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "another model of this shape" in r.stderr and "--allow-other-model" in r.stderr
    assert not (tmp_path / "o").exists()
    r = runner.invoke(app, ["apply", str(env / "plan.json"), "--model", str(other), "--out", str(tmp_path / "o"),
                            "--allow-other-model"])
    assert r.exit_code == 0, r.output
    with pytest.raises(CompressError, match="another model of this shape"):
        compressor.apply(m, load_plan(env / "plan.json"))  # the Python API is strict by default too


def test_a_plan_with_another_head_dim_is_refused(env, tmp_path):
    other = tmp_path / "hd"
    m, tok = tiny_model_with_tokenizer("llama", max_position_embeddings=MAX_POS, head_dim=32)
    m.save_pretrained(other)
    tok.save_pretrained(other)
    r = runner.invoke(app, ["plan", "uniform", "--model", str(other), "--span", "32", "--out", str(tmp_path / "hd.json")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["apply", str(tmp_path / "hd.json"), "--model", str(env / "model"), "--out",
                            str(tmp_path / "o")], env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "head_dim=32" in r.stderr and "head_dim=16" in r.stderr


# -- §11a text from a user's file is printed literally ----------------------------------------------------------
def test_user_text_is_printed_literally(env, tmp_path):
    data = json.loads((env / "plan.json").read_text())
    data["source"] = "[red]x[/red] [/] \x1b[2J"  # markup and a clear-screen escape in a plan field
    p = tmp_path / "[bold]odd[x].json"
    p.write_text(json.dumps(data))
    r = runner.invoke(app, ["plan", "show", str(p)], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    assert "[red]x[/red] [/]" in r.stdout and "[bold]odd[x].json" in r.stdout
    assert "\x1b" not in r.stdout and "\\x1b[2J" in r.stdout
    missing = tmp_path / "no[/]\x1bfile.json"
    r = runner.invoke(app, ["plan", "show", str(missing)], env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "no[/]\\x1bfile.json" in r.stderr and "\x1b" not in r.stderr


# -- §11b files written get the permissions any file of the user's shell gets ---------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(env, tmp_path, mask):
    old = os.umask(mask)
    try:
        out = tmp_path / "sub" / "u.json"
        r = runner.invoke(app, ["plan", "uniform", "--model", str(env / "model"), "--span", "32", "--out", str(out)])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["plan", "schema", "--out", str(tmp_path / "schema.json")])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["apply", str(out), "--model", str(env / "model"), "--out", str(tmp_path / "patched")])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    for f in (out, tmp_path / "schema.json", tmp_path / "patched" / "plan.json", tmp_path / "patched" / "config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f
    for d in (tmp_path / "sub", tmp_path / "patched"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask, d


@pytest.mark.parametrize("mode", ["plain", "rich"])
def test_progress_lines_print_user_stage_names_literally(mode):
    import io

    from profilers.progress import ProgressOutput, progress

    buf = io.StringIO()
    out = ProgressOutput(interval=0, stream=buf, mode=mode, heartbeat=False)
    with progress("eval [red]my[/] plan\x1b[2J", total=2, output=out) as tick:
        tick(1)
        tick(1)
    text = buf.getvalue()
    assert "\x1b[2J" not in text and "\\x1b[2J" in text and "[red]my[/]" in text
