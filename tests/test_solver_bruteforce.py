"""The exact solver keeps its promises, checked against an independent brute force on every solver path.

* a result reported ``optimal`` is within the stated relative gap of the brute-force optimum (HiGHS also stops on
  its default absolute gap of 1e-6, so 1e-6 of slack is allowed on top);
* an instance where no assignment meets the upper budgets and the K limit raises CompressError;
* lower bounds are dropped only when no assignment meets them, and then the result says so
  (``lower_relaxed`` with a non-empty ``lower_relaxed_reason``).

The brute force below enumerates every assignment with itertools.product and evaluates the objective and the
constraints from the problem statement; it shares no code with the solvers (search_space.milp and the modules
it dispatches to).
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import search_space.layer_pricing as pricing_mod
import search_space.milp as milp_mod
from plans.errors import CompressError
from search_space.cost_rows import CostRow, SolverInput
from search_space.milp import MilpOptions, solve_milp

CASE = Path(__file__).parent / "data" / "exact_search_lower_bound.json"
ABS_GAP = 1e-6  # HiGHS' default mip_abs_gap
MARGIN = 1e-6  # instances with an assignment this close to a bound are redrawn (feasibility tolerances differ)


# ------------------------------------------------------------------------------------------------ brute force
_ALL: dict = {}
POPCOUNT = np.array([bin(m).count("1") for m in range(1 << 8)])  # candidates per instance stay below 8


def all_assignments(H: int, C: int, layer_of_head=None, K=None) -> np.ndarray:
    """[n, H] every assignment of a candidate to each head; with K, only those with at most K distinct candidates
    in every layer (each layer's choices enumerated and filtered, then combined across layers). Cached."""
    key = (H, C, K, None if K is None else tuple(layer_of_head))
    if key not in _ALL:
        if K is None:
            A = np.array(list(itertools.product(range(C), repeat=H)), dtype=np.intp).reshape(-1, H)
        else:
            layers = [np.flatnonzero(layer_of_head == l) for l in np.unique(layer_of_head)]
            per_layer = [[a for a in itertools.product(range(C), repeat=len(h)) if len(set(a)) <= K] for h in layers]
            combos = np.array([sum(c, ()) for c in itertools.product(*per_layer)], dtype=np.intp)
            A = np.empty_like(combos)
            A[:, np.concatenate(layers)] = combos  # the combined tuple lists the heads layer by layer
        _ALL[key] = np.asfortranarray(A)  # column h (head h) contiguous
    return _ALL[key]


def per_head(A: np.ndarray, m: np.ndarray) -> list:
    """[m[h, A[:, h]] for every head h]."""
    return [np.take(m[h], A[:, h]) for h in range(A.shape[1])]


def row_totals(A: np.ndarray, cost: np.ndarray, group=None) -> np.ndarray:
    v = per_head(A, cost)
    if group is None:
        return sum(v)
    return sum(functools.reduce(np.maximum, [v[h] for h in np.flatnonzero(group == g)]) for g in np.unique(group))


def distinct_per_layer(A: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """Number of distinct candidates among ``heads`` in every assignment (popcount of a candidate bit mask)."""
    mask = np.zeros(len(A), dtype=np.int64)
    for h in heads:
        mask |= np.left_shift(1, A[:, h])
    return POPCOUNT[mask]


def brute_force(inst: dict, lower: bool = True):
    """(number of assignments meeting every constraint, best objective, a best assignment) over all C**H."""
    H, C = inst["H"], inst["C"]
    A = all_assignments(H, C, inst["layer_of_head"], inst["K"])
    objective = np.zeros(len(A))
    for l in inst["loss"].values():
        objective += sum(per_head(A, l)) / l.max(1).sum()
    ok = np.ones(len(A), dtype=bool)
    for b in inst["budgets"]:
        tot = row_totals(A, b["cost"], b.get("group"))
        ok &= tot <= b["upper"]
        if lower and b.get("lower"):
            ok &= tot >= b["lower"]
    if inst["K"] is not None:
        for layer in np.unique(inst["layer_of_head"]):
            ok &= distinct_per_layer(A, np.flatnonzero(inst["layer_of_head"] == layer)) <= inst["K"]
    if not ok.any():
        return 0, None, None
    i = int(np.flatnonzero(ok)[np.argmin(objective[ok])])
    return int(ok.sum()), float(objective[i]), A[i].astype(np.int64)


def independent_check(inst: dict, a: np.ndarray, lower: bool) -> tuple[bool, float]:
    """(does ``a`` meet every constraint, its objective), from the problem statement."""
    H = inst["H"]
    obj = sum(float(l[np.arange(H), a].sum() / l.max(1).sum()) for l in inst["loss"].values())
    ok = True
    for b in inst["budgets"]:
        tot = float(row_totals(np.asarray(a)[None, :], b["cost"], b.get("group"))[0])
        ok &= tot <= b["upper"] + 1e-9
        if lower and b.get("lower"):
            ok &= tot >= b["lower"] - 1e-9
    if inst["K"] is not None:
        for layer in np.unique(inst["layer_of_head"]):
            ok &= len(set(a[inst["layer_of_head"] == layer].tolist())) <= inst["K"]
    return bool(ok), obj


def near_a_bound(inst: dict) -> bool:
    A = all_assignments(inst["H"], inst["C"])
    for b in inst["budgets"]:
        tot = row_totals(A, b["cost"], b.get("group"))
        for bound in (b["upper"], b.get("lower") or None):
            if bound is not None and np.abs(tot - bound).min() < MARGIN:
                return True
    return False


# ------------------------------------------------------------------------------------------------ instances
SHAPES = {  # (layers, heads per layer, candidates): at most 3**9 = 19,683 assignments (6 heads x 6 with a duplicate)
    "any": [(2, 2, 3), (2, 2, 4), (2, 2, 5), (3, 2, 3), (3, 2, 4), (2, 3, 3), (2, 3, 4), (2, 3, 5), (3, 3, 3)],
    "k_binds": [(2, 3, 3), (2, 3, 4), (2, 3, 5), (3, 3, 3), (2, 4, 3)],  # K=2 binds (heads > 2, C > 2)
}


def make_instance(rng: np.random.Generator, shapes: str, K, groups: bool) -> dict:
    L, Hh, C = SHAPES[shapes][rng.integers(len(SHAPES[shapes]))]
    H = L * Hh
    lengths = [1024] if rng.random() < 0.4 else [1024, 4096]
    loss = {}
    for n in lengths:
        l = rng.random((H, C))
        if rng.random() < 0.5:  # shaped: wider candidates lose less
            l = l * np.linspace(1, 0.05, C)[None, :]
        loss[n] = l
    lf = float(rng.choice([0.0, 0.5, 0.8, 0.9, 0.97]))
    budgets = []
    for n in lengths:
        cost = rng.random((H, C)) if rng.random() < 0.6 else np.tile(np.sort(rng.random(C)), (H, 1))
        lo, hi = cost.min(1).sum(), cost.max(1).sum()
        upper = float(lo + rng.uniform(-0.05, 1.0) * (hi - lo))  # a few below the cheapest plan: infeasible
        budgets.append({"key": f"density@{n}", "cost": cost, "upper": upper, "lower": lf * upper})
    if groups:  # a KV budget over groups of two heads paying their widest member (upper bound only)
        # pairs inside each layer (GQA), or consecutive pairs that may straddle two layers
        group = np.arange(H) // 2 if rng.random() < 0.3 else np.repeat(np.arange(L), Hh) * H + np.arange(H) % Hh // 2
        cost = np.tile(np.linspace(0.1, 1.0, C), (H, 1))
        A = all_assignments(H, C)
        tot = row_totals(A, cost, group)
        upper = float(tot.min() + rng.uniform(0.1, 1.0) * (tot.max() - tot.min()))
        budgets.append({"key": "kv", "cost": cost, "upper": upper, "lower": None, "group": group})
    return {"loss": loss, "budgets": budgets, "layer_of_head": np.repeat(np.arange(L), Hh), "K": K, "H": H, "C": C,
            "lower_fraction": lf}


def cost_rows(inst: dict) -> list[CostRow]:
    return [CostRow(key=b["key"], cost=b["cost"], upper=b["upper"], lower=b["lower"], group=b.get("group"))
            for b in inst["budgets"]]


def instances(seed: int, n: int, shapes: str, Ks, groups_every: int = 0):
    rng = np.random.default_rng(seed)
    made = 0
    while made < n:
        K = Ks[made % len(Ks)]
        inst = make_instance(rng, shapes, K, groups=bool(groups_every) and made % groups_every == 0)
        if near_a_bound(inst):
            continue
        made += 1
        yield inst


def with_duplicate_candidate(inst: dict, rng: np.random.Generator) -> dict:
    """The same instance with one candidate listed twice (the solver merges them and maps back)."""
    j = int(rng.integers(inst["C"]))
    cols = np.concatenate([np.arange(inst["C"]), [j]])
    out = dict(inst, C=inst["C"] + 1, loss={n: l[:, cols] for n, l in inst["loss"].items()})
    out["budgets"] = [dict(b, cost=b["cost"][:, cols]) for b in inst["budgets"]]
    return out


# ------------------------------------------------------------------------------------------------ the check
def check_against_brute_force(inst: dict, gap: float, relax_lower: bool = True, bf=None, **kw):
    """Solve ``inst`` and hold the result to its promises; returns the solver name (the path taken)."""
    (n_ok, best, _), (n_up, best_up, _) = bf or (brute_force(inst, lower=True), brute_force(inst, lower=False))
    inp = SolverInput(inst["loss"], cost_rows(inst), layer_of_head=inst["layer_of_head"], K=inst["K"])
    opt = MilpOptions(mip_rel_gap=gap, time_limit=30.0, relax_lower=relax_lower, **kw)
    if n_up == 0 or (n_ok == 0 and not relax_lower):
        with pytest.raises(CompressError):
            solve_milp(inp, opt)
        return "infeasible"
    r = solve_milp(inp, opt)
    ctx = f"{r.solver} {r.status} lower_relaxed={r.lower_relaxed} objective={r.objective} message={r.message}"
    assert r.status in ("optimal", "feasible"), ctx
    if n_ok > 0:
        assert not r.lower_relaxed, f"lower bounds dropped although {n_ok} assignment(s) meet them: {ctx}"
        target = best
    else:
        assert r.lower_relaxed and r.lower_relaxed_reason, f"no assignment meets the lower bounds: {ctx}"
        target = best_up
    feasible, obj = independent_check(inst, r.assignment, lower=not r.lower_relaxed)
    assert feasible, ctx
    assert r.objective == pytest.approx(obj, rel=1e-9, abs=1e-12), ctx
    assert r.objective >= target - 1e-9, ctx
    if r.status == "optimal":
        assert r.objective <= target + gap * abs(target) + ABS_GAP, f"brute force {target}: {ctx}"
    return r.solver


# ------------------------------------------------------------------------------------------------ regression case
@functools.lru_cache(maxsize=1)
def load_case():
    d = json.loads(CASE.read_text())
    loss = {int(n): np.asarray(v, dtype=np.float64) for n, v in d["loss"].items()}
    lay = np.asarray(d["layer_of_head"])
    budgets = [{"key": f"density@{n}", "cost": np.asarray(d["cost"][n], dtype=np.float64), "upper": float(u),
                "lower": d["lower_fraction"] * float(u)} for n, u in d["budget"].items()]
    H, C = next(iter(loss.values())).shape
    inst = {"loss": loss, "budgets": budgets, "layer_of_head": lay, "K": d["K"], "H": H, "C": C,
            "lower_fraction": d["lower_fraction"]}
    return d, inst, (brute_force(inst, lower=True), brute_force(inst, lower=False))


def test_case_file_brute_force_agrees_with_the_file():
    d, inst, ((n_ok, best, a), _) = load_case()
    assert n_ok == d["expected"]["feasible_assignments"] == 1
    assert best == pytest.approx(d["expected"]["objective"], rel=1e-12)
    assert a.tolist() == d["expected"]["assignment"]


@pytest.mark.parametrize("kw", [
    {"method": "colgen"}, {"method": "direct"}, {"method": "direct", "linking": "disaggregated"}, {"method": "auto"},
], ids=["colgen", "direct", "direct-disaggregated", "auto"])
def test_case_file_lower_bounds_kept(kw):
    """The column-generation path used to drop the lower bounds here (objective 1.074) instead of finding the one
    assignment that meets them."""
    d, inst, bf = load_case()
    r = solve_milp(SolverInput(inst["loss"], cost_rows(inst), layer_of_head=inst["layer_of_head"], K=inst["K"],
                               lower_fraction=d["lower_fraction"]), MilpOptions(**kw))
    assert not r.lower_relaxed, f"{r.solver}: lower bounds dropped, objective {r.objective}"
    assert r.status == "optimal"
    assert r.objective == pytest.approx(d["expected"]["objective"], rel=1e-9)
    assert r.assignment.tolist() == d["expected"]["assignment"]
    check_against_brute_force(inst, 1e-9, bf=bf, **kw)


# ------------------------------------------------------------------------------------------------ property tests
GAPS = (1e-9, 1e-4, 1e-2)
N_MAIN = 200  # instances per main path (direct, K=1, column generation); half for the disaggregated direct model
N_SIDE = 40  # per forced side path (heuristic pricing, colgen without a plan, colgen with an open gap)


def run_path(seed: int, n: int, shapes: str, Ks, groups_every: int = 0, dup_every: int = 0, **kw) -> Counter:
    taken = Counter()
    rng = np.random.default_rng(seed + 1)
    for i, inst in enumerate(instances(seed, n, shapes, Ks, groups_every)):
        if dup_every and i % dup_every == 0 and inst["C"] <= 4 and inst["H"] <= 6:
            inst = with_duplicate_candidate(inst, rng)
        relax = not (i % 7 == 3)  # now and then: lower bounds must hold or the solve fails
        taken[check_against_brute_force(inst, GAPS[i % len(GAPS)], relax_lower=relax, **kw)] += 1
    return taken


def test_bruteforce_direct():
    taken = run_path(100, N_MAIN, "any", [None, 2, 3], groups_every=5, dup_every=9, method="direct")
    assert taken["highs-milp"] >= 0.6 * N_MAIN, taken


def test_bruteforce_direct_disaggregated():
    taken = run_path(200, N_MAIN // 2, "k_binds", [2, 3], groups_every=5, method="direct", linking="disaggregated")
    assert taken["highs-milp"] >= 0.3 * N_MAIN, taken


def test_bruteforce_k1():
    taken = run_path(300, N_MAIN, "any", [1], groups_every=5, dup_every=9, method="auto")
    assert taken["highs-milp (K=1 per layer)"] >= 0.5 * N_MAIN, taken


def test_bruteforce_colgen():
    taken = run_path(400, N_MAIN, "k_binds", [2], groups_every=5, dup_every=9, method="colgen")
    assert taken["highs-colgen"] >= 0.5 * N_MAIN, taken


def test_bruteforce_colgen_heuristic_pricing(monkeypatch):
    """K-subsets too many to enumerate: greedy pricing, the bound certified by the per-layer pricing MILP."""
    monkeypatch.setattr(pricing_mod, "MAX_ENUM", 0)
    taken = run_path(500, N_SIDE, "k_binds", [2], groups_every=5, method="colgen")
    assert taken["highs-colgen"] >= N_SIDE // 2, taken


def test_bruteforce_colgen_without_integer_solution_falls_back(monkeypatch):
    """Column generation that finds no integer plan proves nothing: the direct model decides."""
    def no_plan(*args, **kw):
        return None, "time_limit", None, -np.inf, {"method": "colgen", "columns": 0}

    monkeypatch.setattr(milp_mod, "solve_colgen", no_plan)
    taken = run_path(600, N_SIDE, "k_binds", [2], groups_every=5, method="colgen")
    assert taken["highs-milp"] >= N_SIDE // 2, taken


def test_bruteforce_colgen_open_gap_closed_by_direct(monkeypatch):
    """A colgen plan without a certified gap is refined by the direct model's branch and bound."""
    real = milp_mod.solve_colgen

    def uncertified(*args, **kw):
        a, status, gap, lb, info = real(*args, **kw)
        return a, ("feasible" if a is not None else status), None, -np.inf, info

    monkeypatch.setattr(milp_mod, "solve_colgen", uncertified)
    taken = run_path(700, N_SIDE, "k_binds", [2], groups_every=5, method="colgen")
    assert taken["highs-colgen"] >= N_SIDE // 2, taken


def test_bruteforce_enumeration_self_check():
    """The K-filtered enumeration is exactly the full enumeration less the assignments over the K limit."""
    lay = np.repeat(np.arange(2), 3)
    full = all_assignments(6, 4)
    keep = np.ones(len(full), dtype=bool)
    for layer in range(2):
        keep &= np.array([len(set(a)) <= 2 for a in full[:, lay == layer].tolist()])
    filtered = all_assignments(6, 4, lay, 2)
    assert sorted(map(tuple, filtered.tolist())) == sorted(map(tuple, full[keep].tolist()))


def test_greedy_says_when_it_misses_the_lower_bounds():
    """The greedy fallback does not enforce lower bounds: its result says so whenever its plan misses them."""
    from search_space.greedy import solve_greedy

    seen = Counter()
    for inst in instances(800, 60, "any", [None, 1, 2]):
        try:
            g = solve_greedy(SolverInput(inst["loss"], cost_rows(inst),
                                         layer_of_head=inst["layer_of_head"], K=inst["K"]))
        except CompressError:
            assert brute_force(inst, lower=False)[0] == 0
            continue
        if g.status != "greedy":
            continue
        assert independent_check(inst, g.assignment, lower=False)[0]
        meets_lower = independent_check(inst, g.assignment, lower=True)[0]
        assert g.lower_relaxed == (not meets_lower) and bool(g.lower_relaxed_reason) == g.lower_relaxed
        seen[g.lower_relaxed] += 1
    assert seen[True] and seen[False], seen
