"""The Optuna study around the MILP: it chooses what the MILP can't, the MILP makes the exact assignment.

Each trial picks
- ``granularity`` (kv_head / query_head; kv_head only for MHA models),
- ``K`` (distinct candidates per layer) from ``Ks``,
- ``sink`` among the profiled sink sizes,
- a scale in ``[scale_min, 1]`` for every (budget, length): the split of the user's budget across lengths
  (never below what the cheapest candidates reach, so every trial is feasible),
- a weight in ``[0.1, 1]`` per profiled length for the MILP objective (when there are several),

solves the MILP, and scores the plan with ``evaluate(plan) -> {"loss": float, "latency_ms": float}`` (the lead
wires measured validation loss at an unseen longer length and measured latency). Without ``evaluate``: the
predicted loss fraction averaged over profiled lengths, and the table latency at the latency budget's length
(else the longest target length; without a table, the prefill density there as a relative latency, dense = 1).

Two objectives (loss, latency), both minimised; a latency budget is an Optuna constraint (``latency - budget
<= 0``). Storage: ``sqlite:///<out_dir>/optuna.db`` by default, any RDB URL via ``storage``; ``resume=True``
continues a stored study, and workers on many machines may run it at once (heartbeats, per-trial seeds, each
worker waits for the others' running trials before choosing; see :mod:`search_space.storage`). Writes
``pareto.csv`` (Pareto-optimal feasible trials), ``trials.csv`` (all),
``plan.json`` (lowest loss among feasible Pareto trials), ``pareto.png`` and ``spans.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from plans.atomic import write_text_atomic
from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.io import plan_from_dict
from plans.schema import Budget, Plan
from profilers.profile_format import Profile
from profilers.progress import progress as progress_helper
from search_space.budgets import expand_budgets, parse_budgets
from search_space.candidates import Candidate
from search_space.costs import LatencyTable
from search_space.milp import MilpResult
from search_space.outputs import write_outputs
from search_space.pareto import non_dominated
from search_space.plots import pareto_plot
from search_space.keep_dense import force_dense
from search_space.problem import SearchProblem, as_profile, build_problem, solve_problem


def _native_constraints() -> bool:
    try:
        import optuna

        return hasattr(optuna.trial.Trial, "set_constraint")
    except ImportError:
        return False


_NATIVE_CONSTRAINTS = _native_constraints()


@dataclass
class StudyConfig:
    """How the study runs: its trials and their scoring, its storage, and what each trial may choose."""

    trials: int
    evaluate: Callable[[Plan], dict] | None = None  # plan -> {"loss", "latency_ms"}; None: predicted values
    seed: int = 0
    storage: str | None = None  # an Optuna RDB URL; None: sqlite in out_dir (or in memory without out_dir)
    study_name: str | None = None  # None: "compress-search"
    resume: bool = False  # continue the stored study of that name
    out_dir: str | Path | None = None
    sinks: Sequence[int] | None = None  # sink choices; None: the profiled sink sizes
    lengths: Sequence[int] | None = None  # target lengths; None: the profiled lengths
    latency_table: LatencyTable | str | Path | None = None
    time_limit: float = 60.0  # per MILP
    model: ModelIdentity | None = None  # checked against the profile's model
    grid: str | Sequence[Candidate] = "auto"
    lower_fraction: float = 0.9
    solver: str = "milp"
    Ks: Sequence[int] = (1, 2, 3, 4)
    granularities: Sequence[str] | None = None  # None: both for a GQA model, kv_head for MHA
    scale_min: float = 0.5
    sampler: str = "tpe"  # tpe | nsga2
    progress: bool = True
    keep_dense: Sequence[tuple[int, int]] = ()  # (layer, KV head) pairs every trial keeps dense (retrieval heads)


@dataclass
class TrialRow:
    """One completed trial, as pareto.csv / trials.csv list it."""

    trial: int
    loss: float
    latency: float
    feasible: bool
    density: dict  # {str(N): predicted density}
    kv_density: dict  # {str(N): predicted KV density}
    K: int | None
    sink: int | None
    granularity: str | None
    solver_status: str | None
    pareto: bool = False
    chosen: bool = False


@dataclass
class StudyResult:
    study: object  # optuna.Study
    plan: Plan
    chosen_trial: int
    solver: MilpResult
    problem: SearchProblem  # of the chosen trial's (granularity, sink)
    rows: list[TrialRow] = field(default_factory=list)  # one per completed trial
    files: dict = field(default_factory=dict)


def default_storage(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'optuna.db'}"


def _latency_budget(budgets: Sequence[Budget]) -> Budget | None:
    """The latency budget the study's constraint uses: the one at the longest length (or the every-length one)."""
    lat = [b for b in budgets if b.kind == "latency_ms"]
    if not lat:
        return None
    return sorted(lat, key=lambda b: (b.length is not None, b.length or 0))[-1]


def run_study(profile: Profile | str | Path, budgets, config: StudyConfig) -> StudyResult:
    """Run (or resume) the study for ``profile`` under ``budgets`` and return the chosen trial's plan.

    Steps: check the inputs and open the storage; build the trials' search space; create the Optuna study and
    run ``config.trials`` trials; collect the completed ones (with a stored study: every worker's), mark the
    feasible Pareto front and choose its lowest-loss plan; write the files when ``config.out_dir`` is set.
    """
    import optuna  # noqa: F401  (a missing optuna fails here, before anything is checked or written)

    profile = as_profile(profile)
    user_budgets = parse_budgets(budgets)
    if not user_budgets:
        raise CompressError("no budget given; e.g. --budget 0.5 or --budget density@4096=0.25")
    if config.model is not None:
        profile.meta.model.check_matches(config.model, "profile")
    latency_table = config.latency_table
    if isinstance(latency_table, (str, Path)):
        latency_table = LatencyTable.load(latency_table)
    if config.trials < 1:
        raise CompressError(f"trials must be >= 1, got {config.trials}")
    out = Path(config.out_dir) if config.out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    url, storage, study_name = _open_storage(config, out)
    space = _TrialSpace(profile, user_budgets, config, latency_table)
    study = _create_study(config, storage, study_name, space, user_budgets)
    with progress_helper("search", total=config.trials, unit="trials", enabled=config.progress) as tick:
        study.optimize(space.objective, n_trials=config.trials, catch=(), callbacks=[lambda _study, _trial: tick()])
    return _choose_and_write(study, storage is not None, space, config, out, url)


def _choose_and_write(study, shared: bool, space: "_TrialSpace", config: StudyConfig, out: Path | None,
                      url: str | None) -> StudyResult:
    """Choose the plan among all completed trials and write the files. With a stored study (``shared``: other
    workers may run it too) first wait for the trials they are running, and choose again whenever trials appeared
    meanwhile: whichever worker writes last writes the best feasible trial of the whole study."""
    from search_space.storage import others_running, wait_for_running

    say = (lambda nums: sys.stderr.write(f"search: waiting for trials {nums} of other workers\n")) \
        if config.progress else None
    while True:
        if shared:
            wait_for_running(study, on_wait=say)
        seen = len(study.get_trials(deepcopy=False))
        rows = _collect_rows(study)
        pareto, chosen = _choose(rows, len(study.trials))
        ft = study.trials[chosen.trial]
        plan = plan_from_dict(json.loads(ft.user_attrs["plan"]), f"trial {ft.number}")
        files: dict = {}
        if out is not None:
            files = _write_files(out, rows, pareto, chosen, plan, config, space, url)
        if not shared or (len(study.get_trials(deepcopy=False)) == seen and not others_running(study)):
            break
    return StudyResult(study=study, plan=plan, chosen_trial=chosen.trial, solver=_solver_result(ft),
                       problem=space.problem(chosen.granularity, chosen.sink), rows=rows, files=files)


def _open_storage(config: StudyConfig, out: Path | None) -> tuple[str | None, object, str]:
    """(storage URL, the opened storage, study name); without ``resume`` a study of that name must not exist there
    yet. The storage has heartbeats, so many workers can share it (see :mod:`search_space.storage`)."""
    import optuna

    from search_space.storage import open_storage, redacted

    url = config.storage
    if url is None and out is not None:
        url = default_storage(out)
    study_name = config.study_name or "compress-search"
    if url is None:
        return None, None, study_name
    storage = open_storage(url)
    if not config.resume:
        try:
            names = optuna.study.get_all_study_names(storage)
        except Exception as e:  # noqa: BLE001 -- the database went away, or its tables are not Optuna's
            raise CompressError(f"optuna storage {redacted(url)} cannot be read: {e}") from None
        if study_name in names:
            raise CompressError(
                f"study {study_name!r} already exists in {redacted(url)}; pass resume=True (--resume) to continue "
                "it, or choose another study name / output folder"
            )
    return url, storage, study_name


class _TrialSpace:
    """The study's trials: what each one chooses, the problem it solves (built once per (granularity, sink)) and
    how its plan is scored. Building it builds the first problems (one per sink) for the budget-scale floors."""

    def __init__(self, profile: Profile, user_budgets: list[Budget], config: StudyConfig, latency_table):
        self.profile, self.user_budgets, self.config, self.latency_table = profile, user_budgets, config, latency_table
        ident = profile.meta.model
        self.grans = (list(config.granularities) if config.granularities
                      else (["kv_head", "query_head"] if ident.group_size > 1 else ["kv_head"]))
        self.sink_choices = list(config.sinks) if config.sinks else list(profile.meta.sink_sizes)
        self._problems: dict = {}
        self.base = self.problem(self.grans[0], self.sink_choices[0])
        self.pairs = [(b.kind, n) for b, n in expand_budgets(self.user_budgets, self.base.lengths)]
        lat_b = _latency_budget(self.user_budgets)
        self.lat_budget = None if lat_b is None else lat_b.value
        n_max = max(self.base.lengths)
        self.n_lat = lat_b.length if (lat_b is not None and lat_b.length) else n_max  # predicted latency is read here
        self.scale_lo = self._scale_floors()

    def problem(self, gran: str, sink: int) -> SearchProblem:
        key = (gran, sink)
        if key not in self._problems:
            c = self.config
            prob = build_problem(self.profile, self.user_budgets, granularity=gran, sinks=[sink], lengths=c.lengths,
                                 latency_table=self.latency_table, grid=c.grid, model=c.model)
            self._problems[key] = force_dense(prob, c.keep_dense) if c.keep_dense else prob
        return self._problems[key]

    def _scale_floors(self) -> dict:
        """A budget may not be scaled below what the cheapest candidates reach (with every sink choice)."""
        scale_lo = {}
        for k, n in self.pairs:
            need = 0.0
            for sk in self.sink_choices:
                for r in self.problem(self.grans[0], sk).rows(None, 0.0):
                    if r.kind == k and r.length == n:
                        need = max(need, r.min_total() / r.upper)
            scale_lo[(k, n)] = min(1.0, max(self.config.scale_min, need * 1.001))
        return scale_lo

    def objective(self, trial) -> tuple[float, float]:
        """One trial: choose, solve, score; (loss, latency)."""
        import optuna

        from search_space.storage import WORKER_ATTR, worker_id

        c = self.config
        trial.set_user_attr(WORKER_ATTR, worker_id())  # other workers wait for this trial before choosing
        gran = trial.suggest_categorical("granularity", self.grans)
        K = trial.suggest_categorical("K", list(c.Ks))
        sink = trial.suggest_categorical("sink", self.sink_choices)
        scale = {(k, n): trial.suggest_float(f"scale:{k}@{n}", self.scale_lo[(k, n)], 1.0) for k, n in self.pairs}
        weights = None
        if len(self.base.profiled) > 1:
            weights = {n: trial.suggest_float(f"weight@{n}", 0.1, 1.0) for n in self.base.profiled}
        prob = self.problem(gran, sink)
        try:
            res = solve_problem(prob, K=K, solver=c.solver, time_limit=c.time_limit, objective_weights=weights,
                                budget_scale=scale, lower_fraction=c.lower_fraction)
        except CompressError as e:
            trial.set_user_attr("error", str(e))
            raise optuna.TrialPruned(str(e)) from None
        plan = prob.plan(res.assignment, res, budgets=self.user_budgets)
        plan.predicted.solver["budget_scale"] = {f"{k}@{n}": round(v, 6) for (k, n), v in scale.items()}
        if weights:
            plan.predicted.solver["objective_weights"] = {str(n): round(w, 6) for n, w in weights.items()}
        loss, latency = self._score(plan, prob, res)
        self._record(trial, plan, res, latency)
        return loss, latency

    def _score(self, plan: Plan, prob: SearchProblem, res: MilpResult) -> tuple[float, float]:
        """(loss, latency): measured by ``evaluate``, else predicted."""
        if self.config.evaluate is not None:
            m = self.config.evaluate(plan)
            if not isinstance(m, dict) or "loss" not in m or "latency_ms" not in m:
                raise CompressError(f"evaluate(plan) must return a dict with loss and latency_ms, got {m!r}")
            plan.predicted.validation = {k: v for k, v in m.items() if isinstance(v, (int, float, str))}
            return float(m["loss"]), float(m["latency_ms"])
        fr = [prob.loss_fraction(res.assignment, n) for n in prob.profiled]
        loss = float(np.mean(fr))
        n_lat = self.n_lat
        latency = float(prob.latency_ms(res.assignment, n_lat)) if prob.latency_table else float(plan.density(n_lat))
        return loss, latency

    def _record(self, trial, plan: Plan, res: MilpResult, latency: float) -> None:
        """The trial's constraint and what the study reads back (plan, assignment, solver, densities)."""
        constraint = [latency - self.lat_budget] if self.lat_budget is not None else [0.0]
        trial.set_user_attr("constraint", constraint)
        if self.lat_budget is not None and _NATIVE_CONSTRAINTS:
            trial.set_constraint("latency", constraint[0])
        trial.set_user_attr("plan", plan.model_dump_json())
        trial.set_user_attr("assignment", [int(a) for a in res.assignment])
        trial.set_user_attr("solver", res.summary())
        trial.set_user_attr("density", {str(n): v for n, v in plan.predicted.density.items()})
        trial.set_user_attr("kv_density", {str(n): v for n, v in plan.predicted.kv_density.items()})


def _constraints_func(ft):
    return ft.user_attrs.get("constraint", [0.0])


def _create_study(config: StudyConfig, storage, study_name: str, space: _TrialSpace,
                  user_budgets: list[Budget]):
    """The Optuna study (new, or the stored one with ``resume``) in the opened ``storage`` (None: in memory), its
    sampler seeded per trial number; a resumed study must keep its budgets."""
    import optuna

    from search_space.storage import PerTrialSeedSampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna >= 5 takes constraints from trial.set_constraint; older versions through the sampler's constraints_func
    cf = _constraints_func if (space.lat_budget is not None and not _NATIVE_CONSTRAINTS) else None
    if config.sampler == "tpe":
        make = lambda s: optuna.samplers.TPESampler(seed=s, constraints_func=cf)  # noqa: E731
    elif config.sampler in ("nsga2", "nsgaii"):
        make = lambda s: optuna.samplers.NSGAIISampler(seed=s, constraints_func=cf)  # noqa: E731
    else:
        raise CompressError(f"unknown sampler {config.sampler!r}: use tpe or nsga2")
    # trial k draws with seed + k: workers sharing the study never repeat a draw, a resumed study never replays one
    smp = PerTrialSeedSampler(make, config.seed)
    study = optuna.create_study(
        storage=storage, study_name=study_name, directions=["minimize", "minimize"], sampler=smp,
        load_if_exists=config.resume,
    )
    stored = study.user_attrs.get("budgets")
    mine = [b.model_dump() for b in user_budgets]
    if stored is not None and stored != mine:
        raise CompressError(f"study {study_name!r} was run with budgets {stored}, not {mine}; use another study name")
    study.set_user_attr("budgets", mine)
    study.set_user_attr("model", space.profile.meta.model.model_dump())
    return study


def _collect_rows(study) -> list[TrialRow]:
    """One row per completed trial."""
    import optuna

    rows = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.COMPLETE or t.values is None:
            continue
        c = t.user_attrs.get("constraint", [0.0])
        rows.append(TrialRow(
            trial=t.number, loss=t.values[0], latency=t.values[1], feasible=all(v <= 0 for v in c),
            density=t.user_attrs.get("density", {}), kv_density=t.user_attrs.get("kv_density", {}),
            K=t.params.get("K"), sink=t.params.get("sink"), granularity=t.params.get("granularity"),
            solver_status=t.user_attrs.get("solver", {}).get("status"),
        ))
    return rows


def _choose(rows: list[TrialRow], n_trials: int) -> tuple[list[TrialRow], TrialRow]:
    """(the feasible Pareto front, its lowest-loss trial); marks ``pareto`` and ``chosen`` on every row."""
    feas = [r for r in rows if r.feasible]
    if not feas:
        raise CompressError(
            f"no trial produced a feasible plan ({len(rows)} completed of {n_trials}); "
            "raise the budgets or run more trials"
        )
    keep = non_dominated([[r.loss, r.latency] for r in feas])
    pareto = [feas[i] for i in keep]
    for r in rows:
        r.pareto = any(r is p for p in pareto)
    chosen = min(pareto, key=lambda r: (r.loss, r.latency))
    for r in rows:
        r.chosen = r is chosen
    return pareto, chosen


def _solver_result(ft) -> MilpResult:
    """The chosen trial's solver summary as a MilpResult."""
    summ = ft.user_attrs.get("solver", {})
    return MilpResult(
        assignment=np.array(ft.user_attrs["assignment"], dtype=np.int64), status=summ.get("status", "?"),
        objective=summ.get("objective", math.nan), mip_gap=summ.get("mip_gap"), time_s=summ.get("time_s", 0.0),
        solver=summ.get("name", "highs-milp"),
    )


def _write_files(out: Path, rows: list[TrialRow], pareto: list[TrialRow], chosen: TrialRow, plan: Plan,
                 config: StudyConfig, space: _TrialSpace, storage: str | None) -> dict:
    """pareto.csv, trials.csv, plan.json, spans.png, pareto.png (and the SQLite file's path)."""
    files: dict = {}
    lengths_all = sorted({int(n) for r in rows for n in r.density})
    files["pareto_csv"] = write_text_atomic(out / "pareto.csv", trials_csv(pareto, lengths_all))
    files["trials_csv"] = write_text_atomic(out / "trials.csv", trials_csv(rows, lengths_all))
    files.update(write_outputs(plan, out))
    measured = config.evaluate is not None or space.latency_table is not None
    lat_label = "latency (ms)" if measured else f"prefill density at N={space.n_lat} (relative latency)"
    files["pareto_png"] = pareto_plot(
        [r.loss for r in rows], [r.latency for r in rows], [i for i, r in enumerate(rows) if r.pareto],
        out / "pareto.png", chosen=rows.index(chosen), feasible=[r.feasible for r in rows], xlabel=lat_label,
        ylabel="validation loss" if config.evaluate is not None else "predicted loss fraction",
    )
    if storage and storage.startswith("sqlite:///"):
        files["optuna_db"] = Path(storage[len("sqlite:///"):])
    return files


def trials_csv(rows: list[TrialRow], lengths: list[int]) -> str:
    """The CSV of ``rows``, lowest loss first."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "loss", "latency", *[f"density@{n}" for n in lengths], *[f"kv_density@{n}" for n in lengths],
                "K", "sink", "granularity", "feasible", "pareto", "chosen", "solver_status"])
    for r in sorted(rows, key=lambda r: (r.loss, r.latency)):
        w.writerow([
            r.trial, f"{r.loss:.6g}", f"{r.latency:.6g}",
            *[r.density.get(str(n), "") for n in lengths], *[r.kv_density.get(str(n), "") for n in lengths],
            r.K, r.sink, r.granularity, int(r.feasible), int(r.pareto), int(r.chosen), r.solver_status or "",
        ])
    return buf.getvalue()
