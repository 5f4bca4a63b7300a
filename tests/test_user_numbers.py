"""Every number read from a user file or string is checked: NaN, ±Infinity, negative or out-of-range values end
in one CompressError naming the file, the position and the value; the CLI exits 2 and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from compressor.cli import app
from plans.errors import CompressError
from plans.identity import identity_from_config
from plans.importers import from_duo, from_moa, import_plan_file, read_table
from plans.io import load_plan, save_plan
from plans.schema import Budget, SinkWindowPattern, uniform_plan
from search_space.budgets import parse_budget, parse_budgets
from tests.conftest import tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def ident():
    return identity_from_config(tiny_model("llama").config)  # 2 layers, 4 query heads, 2 KV heads


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(d)
    return d


def _flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return "".join(text.split())


def _cli(args) -> tuple[int, str]:
    r = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "400"})
    return r.exit_code, _flat(r.output)


def _raises(fn, *needles) -> str:
    with pytest.raises(CompressError) as e:
        fn()
    msg = str(e.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# -- MoA ------------------------------------------------------------------------------------------------------
def _moa(alphas=None, betas=None):
    return {"alphas": alphas or [[16.0] * 4] * 2, "betas": betas or [[0.1] * 4] * 2}


def test_moa_nan_literal_cli_exits_2_and_writes_nothing(model_dir, tmp_path):
    f = tmp_path / "moa_nan.json"
    json.dump(_moa(alphas=[[16.0, 16.0, 16.0, float("nan")], [16.0] * 4]), open(f, "w"))  # writes a NaN literal
    out = tmp_path / "plan.json"
    code, text = _cli(["plan", "import", f, "--model", model_dir, "--out", out])
    assert code == 2, text
    assert "alphas[0][3]" in text and "NaN" in text and "moa_nan.json" in text
    assert not out.exists()


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_moa_non_finite_literals(ident, tmp_path, token):
    f = tmp_path / "moa.json"
    f.write_text('{"alphas": [[16, 16, 16, 16], [16, 16, %s, 16]], "betas": [[0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]}'
                 % token)
    msg = _raises(lambda: import_plan_file(f, ident), str(f), "alphas[1][2]", token)
    assert "line 1" in msg


@pytest.mark.parametrize("where, value, needle", [
    ("alphas", "nan", "alphas[0][1] = 'nan'"),
    ("alphas", "-inf", "alphas[0][1] = '-inf'"),
    pytest.param("alphas", 10 ** 400, "alphas[0][1]", id="alphas-huge-int"),
    ("betas", -0.1, "betas[0][1] = -0.1"),
    ("betas", 1.5, "betas[0][1] = 1.5"),
    ("betas", "inf", "betas[0][1] = 'inf'"),
    ("betas", "abc", "betas[0][1] = 'abc'"),
])
def test_moa_bad_values_name_position_and_value(ident, where, value, needle):
    data = _moa()
    data[where] = [list(r) for r in data[where]]
    data[where][0][1] = value
    _raises(lambda: from_moa(data, ident, where="moa.json"), "moa.json", needle)


def test_moa_negative_alpha_is_a_valid_moa_plan(ident):
    # MoA alphas may be any finite real: the imported span is clamped to >= 128 tokens (MoA's run time)
    plan = from_moa(_moa(alphas=[[-4096.0] * 4] * 2), ident)
    assert plan.spans(0, 4096).tolist() == [128] * 4
    _raises(lambda: from_moa(_moa(), ident, new_tokens=-5), "new_tokens", "-5")


def test_moa_dict_rows_are_refused(ident):
    _raises(lambda: from_moa({"alphas": {"0": [1]}, "betas": []}, ident, where="m.json"), "m.json", "alphas")


# -- DuoAttention tables --------------------------------------------------------------------------------------
def test_duo_json_nan_literal_cli(model_dir, tmp_path):
    f = tmp_path / "duo_nan.json"
    f.write_text("[[0.1, 0.2],\n [NaN, 0.9]]")
    out = tmp_path / "plan_duo.json"
    code, text = _cli(["plan", "import", f, "--model", model_dir, "--out", out])
    assert code == 2, text
    assert "duo_nan.json" in text and "[1][0]" in text and "NaN" in text and "line2" in text
    assert not out.exists()


def test_duo_json_string_nan(ident, tmp_path):
    f = tmp_path / "duo.json"
    f.write_text('[[0.1, "nan"], [0.3, 0.9]]')
    _raises(lambda: import_plan_file(f, ident, fmt="duo"), str(f), "[0][1]", "'nan'")


def test_duo_tsv_nan(model_dir, tmp_path):
    f = tmp_path / "full_attention_heads.tsv"
    f.write_text("# layer rows\n0.9\t0.1\n0.2\tnan\n")
    _raises(lambda: read_table(f), str(f), "line 3", "column 2", "'nan'")
    out = tmp_path / "p.json"
    code, text = _cli(["plan", "import", f, "--model", model_dir, "--out", out])
    assert code == 2 and "line3" in text and "column2" in text and "'nan'" in text and not out.exists()


def test_duo_numpy_text_inf(ident, tmp_path):
    f = tmp_path / "gates.txt"
    np.savetxt(f, np.array([[0.9, 0.1], [-np.inf, 0.7]]), header="duo gates")
    msg = _raises(lambda: import_plan_file(f, ident, fmt="duo"), str(f), "line 3", "column 1", "'-inf'")
    assert "layer 1" in msg
    # finite gates of any sign are fine
    np.savetxt(f, np.array([[0.9, -3.0], [12.0, 0.7]]))
    assert import_plan_file(f, ident, fmt="duo").layers[0].heads[1].kind == "sink_window"


def test_duo_bad_json_and_options(ident, tmp_path):
    f = tmp_path / "duo.json"
    f.write_text("[[1. 0.5] [0.2 0.3]]")  # numpy's repr is not JSON
    _raises(lambda: read_table(f), str(f), "JSON")
    rows = [[0.9, 0.1], [0.2, 0.7]]
    _raises(lambda: from_duo(rows, ident, threshold=float("nan")), "threshold", "nan")
    _raises(lambda: from_duo(rows, ident, sink=-1), "sink", "-1")
    _raises(lambda: from_duo(rows, ident, recent=0), "recent", "0")
    _raises(lambda: from_duo(rows, ident, sink=2.5), "sink", "2.5")
    assert from_duo(rows, ident, threshold=np.float32(0.5), sink=np.int64(4), recent=16).layers[1].heads[0].span(99) == 20
    _raises(lambda: from_duo([[0.9, float("inf")], [0.2, 0.7]], ident, where="t"), "t:", "[0][1]", "inf")


def test_duo_threshold_nan_cli(model_dir, tmp_path):
    f = tmp_path / "duo.tsv"
    f.write_text("0.9 0.1\n0.2 0.7\n")
    out = tmp_path / "p.json"
    code, text = _cli(["plan", "import", f, "--model", model_dir, "--out", out, "--threshold", "nan"])
    assert code == 2 and "threshold" in text and "nan" in text and not out.exists()


# -- plan files -----------------------------------------------------------------------------------------------
@pytest.fixture
def plan_data(ident, tmp_path):
    p = uniform_plan(ident, 100, sink=4, lengths=[512])
    return json.loads(save_plan(p, tmp_path / "good.json").read_text())


def test_plan_nan_literal_refused_by_show_and_apply(plan_data, model_dir, tmp_path):
    plan_data["layers"][0]["heads"][1]["alpha"] = float("nan")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(plan_data, indent=2))  # a NaN literal
    _raises(lambda: load_plan(bad), str(bad), "layers[0].heads[1].alpha", "NaN", "line")
    code, text = _cli(["plan", "show", bad])
    assert code == 2 and "layers[0].heads[1].alpha" in text and "NaN" in text
    out = tmp_path / "patched"
    code, text = _cli(["apply", bad, "--model", model_dir, "--out", out])
    assert code == 2 and "layers[0].heads[1].alpha" in text and not out.exists()


@pytest.mark.parametrize("mutate, needles", [
    (lambda d: d["layers"][0]["heads"][1].update(alpha="nan"), ["layers.0.heads.1.alpha", "'nan'", "finite"]),
    (lambda d: d["layers"][1]["heads"][0].update(alpha="-Infinity"), ["layers.1.heads.0.alpha", "'-Infinity'"]),
    (lambda d: d["layers"][0]["heads"][0].update(beta=-0.5), ["layers.0.heads.0.beta", "-0.5"]),
    (lambda d: d["layers"][0]["heads"][0].update(beta="nan"), ["layers.0.heads.0.beta", "'nan'"]),
    (lambda d: d["layers"][0]["heads"][1].update(sink=-3), ["layers.0.heads.1.sink", "-3"]),
    (lambda d: d["layers"][0]["heads"][1].update(block=0), ["layers.0.heads.1.block", "= 0"]),
    (lambda d: d["layers"][1]["heads"][1].update(min_span=200, max_span=100), ["layers.1.heads.1", "200", "100"]),
    (lambda d: d["layers"][1]["heads"][1].update(min_span=-1), ["layers.1.heads.1.min_span", "-1"]),
    (lambda d: d.update(length_offset=-1), ["length_offset", "-1"]),
    (lambda d: d.update(lengths=[512, 0]), ["lengths.1", "= 0"]),
    (lambda d: d.update(lengths=[-512]), ["lengths.0", "-512"]),
    (lambda d: d.update(budgets=[{"kind": "density", "value": 1.5}]), ["budgets.0", "1.5"]),
    (lambda d: d.update(budgets=[{"kind": "latency_ms", "value": "inf"}]), ["budgets.0.value", "'inf'"]),
    (lambda d: d.update(budgets=[{"kind": "density", "value": 0.5, "length": 0}]), ["budgets.0.length", "= 0"]),
    (lambda d: d["predicted"].update(density={"512": 1.5}), ["predicted.density.512", "1.5"]),
    (lambda d: d["predicted"].update(kv_density={"512": -0.1}), ["predicted.kv_density.512", "-0.1"]),
    (lambda d: d["predicted"].update(loss={"512": "nan"}), ["predicted.loss.512", "'nan'"]),
    (lambda d: d["predicted"].update(latency_ms={"512": -2}), ["predicted.latency_ms.512", "-2"]),
    (lambda d: d["model"].update(num_kv_heads=0), ["model.num_kv_heads", "0"]),
])
def test_plan_file_bad_numbers(plan_data, tmp_path, mutate, needles):
    mutate(plan_data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(plan_data))
    _raises(lambda: load_plan(bad), str(bad), *needles)


@pytest.mark.parametrize("token", ["Infinity", "-Infinity", "1e999"])
def test_plan_file_infinite_literals(plan_data, tmp_path, token):
    text = json.dumps(plan_data, indent=2).replace('"alpha": 100.0', f'"alpha": {token}', 1)
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    _raises(lambda: load_plan(bad), str(bad), "layers[0].heads[0].alpha", token)


def test_schema_models_refuse_non_finite():
    for kw in ({"alpha": float("nan")}, {"alpha": float("inf")}, {"alpha": 8, "beta": float("nan")}):
        with pytest.raises(ValidationError):
            SinkWindowPattern(**kw)
    for v in (float("nan"), float("inf"), 0, -1):
        with pytest.raises(ValidationError):
            Budget(kind="latency_ms", value=v)
    with pytest.raises(ValidationError):
        Budget(kind="kv_density", value=1.5)


# -- budgets --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    ("nan", "nan"),
    ("inf", "inf"),
    ("-inf", "-inf"),
    ("-0.5", "-0.5"),
    ("1.5", "1.5"),
    ("density=nan", "nan"),
    ("density@8192=inf", "the value inf"),
    ("latency@4096<=infms", "the value infms"),
    ("density@8192=1e-400", "1e-400"),
    ("kv_density@4096=-0.3", "-0.3"),
    ("kv_density@4096=1.01", "1.01"),
    ("latency@4096<=1e400ms", "1e400"),
    ("latency@4096<=0ms", "0"),
    ("latency@4096<=-120ms", "-120"),
    ("density@0=0.5", "'0'"),
    pytest.param("density@" + "9" * 400 + "=0.5", "9999", id="huge-length"),
])
def test_budget_bad_numbers(text, needle):
    msg = _raises(lambda: parse_budget(text), repr(text), needle, "accepted forms")
    assert ("value" in msg) or ("length" in msg)


def test_budget_list_names_the_item():
    _raises(lambda: parse_budgets("density@8k=0.5,density@32k=nan"), "'density@32k=nan'", "nan")
    _raises(lambda: parse_budgets(float("inf")), "inf")


def test_budget_cli_exits_2_and_writes_nothing(tmp_path):
    from profilers.profile_format import save_profile
    from tests.test_search_synthetic import make_profile

    save_profile(make_profile(), tmp_path / "prof")
    out = tmp_path / "search"
    for budget in ("nan", "latency@4096<=infms", "kv_density@512=-0.25"):
        code, text = _cli(["search", "--profile", tmp_path / "prof", "--budget", budget, "--out", out])
        assert code == 2, text
        assert not out.exists()
