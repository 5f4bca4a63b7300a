import pytest

from plans.errors import CompressError
from plans.schema import Budget
from search_space.budgets import expand_budgets, format_budget, parse_budget, parse_budgets


@pytest.mark.parametrize("text, expected", [
    ("0.5", Budget(kind="density", value=0.5, length=None)),
    ("density=0.4", Budget(kind="density", value=0.4, length=None)),
    ("density@8192=0.25", Budget(kind="density", value=0.25, length=8192)),
    ("density@8k=0.25", Budget(kind="density", value=0.25, length=8192)),
    ("kv_density@4096=0.3", Budget(kind="kv_density", value=0.3, length=4096)),
    ("latency@4096<=120ms", Budget(kind="latency_ms", value=120.0, length=4096)),
    ("latency@4096<=0.12s", Budget(kind="latency_ms", value=120.0, length=4096)),
    ("latency@4096<=500us", Budget(kind="latency_ms", value=0.5, length=4096)),
    (" density @ 2048 = 0.5 ", Budget(kind="density", value=0.5, length=2048)),
])
def test_parse_good(text, expected):
    b = parse_budget(text)
    assert b.kind == expected.kind and b.length == expected.length and b.value == pytest.approx(expected.value)
    assert parse_budget(format_budget(b)) == b


@pytest.mark.parametrize("text", [
    "", "abc", "density", "density@=0.5", "density@8192=1.5", "density@8192=0", "kv_density@4096=0.3ms",
    "latency@4096<=-3ms", "latency@4096<=fast", "speed@4096=0.5", "density@12.5=0.5", "1.5",
])
def test_parse_bad_names_string_and_forms(text):
    with pytest.raises(CompressError) as e:
        parse_budget(text)
    msg = str(e.value)
    assert repr(text) in msg
    assert "accepted forms" in msg and "latency@4096<=120ms" in msg


def test_parse_budgets_lists_and_expand():
    bs = parse_budgets("density@8k=0.5,density@32k=0.25")
    assert [b.length for b in bs] == [8192, 32768]
    assert parse_budgets(0.3) == [Budget(kind="density", value=0.3)]
    assert len(parse_budgets(["0.5", Budget(kind="kv_density", value=0.2)])) == 2
    pairs = expand_budgets(parse_budgets("0.5,density@1024=0.3"), [512, 1024])
    assert [(b.value, n) for b, n in pairs] == [(0.5, 512), (0.3, 1024)]
