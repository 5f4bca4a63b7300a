import pytest

from plans.errors import CompressError
from plans.span import decode_density, prefill_density
from search_space.candidates import DENSE, Candidate
from search_space.costs import (
    LatencyTable, TimingOptions, density_costs, kv_density_costs, measure_latency_table,
)


def test_density_costs_follow_span_semantics():
    cands = [DENSE, Candidate("sink_window", 32, 128.0, 0.0, 32), Candidate("sink_window", 32, 0.0, 0.5, 32)]
    d = density_costs(cands, 1024)
    assert d[0] == 1.0
    assert d[1] == pytest.approx(prefill_density(128, 1024))
    assert d[2] == pytest.approx(prefill_density(512, 1024))
    kv = kv_density_costs(cands, 1024)
    assert list(kv) == pytest.approx([1.0, decode_density(128, 1024), 0.5])


def test_latency_table_interpolation_and_io(tmp_path):
    t = LatencyTable(device="cpu", dtype="float32", head_dim=64,
                     entries={1024: {128: 1.0, 1024: 8.0}, 2048: {128: 2.0, 2048: 30.0}})
    assert t.ms(1024, 128) == 1.0
    assert t.ms(1024, 576) == pytest.approx(4.5)  # linear in span
    assert t.ms(1024, 4096) == 8.0  # span capped at N
    mid = t.ms(1536, 128)
    assert 1.0 < mid < 2.0  # across N: between the neighbouring rows
    assert t.ms(4096, 128) > t.ms(2048, 128)  # extrapolation by work ratio
    p = t.save(tmp_path / "lat.json")
    assert LatencyTable.load(p) == t
    (tmp_path / "bad.json").write_text('{"device": "cpu", "dtype": "f", "head_dim": 64, "entries": {"100": {"200": 1}}}')
    with pytest.raises(CompressError, match="bad.json.*entries"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(CompressError, match="not found"):
        LatencyTable.load(tmp_path / "none.json")


def test_measure_latency_table_small():
    t = measure_latency_table(lengths=[128], spans=[32, 64], timing=TimingOptions(repeats=1), head_dim=16, sink=16)
    assert set(t.entries[128]) == {32, 64, 128}
    assert all(v > 0 for v in t.entries[128].values())
    assert "attention" in t.kernel
    calls = []

    def fake(q, k, v, sink, span, scale):
        calls.append(int(span))
        return q

    t2 = measure_latency_table(lengths=[64], spans=[16], timing=TimingOptions(repeats=2), head_dim=8, fn=fake, sink=4)
    assert sorted(set(calls)) == [16, 64] and len(calls) == 6
    assert t2.head_dim == 8 and t2.dtype == "float32"
