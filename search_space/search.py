"""`compress search`: profile + budgets -> plan.

    result = search("out/profile", "density@4096=0.5", SearchArgs(K=2))
    result.plan            # plans.schema.Plan (source="search"), predicted density/KV density/loss per length
    result.solver          # MilpResult: status, MIP gap, time

One problem (:mod:`search_space.problem`: candidates, per-head losses and costs for the given granularity and
sinks) solved by the MILP (:mod:`search_space.milp`, or the greedy solver): one candidate per head under every
budget with at most K distinct candidates per layer. With ``trials > 0`` an Optuna study
(:mod:`search_space.study`) searches what the MILP can't (budget split, K, sink, granularity, length weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from plans.identity import ModelIdentity
from plans.schema import Plan
from profilers.profile_format import Profile, normalize_profile
from search_space.args import SearchArgs
from search_space.candidates import Candidate
from search_space.keep_dense import check_kept_dense, force_dense
from search_space.milp import MilpResult
from search_space.outputs import write_outputs
from search_space.problem import SearchProblem, as_profile, build_problem, solve_problem
from search_space.study import StudyConfig, StudyResult, run_study

__all__ = ["SearchArgs", "SearchResult", "search", "write_outputs", "build_problem", "solve_problem", "SearchProblem"]


@dataclass
class SearchResult:
    plan: Plan
    solver: MilpResult
    problem: SearchProblem
    files: dict = field(default_factory=dict)
    study: StudyResult | None = None  # when trials > 0

    @property
    def candidates(self) -> list[Candidate]:
        return self.problem.candidates


def search(profile: Profile | str | Path, budgets, args: SearchArgs = SearchArgs(), *,
           out_dir: str | Path | None = None, evaluate: Callable[[Plan], dict] | None = None,
           model: ModelIdentity | None = None) -> SearchResult:
    """Search a plan for ``profile`` under ``budgets`` (strings like ``"density@4096=0.5"``, Budget objects, a number)
    with :class:`SearchArgs` ``args``. ``evaluate(plan) -> {"loss", "latency_ms"}`` scores study trials (None:
    predicted values); ``model`` is checked against the profile's model. With ``trials > 0`` runs the Optuna study
    and returns its chosen plan. With ``out_dir`` writes ``plan.json`` and ``spans.png`` there (plus the study's
    files). Raises CompressError for budgets no plan meets, a profile of another model, or bad settings."""
    a = args
    granularity, K, sinks, lengths, solver, time_limit = a.granularity, a.K, a.sinks, a.lengths, a.solver, a.time_limit
    latency_table, trials, seed, grid, normalize = a.latency_table, a.trials, a.seed, a.grid, a.normalize
    lower_fraction, objective_weights, keep_dense = a.lower_fraction, a.objective_weights, tuple(a.keep_dense)
    storage, study_name, resume = a.storage, a.study_name, a.resume
    profile = normalize_profile(as_profile(profile), normalize)
    if trials and trials > 0:
        st = run_study(profile, budgets, StudyConfig(
            trials=trials, evaluate=evaluate, seed=seed, storage=storage, study_name=study_name, resume=resume,
            out_dir=out_dir, sinks=sinks, lengths=lengths, latency_table=latency_table, time_limit=time_limit,
            model=model, grid=grid, lower_fraction=lower_fraction, solver=solver, keep_dense=tuple(keep_dense),
        ))
        check_kept_dense(st.plan, keep_dense)
        return SearchResult(plan=st.plan, solver=st.solver, problem=st.problem, files=st.files, study=st)
    problem = build_problem(
        profile, budgets, granularity=granularity, sinks=sinks, lengths=lengths, latency_table=latency_table,
        grid=grid, model=model,
    )
    if keep_dense:
        problem = force_dense(problem, keep_dense)
    res = solve_problem(problem, K=K, solver=solver, time_limit=time_limit, objective_weights=objective_weights,
                        lower_fraction=lower_fraction)
    plan = problem.plan(res.assignment, res)
    check_kept_dense(plan, keep_dense)
    files = {}
    if out_dir is not None:
        files = write_outputs(plan, out_dir)
    return SearchResult(plan=plan, solver=res, problem=problem, files=files)
