"""The stages of attention-compressor and the Python API behind the CLI.

Each stage is one function of an already loaded model, with a typed ``*Args`` dataclass (defaults and checks,
owned by the stage's module) and a typed result:

    calibration(tok, CalibrationArgs, name, model)        -> {N: [Sample]}          profilers.data.calibration
    influence(model, data, out, InfluenceArgs, name)       -> Profile                compressor.influence_profile
    retrieval(model, tok, RetrievalArgs)                   -> RetrievalScores        compressor.retrieval_profile
    make_plan(PlanArgs, profile, retrieval, ident, ...)    -> PlanResult             search_space.search / keep_dense
    evaluation.evaluate(model, tok, plans, EvalArgs)       -> EvalReport             compressor.evaluation
    bench.bench(model, plan, BenchArgs)                    -> [MethodResult]         compressor.bench

The commands load the model by name, call those stages and write files; `compress run`
(:mod:`compressor.run`) composes the same stage functions, passing results in memory:

    compress plan show      show_plan              compress profile   profile
    compress plan uniform   make_uniform_plan      compress search    search (+ search_summary for --json)
    compress plan import    import_plan            compress run       compressor.run.run
    compress plan schema    plan_schema            compress distill   distill
    compress apply          apply_to_folder        compress eval      evaluate
    compress data build     build_calibration      compress bench     bench
    compress data show      show_calibration

User mistakes raise :class:`plans.errors.CompressError` (the CLI prints its message and exits 2). Heavy imports
(torch, transformers) happen inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compressor.models import apply_to_folder, save_patched  # noqa: F401  (`compress apply`; distill's folder)
from compressor.args import (BenchArgs, CalibrationArgs, EvalArgs, PlacementArgs, PlanArgs, ProfileArgs,
                             DEFAULT_SOURCES, PROFILE_METHODS)  # noqa: F401  (re-exported)
from plans.atomic import write_text_atomic
from plans.defaults import DEFAULT_SINK
from plans.errors import CompressError
from plans.identity import ModelIdentity, identity_from_config
from plans.importers import import_plan_file
from plans.io import load_plan, save_plan
from plans.schema import Plan, span_for_density, uniform_plan
from profilers.terminal import LiteralConsole

console = LiteralConsole(stderr=True)  # user text printed literally


def model_identity(model: str | None) -> ModelIdentity:
    """Identity of a model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    from compressor.models import resolve_model

    path = resolve_model(model)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise CompressError(f"cannot read the config of model {model!r}: {e}") from None
    return identity_from_config(cfg, name=str(model or "default"))


def make_uniform_plan(model: str | None, *, span: int | None = None, density: float | None = None,
                      length: int = 4096, sink: int = DEFAULT_SINK, granularity: str = "kv_head",
                      out: str | Path | None = None) -> Plan:
    """StreamingLLM baseline: one sink+window for every head, by span or by density at ``length``; written to
    ``out`` when given."""
    if (span is None) == (density is None):
        raise CompressError("give exactly one of --span or --density")
    ident = model_identity(model)
    if density is not None:
        span = span_for_density(density, length)
    if span < 1:
        raise CompressError(f"--span must be >= 1, got {span}")
    plan = uniform_plan(ident, span, sink=sink, granularity=granularity, lengths=[length])
    if out is not None:
        save_plan(plan, out)
    return plan


def import_plan(path: str | Path, model: str | None, *, out: str | Path | None = None, **kw) -> Plan:
    """A MoA or DuoAttention plan file as a Plan for ``model`` (``kw``: see :func:`plans.importers.import_plan_file`);
    written to ``out`` when given."""
    plan = import_plan_file(path, model_identity(model), **kw)
    if out is not None:
        save_plan(plan, out)
    return plan


# -- plan show / schema -------------------------------------------------------------------------------------------
@dataclass
class PlanView:
    """What `compress plan show` reports: the span of every head at length ``n`` and the densities."""

    plan: Plan
    n: int
    spans: list[list[str]]  # [layer][head]: the span as text
    summary: dict  # n, density, kv_density, granularity, source, model

    def layer_density(self, layer: int) -> float:
        """Mean prefill density of the layer's heads at ``n``."""
        from plans.span import prefill_density

        spans = self.plan.spans(layer, self.n)
        return sum(prefill_density(min(int(s), self.n), self.n) for s in spans) / len(spans)

    def to_dict(self) -> dict:
        return {**self.summary, "spans": self.spans}


def show_plan(plan_path: str | Path, n: int | None = None) -> PlanView:
    """The plan's spans at length ``n`` (default: its first length, else 4096) and its densities."""
    p = load_plan(plan_path)
    n = n or (p.lengths[0] if p.lengths else 4096)
    rows = [[p.describe_span(li, h, n) for h in range(p.heads_per_layer)] for li in range(len(p.layers))]
    summary = {"n": n, "density": p.density(n), "kv_density": p.kv_density(n), "granularity": p.granularity,
               "source": p.source, "model": p.model.model_dump()}
    return PlanView(p, n, rows, summary)


def plan_schema(out: str | Path | None = None) -> str:
    """The plan JSON Schema as text; written to ``out`` when given."""
    from plans.io import plan_json_schema

    text = json.dumps(plan_json_schema(), indent=2) + "\n"
    if out:
        write_text_atomic(out, text)
    return text


# -- calibration --------------------------------------------------------------------------------------------------
def calibration(tok, args: CalibrationArgs, model_name: str, model=None, cache: str | Path | None = None) -> dict:
    """The calibration samples {N: [Sample]} of ``args``, built or loaded from ``cache`` (default:
    $COMPRESS_HOME/calibration); ``model`` (loaded) answers the ``qa`` source when it is one of the sources."""
    from compressor.models import compress_home
    from profilers.data.calibration import get_or_build_calibration

    recipe = args.recipe(model_name)
    cache = cache or compress_home() / "calibration"
    return get_or_build_calibration(cache, tok, recipe, model=model if "qa" in recipe.sources else None)


def build_calibration(model: str | None = None, args: CalibrationArgs = CalibrationArgs(), *,
                      out: str | Path | None = None) -> tuple[Path, dict]:
    """Build (or load from the cache folder ``out``) a calibration set; returns (its folder, samples by length)."""
    from compressor.models import check_lengths_fit, compress_home, load_config, load_model
    from profilers.data.calibration import calibration_dir

    check_lengths_fit(load_config(model), args.lengths)  # before the model loads
    cache = out or compress_home() / "calibration"
    m, tok = load_model(model)
    data = calibration(tok, args, str(model or "default"), m, cache)
    return calibration_dir(cache, tok, args.recipe(str(model or "default"))), data


def show_calibration(path: str | Path) -> tuple[object, list[dict]]:
    """(recipe, one row per sample: n, i, source, loss_tokens, answer) of a calibration folder."""
    from profilers.data.calibration import load_calibration

    cs = load_calibration(path)
    rows = []
    for n, ss in sorted(cs.samples.items()):
        for i, smp in enumerate(ss):
            rows.append({"n": n, "i": i, "source": smp.meta.get("source", smp.meta.get("task", "?")),
                         "loss_tokens": int(smp.loss_mask.sum()), "answer": (smp.answer or "")[:40]})
    return cs.recipe, rows


# -- profile ------------------------------------------------------------------------------------------------------
def profile(out: str | Path = "profile", model: str | None = None, args: ProfileArgs = ProfileArgs(), *,
            placement: PlacementArgs = PlacementArgs(), on_sample=None):
    """Profile ``model`` into ``out``.safetensors / .json with :class:`compressor.args.ProfileArgs`: per-head
    influence from gradients (``influence``, MoA's first-order estimate), learned per-head gates (``gates``), or
    retrieval-head scores on held-in needle prompts (``retrieval``: the calibration lengths, samples and seed; see
    :mod:`compressor.retrieval_profile`). Returns the Profile (retrieval: the RetrievalScores).

    ``placement`` splits the model across devices (see :mod:`compressor.placement`). Under ``torchrun``
    (WORLD_SIZE > 1) the influence profile is data-parallel (:func:`_profile_data_parallel`). ``on_sample(N, k)``:
    see :func:`compressor.influence_profile.run_profile`. Raises CompressError for bad arguments or lengths past
    the model's positions (before the model loads)."""
    from compressor.distributed import world_size_from_env
    from compressor.models import load_model

    args.check()
    cal, name = args.calibration, str(model or "default")
    if not args.influence.allow_extrapolation:  # before the model loads
        from compressor.models import check_lengths_fit, load_config

        check_lengths_fit(load_config(model), cal.lengths)
    if world_size_from_env() > 1:
        if args.method not in ("influence", "taylor"):
            raise CompressError(f"data-parallel profiling (torchrun, --workers) is for --method influence, "
                                f"not {args.method}")
        return _profile_data_parallel(out, model, args, placement, on_sample)
    m, tok = load_model(model, **placement.kwargs())
    if args.method == "retrieval":
        from compressor.retrieval_profile import run_retrieval_profile
        from profilers.retrieval import save_retrieval

        scores = run_retrieval_profile(m, tok, retrieval_args(args))
        save_retrieval(scores, out)
        return scores
    data = calibration(tok, cal, name, m)
    if args.method == "gates":
        from compressor.gate_profile import run_gates

        return run_gates(m, data, out, args.gates, model_name=name)
    from compressor.influence_profile import run_profile

    return run_profile(m, data, out, args.influence, model_name=name, on_sample=on_sample)


def retrieval_args(args: ProfileArgs):
    """The retrieval scoring arguments of ``args``: its lengths, samples and seed from the calibration set."""
    from dataclasses import replace

    cal = args.calibration
    return replace(args.retrieval, lengths=tuple(cal.lengths), samples=cal.samples, seed=cal.seed)


def _profile_data_parallel(out, model: str | None, args: ProfileArgs, placement: PlacementArgs, on_sample):
    """One rank of ``torchrun --nproc-per-node P … profile``: join the process group (gloo on CPU, nccl with a
    GPU per rank), let rank 0 build (or load) the calibration set first, then profile with the samples split
    across ranks and the sums all-reduced (:func:`compressor.influence_profile.run_profile` with ``dp``); rank 0
    writes the profile (and the partial files a rerun resumes from)."""
    from compressor import distributed
    from compressor.influence_profile import run_profile
    from compressor.models import load_model

    place = placement.kwargs()
    with distributed.session() as dp:
        if place.get("offload_folder"):  # one offload folder per rank: ranks never write each other's files
            place = {**place, "offload_folder": str(Path(place["offload_folder"]) / f"rank{dp.rank}")}
        if not dp.is_main:
            dp.barrier()  # rank 0 builds the calibration set (the 'qa' source runs the model) and caches it
        m, tok = load_model(model, **place)
        data = calibration(tok, args.calibration, str(model or "default"), m)
        if dp.is_main:
            dp.barrier()
        if dp.device.type == "cuda" and not place:
            m.to(dp.device)
        return run_profile(m, data, out, args.influence, model_name=str(model or "default"), on_sample=on_sample,
                           dp=dp)


# -- plan (search) ------------------------------------------------------------------------------------------------
@dataclass
class PlanResult:
    """What :func:`make_plan` returns: the plan, the search behind it (None for the keep_dense shape), the files
    written, and how many KV heads were kept dense for retrieval."""

    plan: Plan
    search: object = None  # search_space.search.SearchResult for shape "search"
    files: dict | None = None
    kept_dense: int = 0

    @property
    def status(self) -> str:
        return self.search.solver.status if self.search is not None else "keep_dense"


def make_plan(args: PlanArgs, *, profile=None, retrieval=None, ident: ModelIdentity | None = None,
              evaluate=None, out: str | Path | None = None) -> PlanResult:
    """One plan under ``args.budgets`` (:class:`compressor.args.PlanArgs`).

    * shape ``search``: the influence ``profile`` (:class:`profilers.profile_format.Profile`) solved by
      :func:`search_space.search.search`, around the top ``retrieval`` heads (RetrievalScores, optional:
      :func:`compressor.retrieval_profile.kept_retrieval_heads`); ``evaluate(plan) -> {"loss", "latency_ms"}``
      measures study trials; ``out``: plan.json, pareto.csv, PNGs, optuna.db there.
    * shape ``keep_dense``: the top ``retrieval`` heads the budgets afford dense at ``args.search.lengths``, every
      other KV head sink + ``args.local_span`` (:func:`search_space.keep_dense.fit_keep_dense_plan`), for the model
      ``ident`` (default: the retrieval scores' model); ``out``: plan.json there.

    Raises CompressError for a missing input, budgets no plan meets, or a profile / scores of another model."""
    from dataclasses import replace

    args.check()
    if args.shape == "keep_dense":
        return _keep_dense_plan(args, retrieval, ident, out)
    if profile is None:
        raise CompressError("the search shape needs an influence profile (`compress profile`)")
    from compressor.retrieval_profile import kept_retrieval_heads
    from search_space.search import search as solve

    kept = ()
    if retrieval is not None:
        kept = kept_retrieval_heads(profile, retrieval, args.budgets, args.keep_dense, args.local_span,
                                    args.search.lengths)
    res = solve(profile, list(args.budgets), replace(args.search, keep_dense=tuple(kept)),
                out_dir=None if out is None else Path(out), evaluate=evaluate, model=ident)
    return PlanResult(res.plan, res, res.files, len(kept))


def _keep_dense_plan(args: PlanArgs, retrieval, ident: ModelIdentity | None, out) -> PlanResult:
    from compressor.retrieval_profile import check_scores_fit
    from plans.identity import ModelIdentity as Identity
    from search_space.budgets import parse_budgets
    from search_space.keep_dense import fit_keep_dense_plan

    if retrieval is None:
        raise CompressError("the keep_dense shape needs retrieval scores (`compress profile --method retrieval`, "
                            "`compress search --retrieval`)")
    ident = ident or Identity.model_validate(retrieval.meta["model"])
    check_scores_fit(retrieval, ident)
    ranked = retrieval.top(ident.num_layers * ident.num_kv_heads)
    lengths = sorted(set(args.search.lengths or ()))
    if not lengths:
        raise CompressError("the keep_dense shape needs the lengths where the budgets hold (--lengths)")
    sink = int(min(args.search.sinks or (DEFAULT_SINK,)))
    try:
        plan = fit_keep_dense_plan(ident, ranked, parse_budgets(list(args.budgets)), lengths, args.local_span, sink)
    except CompressError as e:
        raise CompressError(f"budget {', '.join(args.budgets)}: {e}") from None
    k = sum(h.kind == "dense" for layer in plan.layers for h in layer.heads)
    files = {}
    if out is not None:
        files["plan"] = save_plan(plan, Path(out) / "plan.json")
    return PlanResult(plan, None, files, k)


def search(profile: str | Path | None, out: str | Path = "search", args: PlanArgs = PlanArgs(), *,
           model: str | None = None, retrieval: str | Path | None = None) -> PlanResult:
    """`compress search`: :func:`make_plan` on the files of ``profile`` (an influence profile) and ``retrieval``
    (scores from ``compress profile --method retrieval``), writing into ``out``. With ``model`` the inputs are
    checked against it, and with ``args.search.trials`` and ``args.validate_length`` the trials measure
    held-out loss and latency on it (:func:`compressor.evaluation.validation_evaluator`)."""
    from compressor.progress import progress
    from profilers.profile_format import load_profile
    from profilers.retrieval import load_retrieval

    args.check()
    prof = load_profile(profile) if profile is not None and args.shape == "search" else None
    scores = load_retrieval(retrieval) if retrieval is not None else None
    ident, evaluate = None, None
    if model is not None:
        from compressor.evaluation import validation_evaluator
        from compressor.models import load_model

        m, tok = load_model(model)
        ident = identity_from_config(m.config)
        if prof is not None:
            prof.meta.model.check_matches(ident, f"profile {profile}")
        if args.search.trials and args.validate_length:
            val = calibration(tok, args.validation(args.search.seed), str(model), m)
            evaluate = validation_evaluator(m, val[args.validate_length])
    # with trials the study reports per trial; a single MILP solve is one step (the heartbeat speaks meanwhile)
    with progress("search", total=1, unit="solves", enabled=not args.search.trials) as tick:
        res = make_plan(args, profile=prof, retrieval=scores, ident=ident, evaluate=evaluate, out=out)
        tick()
    return res


def search_summary(res: PlanResult, out: str | Path) -> dict:
    """What `compress search --json` prints for a search written to ``out``."""
    p = res.plan
    solver = res.search.solver if res.search is not None else None
    return {"plan": str(Path(out) / "plan.json"), "status": res.status,
            "objective": getattr(solver, "objective", None), "mip_gap": getattr(solver, "mip_gap", None),
            "density": p.predicted.density, "kv_density": p.predicted.kv_density, "loss": p.predicted.loss,
            "kept_dense": res.kept_dense, "files": {k: str(v) for k, v in (res.files or {}).items()}}


# -- distill ------------------------------------------------------------------------------------------------------
def distill(plan: str | Path, out: str | Path, model: str | None = None, args=None, *,
            calibration_args: CalibrationArgs = CalibrationArgs(lengths=(1024,), samples=8,
                                                                 sources=("austen", "passkey"))) -> list[float]:
    """KD fine-tuning of ``model`` patched with ``plan`` (checkpoints in ``out``/checkpoint; ``args``: a
    :class:`compressor.distill.DistillArgs`, default steps 100 at lr 1e-4) on the samples of ``calibration_args``,
    then the patched model folder ``out``/model; returns every step's loss (see :func:`compressor.distill.distill`)."""
    from compressor.distill import DistillArgs, distill as kd
    from compressor.models import load_model

    p = load_plan(plan)
    m, tok = load_model(model)
    data = calibration(tok, calibration_args, str(model or "default"), None)
    out = Path(out)
    losses = kd(m, p, data, args or DistillArgs(steps=100, lr=1e-4, seed=calibration_args.seed),
                out_dir=out / "checkpoint")
    save_patched(m, tok, p, out / "model")
    return losses


# -- eval ---------------------------------------------------------------------------------------------------------
def evaluate(plans: Sequence[str | Path] = (), model: str | None = None, args: EvalArgs = EvalArgs(), *,
             out: str | Path | None = None, progress: bool = True, placement: PlacementArgs = PlacementArgs()):
    """`compress eval`: dense vs each plan (named by its file stem) vs the uniform plan at the same density, on the
    same samples (:func:`compressor.evaluation.evaluate`); with ``out``: eval_TASK.json and the heatmap
    eval_TASK.png there. Returns the :class:`compressor.evaluation.EvalReport`. Plans of another model and
    lengths past its positions fail before the model loads (CompressError)."""
    from compressor.evaluation import evaluate as run_eval
    from compressor.models import check_lengths_fit, load_config, load_model

    args.check()
    named = {Path(p).stem: load_plan(p) for p in plans}
    config = load_config(model)
    check_lengths_fit(config, args.lengths)
    ident = identity_from_config(config)
    for name, p in named.items():
        p.model.check_matches(ident, f"plan {name}")
    m, tok = load_model(model, **placement.kwargs())
    report = run_eval(m, tok, named, args, progress=progress)
    if out:
        write_eval(report, out)
    return report


def write_eval(report, out: str | Path) -> Path:
    """eval_TASK.json and the heatmap eval_TASK.png in the folder ``out``; returns the JSON's path."""
    from compressor.evaluation import heatmap_png

    path = Path(out) / f"eval_{report.task}.json"
    write_text_atomic(path, json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    heatmap_png(report, Path(out) / f"eval_{report.task}.png")
    return path


# -- bench --------------------------------------------------------------------------------------------------------
def bench(model: str | None = None, args: BenchArgs = BenchArgs(), *, plan: str | Path | None = None,
          out: str | Path | None = None, progress: bool = True, placement: PlacementArgs = PlacementArgs()):
    """`compress bench`: prefill/decode time and KV bytes of dense vs ``plan`` (default: uniform at
    ``args.density``) vs uniform at the plan's density (:func:`compressor.bench.bench`), or with
    ``args.kv_budget_gib`` decode throughput at that KV memory budget (:func:`compressor.bench.throughput`);
    ``args.kernel_table`` also writes the latency table for search; ``out`` writes the results JSON. Returns the
    :class:`compressor.bench.BenchReport`. Raises CompressError for a non-positive budget, a bad plan file or
    lengths past the model's positions, before the model loads."""
    import torch

    from compressor.bench import BenchReport, bench as measure, kernel_table as measure_kernels, throughput
    from compressor.models import check_lengths_fit, load_config, load_model

    args.check()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = list(args.lengths)
    p = load_plan(plan) if plan else None  # a bad plan file or length fails before the model loads
    check_lengths_fit(load_config(model), lengths)
    m, _ = load_model(model, **placement.kwargs())
    p = p or make_uniform_plan(model, density=args.density, length=lengths[0])
    if args.kernel_table:
        table = measure_kernels(lengths, p.model.head_dim)
        write_text_atomic(args.kernel_table, table.model_dump_json(indent=2))
        console.print(f"wrote latency table {args.kernel_table}")
    res, tp = [], []
    if args.kv_budget_gib is not None:
        tp = throughput(m, p, lengths, int(args.kv_budget_gib * 2**30), max_batch=args.max_batch,
                        decode_steps=args.decode_steps, progress=progress)
    else:
        res = measure(m, p, args, progress=progress)
    report = BenchReport(model=p.model.model_dump(), plan=str(plan) if plan else f"uniform density {args.density}",
                         threads=torch.get_num_threads(), repeats=args.repeats, results=res, throughput=tp)
    if out:
        write_text_atomic(out, json.dumps(report.to_dict(), indent=2) + "\n")
    return report
