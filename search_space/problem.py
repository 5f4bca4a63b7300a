"""One search problem: candidates, per-head losses and budget rows for a (granularity, sinks) choice, and its solve.

    problem = build_problem(profile, "density@4096=0.5", granularity="kv_head")
    result = solve_problem(problem, K=2)       # MilpResult (result.K = 2)
    plan = problem.plan(result.assignment, result)

Candidates come from the profile's lengths and sink sizes (:mod:`search_space.candidates`); per (length,
candidate) the predicted loss of every head is ``Profile.masked_loss`` (dense = 0) and its costs come from
:mod:`search_space.costs`; the MILP (:mod:`search_space.milp`, or the greedy solver) picks one candidate per head
under every budget with at most K distinct candidates per layer.

Decision heads are the model's KV heads (``granularity="kv_head"``, influence summed over each group's query
heads) or its query heads (``"query_head"``; a KV-density or latency budget then charges each GQA group its
widest member).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.schema import Budget, LayerPlan, Plan, Predictions
from plans.span import split_span
from profilers.profile_format import Profile, load_profile
from search_space.budgets import expand_budgets, format_budget, parse_budgets
from search_space.candidates import Candidate, candidate_grid
from search_space.cost_rows import CostRow, SolverInput
from search_space.costs import LatencyTable, density_costs, kv_density_costs
from search_space.greedy import solve_greedy
from search_space.milp import MilpOptions, MilpResult, solve_milp

Granularity = Literal["kv_head", "query_head"]


@dataclass
class SearchProblem:
    """Everything the solvers need, in decision-head order (layer-major: index = layer * heads + head)."""

    profile_meta: object
    granularity: str
    candidates: list[Candidate]
    lengths: list[int]  # target lengths (budgets, predictions)
    profiled: list[int]  # lengths with a loss
    n_layers: int
    heads: int  # decision heads per layer
    group_size: int
    layer_of_head: np.ndarray
    kv_group: np.ndarray  # global KV head id of each decision head
    loss: dict  # {N: [H, C]}
    total: dict  # {N: total influence (loss of masking everything)}
    budgets: list[Budget]
    latency_table: LatencyTable | None = None

    def rows(self, scale: dict | None = None, lower_fraction: float = 0.9) -> list[CostRow]:
        """Budget rows; ``scale[(kind, N)]`` multiplies a budget (the study's budget split)."""
        H = len(self.layer_of_head)
        out = []
        for b, n in expand_budgets(self.budgets, self.lengths):
            s = 1.0 if not scale else float(scale.get((b.kind, n), 1.0))
            key = format_budget(Budget(kind=b.kind, value=b.value, length=n))
            group = None
            if b.kind == "density":
                cost = np.tile(density_costs(self.candidates, n), (H, 1))
                upper, disp, unit = b.value * s * H, H, ""
            elif b.kind == "kv_density":
                cost = np.tile(kv_density_costs(self.candidates, n), (H, 1))
                if self.granularity == "query_head" and self.group_size > 1:
                    group = self.kv_group
                    n_kv = len(np.unique(self.kv_group))
                    upper, disp = b.value * s * n_kv, n_kv
                else:
                    upper, disp = b.value * s * H, H
                unit = ""
            else:  # latency_ms
                if self.latency_table is None:
                    raise CompressError(
                        f"budget {key} needs a latency table (pass latency_table=, or --latency-table from `compress bench`)"
                    )
                per_q = self.latency_table.costs(self.candidates, n)
                cost = np.tile(per_q * self.group_size, (H, 1))
                if self.granularity == "query_head" and self.group_size > 1:
                    group = self.kv_group
                upper, disp, unit = b.value * s, 1.0, " ms"
            out.append(CostRow(key=key, cost=cost, upper=upper, lower=None if group is not None else lower_fraction * upper,
                               group=group, length=n, display_scale=disp, unit=unit, kind=b.kind))
        return out

    def plan(self, assignment: np.ndarray, result: MilpResult | None = None, budgets: Sequence[Budget] | None = None) -> Plan:
        layers = []
        for li in range(self.n_layers):
            heads = [self.candidates[int(c)].to_pattern(floor_length=min(self.lengths))
                     for c in assignment[li * self.heads : (li + 1) * self.heads]]
            layers.append(LayerPlan(heads=heads))
        plan = Plan(
            source="search", model=self.profile_meta.model, granularity=self.granularity, lengths=list(self.lengths),
            budgets=list(budgets if budgets is not None else self.budgets), layers=layers,
        )
        idx = np.arange(len(assignment))
        plan.predicted = Predictions(
            density={n: round(plan.density(n), 6) for n in self.lengths},
            kv_density={n: round(plan.kv_density(n), 6) for n in self.lengths},
            loss={n: float(self.loss[n][idx, assignment].sum()) for n in self.profiled},
            latency_ms={n: round(self.latency_ms(assignment, n), 4) for n in self.lengths} if self.latency_table else {},
            solver={} if result is None else {**result.summary(), "candidates": len(self.candidates), "K": result.K},
            # an extra field (not in the schema): str keys, as they read back from JSON
            loss_fraction={str(n): self.loss_fraction(assignment, n) for n in self.profiled},
        )
        return plan

    def loss_fraction(self, assignment: np.ndarray, n: int) -> float:
        """Predicted masked influence / total influence at profiled length n."""
        v = float(self.loss[n][np.arange(len(assignment)), assignment].sum())
        return v / self.total[n] if self.total[n] > 0 else 0.0

    def latency_ms(self, assignment: np.ndarray, n: int) -> float:
        """Table latency at length n: sum over query heads (a GQA group at its widest member's span)."""
        per_q = self.latency_table.costs(self.candidates, n)
        t = per_q[assignment] * self.group_size
        if self.granularity == "query_head" and self.group_size > 1:
            return float(sum(t[self.kv_group == g].max() for g in np.unique(self.kv_group)))
        return float(t.sum())


def as_profile(profile: Profile | str | Path) -> Profile:
    """``profile`` itself, or the profile stored in that folder."""
    return profile if isinstance(profile, Profile) else load_profile(profile)


def build_problem(
    profile: Profile | str | Path,
    budgets,
    *,
    granularity: Granularity = "kv_head",
    sinks: Sequence[int] | None = None,
    lengths: Sequence[int] | None = None,
    latency_table: LatencyTable | str | Path | None = None,
    grid: "str | Sequence[Candidate]" = "auto",
    model: ModelIdentity | None = None,
) -> SearchProblem:
    """Candidates, per-head losses and the model geometry for one (granularity, sinks) choice."""
    profile = as_profile(profile)
    meta = profile.meta
    if model is not None:
        meta.model.check_matches(model, "profile")
    if not meta.complete:
        raise CompressError("the profile is incomplete (its profiling run did not finish); re-run `compress profile`")
    if granularity not in ("kv_head", "query_head"):
        raise CompressError(f"granularity must be kv_head or query_head, got {granularity!r}")
    budgets = parse_budgets(budgets)
    if not budgets:
        raise CompressError("no budget given; e.g. --budget 0.5 or --budget density@4096=0.25")
    if isinstance(latency_table, (str, Path)):
        latency_table = LatencyTable.load(latency_table)
    profiled = sorted(meta.lengths)
    if not profiled:
        raise CompressError("the profile has no lengths")
    target = sorted(set(int(n) for n in (lengths or profiled)) | {b.length for b in budgets if b.length is not None})
    if any(n <= 0 for n in target):
        raise CompressError(f"lengths must be positive, got {target}")
    sinks = list(sinks) if sinks else list(meta.sink_sizes)
    for s in sinks:
        if s != 0 and s not in meta.sink_sizes:
            raise CompressError(f"sink {s} was not profiled (profile sink sizes: {meta.sink_sizes})")
    extra = [n for n in target if n not in profiled]
    cands = candidate_grid(profiled, extra, block=meta.block, sinks=sinks, grid=grid)
    ident = meta.model
    L = ident.num_layers
    heads = ident.num_kv_heads if granularity == "kv_head" else ident.num_heads
    G = ident.group_size
    loss, total = _losses(profile, cands, profiled, "kv" if granularity == "kv_head" else "q", L, heads)
    layer_of_head = np.repeat(np.arange(L), heads)
    if granularity == "kv_head":
        kv_group = np.arange(L * heads)
    else:
        kv_group = layer_of_head * ident.num_kv_heads + np.tile(np.arange(heads), L) // G
    return SearchProblem(
        profile_meta=meta, granularity=granularity, candidates=cands, lengths=target, profiled=profiled,
        n_layers=L, heads=heads, group_size=G, layer_of_head=layer_of_head, kv_group=kv_group, loss=loss,
        total=total, budgets=budgets, latency_table=latency_table,
    )


def _losses(profile: Profile, cands: list[Candidate], profiled: list[int], per: str, L: int, heads: int):
    """({N: [L*heads, C] predicted loss of each head under each candidate}, {N: total influence})."""
    loss, total = {}, {}
    for n in profiled:
        cols = []
        d = profile.dist(n, per)
        if tuple(d.shape[:2]) != (L, heads):
            raise CompressError(f"profile tensor dist.{per}.{n} has shape {tuple(d.shape)}, expected [{L}, {heads}, ...]")
        for c in cands:
            if c.kind == "dense":
                cols.append(np.zeros(L * heads))
                continue
            sink_eff, window = split_span(c.span(n), c.sink)
            cols.append(profile.masked_loss(n, sink_eff, window, per).double().reshape(-1).numpy())
        m = np.stack(cols, 1)
        loss[n] = np.clip(m, 0.0, None)
        total[n] = float(d.double().sum())
    return loss, total


def solve_problem(
    problem: SearchProblem,
    *,
    K: int | None = 2,
    solver: str = "milp",
    time_limit: float = 60.0,
    objective_weights: dict | None = None,
    budget_scale: dict | None = None,
    lower_fraction: float = 0.9,
) -> MilpResult:
    """Run the chosen solver on a built problem; ``milp`` falls back to greedy when HiGHS finds no solution in time."""
    rows = problem.rows(budget_scale, lower_fraction)
    weights = objective_weights or {n: 1.0 for n in problem.profiled}
    inp = SolverInput(problem.loss, rows, layer_of_head=problem.layer_of_head, K=K, objective_weights=weights,
                      lower_fraction=lower_fraction)
    if solver == "greedy":
        res = solve_greedy(inp)
    elif solver == "milp":
        res = solve_milp(inp, MilpOptions(time_limit=time_limit))
        if not res.ok or res.no_solution:
            g = solve_greedy(inp)
            g.message = f"MILP {res.status}; greedy fallback. " + g.message
            res = g
    else:
        raise CompressError(f"unknown solver {solver!r}: use milp or greedy")
    if res.status == "infeasible":
        raise CompressError("no assignment meets the budgets with at most K distinct candidates per layer; raise K or the budgets")
    res.K = K
    return res
