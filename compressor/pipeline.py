"""The Python API behind the CLI, one function per command (the CLI is a thin Typer layer over these).

    compress plan show      show_plan              compress profile   profile
    compress plan uniform   make_uniform_plan      compress search    search (+ search_summary for --json)
    compress plan import    import_plan            compress run       run
    compress plan schema    plan_schema            compress distill   distill
    compress apply          apply_to_folder        compress eval      evaluate
    compress data build     build_calibration      compress bench     bench
    compress data show      show_calibration

Options that the CLI takes as comma-separated text are lists here. User mistakes raise
:class:`plans.errors.CompressError` (the CLI prints its message and exits 2). Heavy imports (torch, transformers)
happen inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from compressor.models import apply_to_folder, save_patched  # noqa: F401  (`compress apply`; distill's folder)
from plans.atomic import write_text_atomic
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
                      length: int = 4096, sink: int = 64, granularity: str = "kv_head",
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


# -- data ---------------------------------------------------------------------------------------------------------
DEFAULT_SOURCES = ("austen", "passkey", "lines", "qa")


def calibration_recipe(model: str | None, lengths: Sequence[int], samples: int, sources: Sequence[str], seed: int):
    """A :class:`profilers.calibration.CalibrationRecipe`; a bad one is a CompressError."""
    from profilers.calibration import CalibrationRecipe

    try:
        return CalibrationRecipe(sources=list(sources), lengths=list(lengths), samples_per_length=samples, seed=seed,
                                 model=str(model or "default"))
    except ValueError as e:
        raise CompressError(f"bad calibration recipe: {e}") from None


def _calibration(model: str | None, lengths, samples, sources, seed, cache=None, qa_model: bool = True,
                 placement: dict | None = None):
    """(model, tokenizer, recipe, samples by length): the calibration set, built or loaded from ``cache``
    (default: $COMPRESS_HOME/calibration); with ``qa_model`` the model answers the 'qa' source. ``placement``:
    :func:`compressor.placement.placement_kwargs` for the model."""
    from compressor.models import compress_home, load_model
    from profilers.calibration import get_or_build_calibration

    m, tok = load_model(model, **(placement or {}))
    recipe = calibration_recipe(model, lengths, samples, sources, seed)
    cache = cache or compress_home() / "calibration"
    data = get_or_build_calibration(cache, tok, recipe, model=m if qa_model and "qa" in recipe.sources else None)
    return m, tok, recipe, data


def build_calibration(model: str | None = None, *, out: str | Path | None = None,
                      lengths: Sequence[int] = (1024, 2048, 4096), samples: int = 4,
                      sources: Sequence[str] = DEFAULT_SOURCES, seed: int = 0) -> tuple[Path, dict]:
    """Build (or load from the cache folder ``out``) a calibration set; returns (its folder, samples by length)."""
    from compressor.models import check_lengths_fit, compress_home, load_config
    from profilers.calibration import calibration_dir

    check_lengths_fit(load_config(model), lengths)  # before the model loads
    cache = out or compress_home() / "calibration"
    _, tok, recipe, data = _calibration(model, lengths, samples, sources, seed, cache=cache)
    return calibration_dir(cache, tok, recipe), data


def show_calibration(path: str | Path) -> tuple[object, list[dict]]:
    """(recipe, one row per sample: n, i, source, loss_tokens, answer) of a calibration folder."""
    from profilers.calibration import load_calibration

    cs = load_calibration(path)
    rows = []
    for n, ss in sorted(cs.samples.items()):
        for i, smp in enumerate(ss):
            rows.append({"n": n, "i": i, "source": smp.meta.get("source", smp.meta.get("task", "?")),
                         "loss_tokens": int(smp.loss_mask.sum()), "answer": (smp.answer or "")[:40]})
    return cs.recipe, rows


# -- profile ------------------------------------------------------------------------------------------------------
PROFILE_METHODS = ("taylor", "gates", "retrieval")


def profile(out: str | Path = "profile", model: str | None = None, *, lengths: Sequence[int] = (1024, 2048, 4096),
            samples: int = 4, sources: Sequence[str] = DEFAULT_SOURCES, seed: int = 0, block: int = 64,
            sinks: Sequence[float] = (64,), allow_extrapolation: bool = False, resume: bool = True,
            method: str = "taylor", pair: str = "full_vs_window", gate_steps: int = 100, gate_window: int = 256,
            device_map=None, max_memory=None, offload_folder=None, on_sample=None, retrieval_task: str = "niah_single",
            retrieval_query_rows: int | None = None):
    """Profile ``model`` on its calibration set into ``out``.safetensors / .json: per-head influence from gradients
    (``taylor``), learned per-head gates (``gates``: the first of ``sinks`` and ``gate_window`` make the cheap
    operator), or retrieval-head scores on held-in needle prompts (``retrieval``: ``samples`` prompts per length of
    ``retrieval_task``, niah_single or niah_multikey, read from the last ``retrieval_query_rows`` rows or, for None,
    the question rows; see :mod:`compressor.retrieval_profile`). Returns the profile
    (retrieval: the scores).

    ``device_map``/``max_memory``/``offload_folder`` split the model across devices (see
    :mod:`compressor.placement`). Under ``torchrun`` (WORLD_SIZE > 1) the taylor profile is data-parallel
    (:func:`_profile_data_parallel`). ``on_sample(N, k)``: see :func:`compressor.influence_profile.run_profile`."""
    from compressor.distributed import world_size_from_env
    from compressor.placement import placement_kwargs

    if method not in PROFILE_METHODS:
        raise CompressError(f"unknown profiling method {method!r} (available: {', '.join(PROFILE_METHODS)})")
    place = placement_kwargs(device_map, max_memory, offload_folder)
    if not allow_extrapolation:  # before the model loads
        from compressor.models import check_lengths_fit, load_config

        check_lengths_fit(load_config(model), lengths)
    if world_size_from_env() > 1:
        if method != "taylor":
            raise CompressError(f"data-parallel profiling (torchrun, --workers) is for --method taylor, not {method}")
        return _profile_data_parallel(out, model, place, lengths=lengths, samples=samples, sources=sources,
                                      seed=seed, block=block, sinks=sinks, allow_extrapolation=allow_extrapolation,
                                      resume=resume, on_sample=on_sample)
    if method == "retrieval":
        from compressor.models import load_model
        from compressor.retrieval_profile import run_retrieval_profile
        from profilers.retrieval import save_retrieval

        m, tok = load_model(model, **place)
        scores = run_retrieval_profile(m, tok, lengths=lengths, samples=samples, seed=seed, task=retrieval_task,
                                       query_rows=retrieval_query_rows)
        save_retrieval(scores, out)
        return scores
    m, _, _, data = _calibration(model, lengths, samples, sources, seed, placement=place)
    if method == "gates":
        from compressor.gate_profile import run_gates

        return run_gates(m, data, out, pair=pair, window=(int(sinks[0]), gate_window), steps=gate_steps, seed=seed,
                         block=block, model_name=str(model or "default"))
    from compressor.influence_profile import run_profile

    return run_profile(m, data, out, block=block, sink_sizes=[int(x) for x in sinks],
                       allow_extrapolation=allow_extrapolation, resume=resume, model_name=str(model or "default"),
                       on_sample=on_sample)


def _profile_data_parallel(out, model: str | None, place: dict, *, lengths, samples, sources, seed, block, sinks,
                           allow_extrapolation, resume, on_sample):
    """One rank of ``torchrun --nproc-per-node P … profile``: join the process group (gloo on CPU, nccl with a
    GPU per rank), let rank 0 build (or load) the calibration set first, then profile with the samples split
    across ranks and the sums all-reduced (:func:`compressor.influence_profile.run_profile` with ``dp``); rank 0
    writes the profile (and the partial files a rerun resumes from)."""
    from compressor import distributed
    from compressor.influence_profile import run_profile

    with distributed.session() as dp:
        if place.get("offload_folder"):  # one offload folder per rank: ranks never write each other's files
            place = {**place, "offload_folder": str(Path(place["offload_folder"]) / f"rank{dp.rank}")}
        if not dp.is_main:
            dp.barrier()  # rank 0 builds the calibration set (the 'qa' source runs the model) and caches it
        m, _, _, data = _calibration(model, lengths, samples, sources, seed, placement=place)
        if dp.is_main:
            dp.barrier()
        if dp.device.type == "cuda" and not place:
            m.to(dp.device)
        return run_profile(m, data, out, block=block, sink_sizes=[int(x) for x in sinks],
                           allow_extrapolation=allow_extrapolation, resume=resume, model_name=str(model or "default"),
                           on_sample=on_sample, dp=dp)


# -- search -------------------------------------------------------------------------------------------------------
def search(profile: str | Path, budgets: Sequence[str], *, out: str | Path = "search", model: str | None = None,
           granularity: str = "kv_head", k: int = 2, solver: str = "milp", time_limit: float = 60.0, trials: int = 0,
           validate_length: int = 0, val_samples: int = 1, latency_table: str | Path | None = None,
           storage: str | None = None, study_name: str | None = None, resume: bool = False,
           normalize: str = "layer", seed: int = 0, retrieval: str | Path | None = None, keep_dense: str = "auto",
           local_span: int = 256):
    """An exact per-head plan under ``budgets`` into ``out`` (plan.json, pareto.csv, PNGs, optuna.db); returns the
    :class:`search_space.search.SearchResult`. With ``model`` the profile is checked against it, and with
    ``trials`` and ``validate_length`` the trials measure held-out loss and latency on it.

    With ``retrieval`` (scores from ``compress profile --method retrieval``) the top-scored KV heads are kept dense
    (:func:`kept_retrieval_heads`) and the solver chooses the rest around them."""
    from compressor.progress import progress
    from profilers.profile_format import load_profile
    from search_space.search import search as solve

    prof = load_profile(profile)
    ident, evaluate = None, None
    if model is not None:
        from compressor.models import load_model

        m, tok = load_model(model)
        ident = identity_from_config(m.config)
        prof.meta.model.check_matches(ident, f"profile {profile}")
        if trials and validate_length:
            evaluate = _validation_evaluator(m, tok, model, validate_length, val_samples, seed)
    from compressor.retrieval_profile import kept_retrieval_heads

    kept = () if retrieval is None else kept_retrieval_heads(prof, retrieval, budgets, keep_dense, local_span)
    # with trials the study reports per trial; a single MILP solve is one step (the heartbeat speaks meanwhile)
    with progress("search", total=1, unit="solves", enabled=not trials) as tick:
        res = solve(prof, list(budgets), granularity=granularity, K=k, solver=solver, time_limit=time_limit,
                    out_dir=Path(out), trials=trials, evaluate=evaluate, seed=seed, storage=storage,
                    study_name=study_name, resume=resume, latency_table=latency_table, model=ident,
                    normalize=normalize, keep_dense=kept)
        tick()
    return res


def _validation_evaluator(m, tok, model: str, validate_length: int, val_samples: int, seed: int):
    from compressor.models import compress_home
    from compressor.run import validation_evaluator
    from profilers.calibration import CalibrationRecipe, get_or_build_calibration

    rec = CalibrationRecipe(sources=["austen", "passkey"], lengths=[validate_length],
                            samples_per_length=val_samples, seed=seed + 1, model=str(model))
    val = get_or_build_calibration(compress_home() / "calibration", tok, rec)[validate_length]
    return validation_evaluator(m, val)


def search_summary(res, out: str | Path) -> dict:
    """What `compress search --json` prints for a search written to ``out``."""
    p = res.plan
    return {"plan": str(Path(out) / "plan.json"), "status": res.solver.status, "objective": res.solver.objective,
            "mip_gap": getattr(res.solver, "mip_gap", None), "density": p.predicted.density,
            "kv_density": p.predicted.kv_density, "loss": p.predicted.loss,
            "files": {k: str(v) for k, v in res.files.items()}}


# -- run ----------------------------------------------------------------------------------------------------------
def run(cfg) -> dict:
    """`compress run`: profile -> search -> apply -> eval under ``cfg.out``; see :mod:`compressor.run`."""
    from compressor.run import run as run_all

    return run_all(cfg)


# -- distill ------------------------------------------------------------------------------------------------------
def distill(plan: str | Path, out: str | Path, model: str | None = None, *, steps: int = 100, lr: float = 1e-4,
            lengths: Sequence[int] = (1024,), samples: int = 8, sources: Sequence[str] = ("austen", "passkey"),
            seed: int = 0, resume: bool = True) -> list[float]:
    """KD fine-tuning of ``model`` patched with ``plan`` (checkpoints in ``out``/checkpoint), then the patched
    model folder ``out``/model; returns every step's loss (see :func:`compressor.distill.distill`)."""
    from compressor.distill import distill as kd

    p = load_plan(plan)
    m, tok, _, data = _calibration(model, lengths, samples, sources, seed, qa_model=False)
    out = Path(out)
    losses = kd(m, p, data, steps=steps, lr=lr, out_dir=out / "checkpoint", resume=resume, seed=seed)
    save_patched(m, tok, p, out / "model")
    return losses


# -- eval ---------------------------------------------------------------------------------------------------------
def evaluate(task: str = "passkey", plans: Sequence[str | Path] = (), model: str | None = None, *,
             lengths: Sequence[int] = (2048, 4096), depths: Sequence[float] = (0.1, 0.5, 0.9), samples: int = 2,
             corpus: str = "austen", seed: int = 0, out: str | Path | None = None, progress: bool = True,
             device_map=None, max_memory=None, offload_folder=None):
    """Dense vs each plan (named by its file stem) vs the uniform plan at the same density, on the same samples;
    with ``out``: eval_TASK.json and the heatmap eval_TASK.png there. Returns the
    :class:`compressor.evaluation.EvalReport`. ``device_map``…: the model split across devices
    (:mod:`compressor.placement`)."""
    from compressor.evaluation import evaluate as run_eval, heatmap_png, heldout_corpus
    from compressor.models import check_lengths_fit, load_config, load_model
    from compressor.placement import placement_kwargs

    named = {Path(p).stem: load_plan(p) for p in plans}
    config = load_config(model)  # plans of another model and lengths past its positions fail before loading
    check_lengths_fit(config, lengths)
    ident = identity_from_config(config)
    for name, p in named.items():
        p.model.check_matches(ident, f"plan {name}")
    m, tok = load_model(model, **placement_kwargs(device_map, max_memory, offload_folder))
    haystack = heldout_corpus(corpus) if task in ("passkey", "ppl") else None
    report = run_eval(m, tok, named, task, list(lengths), depths=list(depths), samples=samples, seed=seed,
                      haystack=haystack, progress=progress)
    if out:
        write_text_atomic(Path(out) / f"eval_{task}.json", json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        heatmap_png(report, Path(out) / f"eval_{task}.png")
    return report


# -- bench --------------------------------------------------------------------------------------------------------
def bench(model: str | None = None, *, plan: str | Path | None = None, density: float = 0.25,
          lengths: Sequence[int] = (4096,), repeats: int = 3, threads: int | None = None, whole_model: bool = True,
          decode: bool = True, kernel_table: str | Path | None = None, out: str | Path | None = None,
          progress: bool = True, device_map=None, max_memory=None, offload_folder=None,
          kv_budget_gib: float | None = None, max_batch: int = 64, decode_steps: int = 8):
    """Prefill/decode time and KV bytes: dense vs ``plan`` (default: uniform at ``density``) vs uniform at the
    plan's density. ``threads`` sets torch's threads; ``kernel_table`` also writes the latency table for search;
    ``out`` writes the results JSON. ``kv_budget_gib``: instead, decode throughput at that KV memory budget
    (:func:`compressor.bench.throughput`). Returns the :class:`compressor.bench.BenchReport`. ``device_map``…:
    the model split across devices (:mod:`compressor.placement`). Raises CompressError for a non-positive budget."""
    import torch

    from compressor.bench import BenchReport, bench as measure, kernel_table as measure_kernels
    from compressor.models import check_lengths_fit, load_config, load_model
    from compressor.placement import placement_kwargs

    if threads:
        torch.set_num_threads(threads)
    lengths = list(lengths)
    if kv_budget_gib is not None and (kv_budget_gib <= 0 or max_batch < 1):  # before loading anything
        raise CompressError(f"--kv-budget must be > 0 GiB and --max-batch >= 1 (got {kv_budget_gib}, {max_batch})")
    p = load_plan(plan) if plan else None  # a bad plan file or length fails before the model loads
    check_lengths_fit(load_config(model), lengths)
    m, _ = load_model(model, **placement_kwargs(device_map, max_memory, offload_folder))
    p = p or make_uniform_plan(model, density=density, length=lengths[0])
    if kernel_table:
        table = measure_kernels(lengths, p.model.head_dim)
        write_text_atomic(kernel_table, table.model_dump_json(indent=2))
        console.print(f"wrote latency table {kernel_table}")
    res, tp = [], []
    if kv_budget_gib is not None:
        from compressor.bench import throughput

        tp = throughput(m, p, lengths, int(kv_budget_gib * 2**30), max_batch=max_batch, decode_steps=decode_steps,
                        progress=progress)
    else:
        res = measure(m, p, lengths, repeats=repeats, whole_model=whole_model, decode=decode,
                      decode_steps=decode_steps, progress=progress)
    report = BenchReport(model=p.model.model_dump(), plan=str(plan) if plan else f"uniform density {density}",
                         threads=torch.get_num_threads(), repeats=repeats, results=res, throughput=tp)
    if out:
        write_text_atomic(out, json.dumps(report.to_dict(), indent=2) + "\n")
    return report
