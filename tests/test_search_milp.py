import itertools
from dataclasses import replace
from typing import Hashable, Mapping, Sequence

import numpy as np
import pytest

from plans.errors import CompressError
from search_space.cost_rows import CostRow, SolverInput, evaluate_assignment, is_feasible, make_rows
from search_space.greedy import solve_greedy
from search_space.milp import MilpOptions, MilpResult, solve_milp
from search_space.pareto import non_dominated


def pareto_front(
    loss: Mapping[int, np.ndarray],
    cost: Mapping[Hashable, np.ndarray] | Sequence[CostRow],
    budgets: Mapping[Hashable, float] | None = None,
    *,
    method: str = "epsilon",
    n_bands: int = 4,
    n_weights: int = 5,
    time_limit: float = 60.0,
    **kw,
) -> list[MilpResult]:
    """Non-dominated plans over the per-length losses, deduplicated, sorted by the first length's loss (an oracle
    for the solver under loss bounds and weights; the library's own front is the study's, over loss and latency).

    ``epsilon`` (MoA): minimise each length alone (anchors), split every other length's range over the anchors
    into ``n_bands`` and minimise each length under every combination of caps: M + M*n_bands^(M-1) MILPs.
    ``weights``: minimise weighted sums over a simplex grid with ``n_weights`` steps per axis.
    """
    lengths = list(loss)
    results: list[MilpResult] = []

    opt_keys = set(MilpOptions.__dataclass_fields__)
    inp = SolverInput(loss, cost, budgets, **{k: v for k, v in kw.items() if k not in opt_keys})
    opt = MilpOptions(time_limit=time_limit, **{k: v for k, v in kw.items() if k in opt_keys})

    def solve(**extra):
        try:
            r = solve_milp(replace(inp, **extra), opt)
        except CompressError as e:
            if "cannot be met together" in str(e) and "loss bounds" in str(e):
                return None
            raise
        if r.status.startswith(("optimal", "time_limit")) and not r.no_solution:
            results.append(r)
        return r

    if len(lengths) == 1 or method == "weights":
        if len(lengths) == 1:
            solve(objective_weights={lengths[0]: 1.0})
        else:
            for combo in itertools.product(range(n_weights + 1), repeat=len(lengths)):
                if sum(combo) != n_weights:
                    continue
                solve(objective_weights={n: c / n_weights for n, c in zip(lengths, combo)})
    elif method == "epsilon":
        anchors = [solve(objective_weights={n: 1.0}) for n in lengths]
        anchors = [a for a in anchors if a is not None]
        lo = {n: min(a.losses[n] for a in anchors) for n in lengths}
        hi = {n: max(a.losses[n] for a in anchors) for n in lengths}
        for p in lengths:
            others = [n for n in lengths if n != p]
            caps = {n: np.linspace(lo[n], hi[n], n_bands + 1)[1:] for n in others}
            for combo in itertools.product(*[caps[n] for n in others]):
                bounds = {n: float(v) * (1 + 1e-9) + 1e-12 for n, v in zip(others, combo)}
                solve(objective_weights={p: 1.0}, loss_bounds=bounds)
    else:
        raise CompressError(f"unknown Pareto method {method!r}: use epsilon or weights")
    seen, uniq = set(), []
    for r in results:
        key = r.assignment.tobytes()
        if key not in seen:
            seen.add(key)
            uniq.append(r)
    keep = non_dominated([[r.losses[n] for n in lengths] for r in uniq])
    front = [uniq[i] for i in keep]
    return sorted(front, key=lambda r: r.losses[lengths[0]])


def small_problem(seed=0, H=6, C=4, lengths=(1, 2)):
    rng = np.random.default_rng(seed)
    loss = {n: rng.random((H, C)) * np.linspace(1, 0, C) for n in lengths}  # wider candidates lose less
    cost = {n: np.tile(np.linspace(0.1, 1.0, C) ** (1 + 0.2 * i), (H, 1)) for i, n in enumerate(lengths)}
    return loss, cost


def brute_force(loss, rows, lay, K, weights=None, lower=True):
    H, C = next(iter(loss.values())).shape
    best = None
    for a in itertools.product(range(C), repeat=H):
        a = np.array(a)
        if not is_feasible(a, rows, lay, K, lower=lower):
            continue
        _, _, o = evaluate_assignment(a, loss, rows, weights)
        if best is None or o < best[0] - 1e-12:
            best = (o, a)
    return best


LAYERS = np.array([0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("K", [1, 2, None])
@pytest.mark.parametrize("method", ["direct", "colgen"])
def test_milp_matches_brute_force(seed, K, method):
    loss, cost = small_problem(seed)
    bud = {1: 0.55 * 6, 2: 0.5 * 6}
    rows = make_rows(cost, bud, 0.7)
    best = brute_force(loss, rows, LAYERS, K)
    if best is None:  # the lower bound cannot be met: the solver relaxes it
        r = solve_milp(SolverInput(loss, cost, bud, layer_of_head=LAYERS, K=K, lower_fraction=0.7),
                       MilpOptions(method=method))
        assert r.lower_relaxed
        best = brute_force(loss, rows, LAYERS, K, lower=False)
    else:
        r = solve_milp(SolverInput(loss, cost, bud, layer_of_head=LAYERS, K=K, lower_fraction=0.7),
                       MilpOptions(mip_rel_gap=1e-9, method=method))
        assert not r.lower_relaxed
    assert r.status == "optimal"
    assert r.objective == pytest.approx(best[0], rel=1e-6, abs=1e-9)
    assert is_feasible(r.assignment, rows, LAYERS, K, lower=not r.lower_relaxed)


def test_k_constraint_honoured_on_larger_problem():
    rng = np.random.default_rng(5)
    L, Hh, C = 8, 6, 10
    H = L * Hh
    lay = np.repeat(np.arange(L), Hh)
    spans = np.linspace(0.05, 1, C)
    tau = rng.uniform(0.02, 1.0, (H, 1))
    loss = {n: np.exp(-spans[None] / tau) * (1 - spans[None]) for n in (1, 2)}
    cost = {n: np.tile(spans ** (0.8 + 0.2 * n), (H, 1)) for n in (1, 2)}
    bud = {1: 0.4 * H, 2: 0.35 * H}
    for K in (1, 2, 3):
        for method in ("direct", "colgen"):
            r = solve_milp(SolverInput(loss, cost, bud, layer_of_head=lay, K=K),
                           MilpOptions(method=method, time_limit=20))
            assert r.status in ("optimal", "feasible")
            for l in range(L):
                assert len(np.unique(r.assignment[lay == l])) <= K
            rows = make_rows(cost, bud, 0.9)
            assert is_feasible(r.assignment, rows, lay, K, lower=not r.lower_relaxed)
            # the lower bound (0.9 x budget) is met: the plan uses its budget
            for n in (1, 2):
                assert 0.9 * bud[n] - 1e-6 <= r.costs[str(n)] <= bud[n] + 1e-6
    # colgen and direct agree within the tolerance
    a = solve_milp(SolverInput(loss, cost, bud, layer_of_head=lay, K=2),
                   MilpOptions(method="direct", mip_rel_gap=1e-6, time_limit=30))
    b = solve_milp(SolverInput(loss, cost, bud, layer_of_head=lay, K=2), MilpOptions(method="colgen", time_limit=30))
    assert b.objective <= a.objective * (1 + 1e-3) + 1e-9


def test_lower_bound_forces_budget_use():
    loss, cost = small_problem(3)
    loss = {n: l * 0 + 1e-3 * np.arange(4)[None, ::-1] for n, l in loss.items()}  # nearly flat
    bud = {1: 0.6 * 6, 2: 0.6 * 6}
    r0 = solve_milp(SolverInput(loss, cost, bud, layer_of_head=LAYERS, K=None, lower_fraction=0.0))
    r9 = solve_milp(SolverInput(loss, cost, bud, layer_of_head=LAYERS, K=None, lower_fraction=0.95))
    for n in ("1", "2"):
        assert r9.costs[n] >= 0.95 * bud[int(n)] - 1e-9 or r9.lower_relaxed
        assert r9.costs[n] <= bud[int(n)] + 1e-9
    assert r0.objective <= r9.objective + 1e-12


def test_infeasible_budget_names_length_and_min_cost():
    loss, cost = small_problem(0)
    with pytest.raises(CompressError) as e:
        solve_milp(SolverInput(loss, cost, {1: 0.05 * 6, 2: 3.0}, layer_of_head=LAYERS))
    msg = str(e.value)
    assert "N=1" in msg and "0.6" in msg and "0.3" in msg and "infeasible" in msg
    # the same through CostRow with display units (density)
    row = CostRow(key="density@4096", cost=cost[1], upper=0.05 * 6, length=4096, display_scale=6)
    with pytest.raises(CompressError, match=r"density@4096 at N=4096 .* costs 0\.1 but the budget allows 0\.05"):
        solve_milp(SolverInput(loss, [row], layer_of_head=LAYERS))
    with pytest.raises(CompressError, match=r"infeasible"):
        solve_greedy(SolverInput(loss, [row], layer_of_head=LAYERS))


def test_group_max_budget():
    """Per-query-head decisions with a group cost: each pair of heads pays its widest member."""
    loss = {1: np.array([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0], [0.3, 0.1, 0.0], [0.3, 0.1, 0.0]])}
    c = np.tile([0.2, 0.5, 1.0], (4, 1))
    grp = np.array([0, 0, 1, 1])
    row = CostRow(key="kv", cost=c, upper=1.5, group=grp)
    r = solve_milp(SolverInput(loss, [row], layer_of_head=np.zeros(4, dtype=int), K=None))
    best = brute_force(loss, [row], None, None)
    assert r.objective == pytest.approx(best[0])
    assert row.total(r.assignment) <= 1.5 + 1e-9
    assert list(r.assignment[:2]) == [2, 2]  # group 0 (high loss) gets the wide candidate


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_feasible_and_not_better_than_milp(seed):
    rng = np.random.default_rng(seed)
    L, Hh, C = 6, 4, 8
    H = L * Hh
    lay = np.repeat(np.arange(L), Hh)
    spans = np.linspace(0.05, 1, C)
    tau = rng.uniform(0.02, 1.0, (H, 1))
    loss = {n: np.exp(-spans[None] / tau) * (1 - spans[None]) for n in (1, 2)}
    cost = {n: np.tile(spans ** n, (H, 1)) for n in (1, 2)}
    bud = {1: 0.45 * H, 2: 0.3 * H}
    g = solve_greedy(SolverInput(loss, cost, bud, layer_of_head=lay, K=2, lower_fraction=0.0))
    m = solve_milp(SolverInput(loss, cost, bud, layer_of_head=lay, K=2, lower_fraction=0.0),
                   MilpOptions(mip_rel_gap=1e-9, method="direct"))
    rows = make_rows(cost, bud, 0.0)
    assert g.status == "greedy" and m.status == "optimal"
    assert is_feasible(g.assignment, rows, lay, 2) and is_feasible(m.assignment, rows, lay, 2)
    assert g.objective >= m.objective - 1e-9
    assert g.objective <= 1.5 * m.objective  # and not far off


def test_pareto_front_is_non_dominated_and_deduplicated():
    loss, cost = small_problem(4, lengths=(1, 2))
    bud = {1: 0.6 * 6, 2: 0.6 * 6}
    front = pareto_front(loss, cost, bud, layer_of_head=LAYERS, K=2, lower_fraction=0.0, n_bands=3)
    assert front
    pts = [[r.losses[1], r.losses[2]] for r in front]
    assert non_dominated(pts) == list(range(len(pts)))
    assert len({r.assignment.tobytes() for r in front}) == len(front)
    w = pareto_front(loss, cost, bud, layer_of_head=LAYERS, K=2, lower_fraction=0.0, method="weights", n_weights=3)
    assert w and non_dominated([[r.losses[1], r.losses[2]] for r in w]) == list(range(len(w)))


def test_non_dominated():
    assert non_dominated([[1, 2], [2, 1], [2, 2], [1, 2]]) == [0, 1]


@pytest.mark.parametrize("method", ["direct", "colgen"])
def test_group_max_with_k_limit_matches_brute_force(method):
    """Query-head decisions, KV groups of 2, a group-max KV budget, an additive density budget and K=2."""
    rng = np.random.default_rng(7)
    H, C = 8, 3
    lay = np.repeat([0, 1], 4)
    grp = np.repeat([0, 1, 2, 3], 2)
    base = np.array([0.2, 0.5, 1.0])
    loss = {1: rng.random((H, C)) * (1 - base)[None] * 2}
    kv = CostRow(key="kv", cost=np.tile(base, (H, 1)), upper=2.2, group=grp)
    dens = CostRow(key="density", cost=np.tile(base ** 1.5, (H, 1)), upper=0.5 * H)
    rows = [kv, dens]
    r = solve_milp(SolverInput(loss, rows, layer_of_head=lay, K=2, lower_fraction=0.5),
                   MilpOptions(method=method, mip_rel_gap=1e-9))
    best = brute_force(loss, make_rows(rows, None, 0.5), lay, 2)
    assert r.objective == pytest.approx(best[0], rel=1e-6)
    assert kv.total(r.assignment) <= 2.2 + 1e-9


def test_colgen_bound_is_valid_with_group_rows():
    """The column-generation (Lagrangian) bound never exceeds a feasible objective of the full model."""
    import json

    rng = np.random.default_rng(2)
    L, Hq, G, C = 6, 8, 2, 12
    H = L * Hq
    lay, grp = np.repeat(np.arange(L), Hq), np.arange(H) // G
    spans = np.linspace(0.05, 1, C)
    tau = rng.uniform(0.02, 1, (H, 1))
    loss = {n: np.exp(-spans[None] / tau) * (1 - spans[None]) * rng.uniform(0.5, 2, (H, 1)) for n in (1, 2)}
    rows = [CostRow(key="kv", cost=np.tile(spans, (H, 1)), upper=0.5 * H / G, group=grp),
            CostRow(key="d1", cost=np.tile(spans ** 1.3, (H, 1)), upper=0.35 * H)]
    c = solve_milp(SolverInput(loss, rows, layer_of_head=lay, K=2), MilpOptions(method="colgen", time_limit=20))
    d = solve_milp(SolverInput(loss, rows, layer_of_head=lay, K=2),
                   MilpOptions(method="direct", linking="disaggregated", time_limit=20))
    lb = json.loads(c.message)["lagrangian_bound"]
    assert lb is not None and lb <= d.objective + 1e-9
    assert c.objective <= d.objective * (1 + 2e-3)
    assert is_feasible(c.assignment, make_rows(rows, None, 0.9), lay, 2)


def _three_length_problem(seed, L=8, Hh=8, C=12):
    rng = np.random.default_rng(seed)
    H = L * Hh
    lay = np.repeat(np.arange(L), Hh)
    spans = np.linspace(0.05, 1, C)
    tau = rng.uniform(0.02, 1.0, (H, 1))
    loss = {n: np.exp(-spans[None] / tau) * (1 - spans[None]) * rng.uniform(0.5, 2, (H, 1)) for n in (1, 2, 3)}
    cost = {n: np.tile(spans ** (0.6 + 0.3 * n), (H, 1)) for n in (1, 2, 3)}
    bud = {1: 0.45 * H, 2: 0.35 * H, 3: 0.3 * H}
    return loss, cost, bud, lay


def test_colgen_extended_master_proves_tight_gap():
    """A gap the restricted master cannot close is certified by the reduced-cost filtered extended master."""
    import json

    loss, cost, bud, lay = _three_length_problem(2)
    c = solve_milp(SolverInput(loss, cost, bud, layer_of_head=lay, K=2),
                   MilpOptions(method="colgen", mip_rel_gap=1e-5, time_limit=20))
    d = solve_milp(SolverInput(loss, cost, bud, layer_of_head=lay, K=2),
                   MilpOptions(method="direct", linking="disaggregated", mip_rel_gap=1e-9, time_limit=20))
    info = json.loads(c.message)
    assert info.get("ext_calls", 0) >= 1
    assert c.status == "optimal" and c.mip_gap <= 1e-5
    assert d.status == "optimal"
    assert c.objective <= d.objective * (1 + 1e-5) + 1e-12
    assert info["lagrangian_bound"] <= d.objective + 1e-9
    assert is_feasible(c.assignment, make_rows(cost, bud, 0.9), lay, 2)


@pytest.mark.parametrize("method", ["direct", "colgen"])
def test_duplicate_candidates_are_merged(method):
    """Candidates equal in every loss and cost are solved once; the plan indexes the original candidates."""
    loss, cost, bud, lay = _three_length_problem(2, L=4, Hh=6, C=8)
    dup = np.array([0, 1, 1, 2, 3, 4, 4, 4, 5, 6, 7, 2])
    loss_d = {n: l[:, dup] for n, l in loss.items()}
    cost_d = {n: c[:, dup] for n, c in cost.items()}
    a = solve_milp(SolverInput(loss, cost, bud, layer_of_head=lay, K=2),
                   MilpOptions(method=method, mip_rel_gap=1e-9, time_limit=20))
    b = solve_milp(SolverInput(loss_d, cost_d, bud, layer_of_head=lay, K=2),
                   MilpOptions(method=method, mip_rel_gap=1e-9, time_limit=20))
    assert a.status == b.status == "optimal"
    assert b.objective == pytest.approx(a.objective, rel=1e-9)
    assert b.assignment.max() < len(dup) and set(b.assignment) <= {0, 1, 3, 4, 5, 8, 9, 10}  # first copies
    assert is_feasible(b.assignment, make_rows(cost_d, bud, 0.9), lay, 2)
    if method == "colgen":
        import json

        assert json.loads(b.message)["distinct_candidates"] == 8
