"""Wilson intervals, exact and pooled McNemar tests, fidelity rows: against closed forms and hand computations."""

from __future__ import annotations

import json
import math

import pytest

from compressor.statistics import (
    CellResult,
    Comparison,
    McNemarResult,
    beyond_model,
    mcnemar_exact,
    mcnemar_from_counts,
    mcnemar_pooled,
    threshold_decided,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_closed_form(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = k / n
    center = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (center - half) / (1 + z * z / n), (center + half) / (1 + z * z / n)


@pytest.mark.parametrize("k,n,published", [
    (0, 10, (0.0, 0.2775)),
    (5, 10, (0.2366, 0.7634)),
    (29, 30, (0.8333, 0.9941)),
    (10, 10, (0.7225, 1.0)),
    (28, 30, (0.7868, 0.9815)),
    (2, 30, (0.0185, 0.2132)),
])
def test_wilson_against_published_values_and_the_closed_form(k, n, published):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(published[0], abs=6e-5) and hi == pytest.approx(published[1], abs=6e-5)
    clo, chi = wilson_closed_form(k, n)
    assert lo == pytest.approx(max(0.0, clo), abs=1e-9) and hi == pytest.approx(min(1.0, chi), abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_other_confidence_and_edge_cases():
    z90 = 1.6448536269514722
    lo, hi = wilson_interval(7, 20, confidence=0.90)
    assert (lo, hi) == pytest.approx(wilson_closed_form(7, 20, z90), abs=1e-9)
    assert wilson_interval(7, 20, 0.99)[0] < wilson_interval(7, 20, 0.95)[0] < lo
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no items: the whole range, never NaN
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)


@pytest.mark.parametrize("k,n,expected", [
    (0, 10, True),     # closed-form upper 0.2775 < 0.8: beyond the model
    (5, 10, True),     # upper 0.7634 < 0.8
    (6, 10, False),    # upper 0.8312: straddles 0.8
    (10, 10, False),   # lower 0.7225: straddles 0.8
    (16, 16, True),    # lower 16/(16 + z^2) = 0.8064 >= 0.8: within
    (15, 15, False),   # lower 15/(15 + z^2) = 0.7961 < 0.8
    (0, 9, False),     # fewer than min_n items: never decided
])
def test_threshold_decided_against_the_closed_form(k, n, expected):
    lo, hi = wilson_closed_form(k, n)
    assert threshold_decided(k, n) == (n >= 10 and (hi < 0.8 or lo >= 0.8))
    if n >= 10:
        assert threshold_decided(k, n) is expected


def _pairs(both, a_only, b_only, neither):
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    return a, b


def test_mcnemar_exact_against_hand_computed_binomials():
    r = mcnemar_exact(*_pairs(15, 1, 9, 5))
    assert isinstance(r, McNemarResult)
    assert (r.n, r.both, r.a_only, r.b_only, r.neither) == (30, 15, 1, 9, 5)
    assert r.p_value == pytest.approx(2 * (1 + 10) / 2 ** 10) and round(r.p_value, 5) == 0.02148
    assert r.diff == pytest.approx((1 - 9) / 30)
    # symmetric in which method is A; the sign of diff flips
    s = mcnemar_exact(*reversed(_pairs(15, 1, 9, 5)))
    assert s.p_value == pytest.approx(r.p_value) and s.diff == pytest.approx(-r.diff)
    # 0 vs 6 discordant: 2 / 2^6; 3 vs 3: 1; 2 vs 5: 2 * (1 + 7 + 21) / 128
    assert mcnemar_exact(*_pairs(4, 0, 6, 0)).p_value == pytest.approx(2 / 64)
    assert mcnemar_exact(*_pairs(4, 3, 3, 1)).p_value == 1.0
    assert mcnemar_exact(*_pairs(0, 2, 5, 0)).p_value == pytest.approx(2 * 29 / 128)


def test_mcnemar_without_discordant_pairs_and_bad_input():
    r = mcnemar_exact([True, False, True], [True, False, True])
    assert r.p_value == 1.0 and r.diff == 0.0 and r.discordant == 0
    e = mcnemar_exact([], [])
    assert (e.n, e.p_value, e.diff) == (0, 1.0, 0.0)
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([True], [True, False])
    with pytest.raises(ValueError):
        mcnemar_from_counts(1, -1, 0, 0)


def test_mcnemar_pooled_sums_the_cells():
    cells = [_pairs(5, 1, 3, 1), _pairs(2, 0, 4, 4), _pairs(7, 0, 2, 1)]
    pooled = mcnemar_pooled(cells)
    assert (pooled.n, pooled.both, pooled.a_only, pooled.b_only, pooled.neither) == (30, 14, 1, 9, 6)
    assert pooled.p_value == pytest.approx(22 / 1024)  # the exact test on 1 vs 9 summed discordant pairs
    assert pooled.diff == pytest.approx(-8 / 30)
    a = [x for c in cells for x in c[0]]
    b = [x for c in cells for x in c[1]]
    assert mcnemar_exact(a, b) == pooled  # pooling = one test over all items
    assert all(mcnemar_exact(*c).p_value > pooled.p_value for c in cells)  # each cell alone says less


def test_beyond_model():
    assert beyond_model(23, 30) and not beyond_model(24, 30) and not beyond_model(30, 30)
    assert beyond_model(8, 10, threshold=0.9) and not beyond_model(8, 10)
    assert beyond_model(0, 0)


def test_cell_and_comparison_rows_are_fidelity_json_rows():
    c = CellResult(model="smollm2", task="niah_single", n_tokens=2048, depth=0.5, method="dense", density=1.0,
                   kv_density=1.0, correct=29, n=30)
    row = c.to_row()
    assert list(row) == ["model", "task", "n_tokens", "depth", "method", "density", "kv_density", "correct", "n",
                         "ci95"]
    assert row["ci95"] == pytest.approx(list(wilson_interval(29, 30)))
    assert c.accuracy == pytest.approx(29 / 30)
    assert json.loads(json.dumps(row)) == row
    w = CellResult("m", "common_words", 4096, None, "uniform", 0.5, 0.4, 0, 0)
    assert w.to_row()["depth"] is None and w.to_row()["ci95"] == [0.0, 1.0] and w.accuracy is None

    cmp = Comparison.from_pairs("plan@0.5", "uniform@0.5", "all", [_pairs(5, 9, 1, 1), _pairs(3, 0, 0, 2)])
    assert cmp.cells == 2 and cmp.diff == pytest.approx(8 / 21) and cmp.p_value == pytest.approx(22 / 1024)
    assert cmp.to_row() == {"plan": "plan@0.5", "baseline": "uniform@0.5", "axis": "all", "cells": 2,
                            "diff": pytest.approx(8 / 21), "p_value": pytest.approx(22 / 1024), "scope": "pooled",
                            "n": 21}


def _readme_schema() -> dict[str, list[str]]:
    """The row keys the README's "Fidelity results file" table documents, per top-level key."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Fidelity results file", 1)[1].split("\n## ", 1)[0]
    out = {}
    for key in ("cells", "comparisons"):
        row = re.search(rf"\| `{key}` \| `\{{([^}}]*)\}}`", section)
        out[key] = [k.strip() for k in row.group(1).split(",")]
    return out


def test_committed_fidelity_json_follows_the_readme_schema():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fidelity.json"
    if not path.exists():
        pytest.skip("benchmarks/results/fidelity.json not produced yet")
    data = json.loads(path.read_text())
    schema = _readme_schema()
    assert schema["cells"] == list(CellResult("m", "t", 1, None, "x", 1, 1, 0, 1).to_row())
    for key in ("cells", "comparisons"):
        assert data[key] and all(list(r) == schema[key] for r in data[key]), key
    for r in data["cells"]:
        lo, hi = wilson_interval(r["correct"], r["n"])
        assert r["ci95"] == pytest.approx([lo, hi]) and r["n"] >= 50
    assert {r["axis"] for r in data["comparisons"]} >= {"prefill_density", "kv_density"}
    for key in ("model", "prompt_style", "grid", "items", "command", "machine", "date", "dtype"):
        assert key in data, key
