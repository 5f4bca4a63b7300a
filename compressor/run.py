"""`compress run`: profile -> search -> apply -> eval on one model, everything under one output folder.

Each stage writes its outputs plus ``<stage>.done.json`` holding a fingerprint of its inputs (the run
settings that matter to it and the fingerprints of the stages before it). A rerun skips a stage whose
marker matches, so an interrupted run resumes (the profiler also resumes inside a stage, per sample).

Layout of ``OUT``::

    calibration/            cached calibration + validation samples (safetensors + recipe JSON)
    profile.safetensors     per-head influence (profile.json: metadata)
    search_<budget>/        plan.json, pareto.csv, spans.png, pareto.png, optuna.db
    plans/<budget>.json     the chosen plan per budget
    model/                  the patched model folder for the first budget
    eval_<task>.json/.png   dense vs plans vs uniform
    bench.json              prefill / decode time and KV bytes at one length: dense, each plan, its uniform window
    report.json, report.md  the summary (also printed as one table on stderr, see compressor.run_report)
    report.png              accuracy by length x depth, dense / plans / uniform side by side
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from plans.atomic import write_text_atomic
from plans.errors import CompressError
from plans.io import load_plan, save_plan
from profilers.terminal import LiteralConsole

console = LiteralConsole(stderr=True)  # user text printed literally


@dataclass
class RunConfig:
    model: str | None = None
    out: str = "runs/default"
    profile_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    validate_length: int = 3072
    eval_lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    budgets: list[str] = field(default_factory=lambda: ["0.5", "0.25"])
    sources: list[str] = field(default_factory=lambda: ["austen", "passkey", "qa"])
    samples: int = 6  # austen, passkey, qa cycled: two of each source
    val_samples: int = 1
    trials: int = 4
    K: int = 2
    sinks: list[int] = field(default_factory=lambda: [64])
    block: int = 64
    eval_tasks: list[str] = field(default_factory=lambda: ["niah_single", "ppl"])  # RULER single needle, plain prompt
    eval_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    eval_samples: int = 1
    corpus: str = "austen"
    seed: int = 0
    time_limit: float = 30.0
    bench_length: int | None = None  # the light bench's length: None = the longest eval length, 0 = no bench
    plan_shape: str = "keep_dense"  # keep_dense: top retrieval heads dense, the rest at local_span (measured best,
    #                                  benchmarks/results/fidelity_method.md); search: influence profile + MILP/Optuna
    retrieval_samples: int = 8  # held-in needle prompts scoring retrieval heads (0: influence only, no heads kept dense)
    local_span: int = 256  # with retrieval heads kept dense: the span every other head must still afford
    bench_decode_steps: int = 8


def _fp(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _budget_tag(b: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in b).strip("_") or "budget"


class _Stage:
    def __init__(self, out: Path, name: str, fingerprint: str):
        self.marker = out / f"{name}.done.json"
        self.name, self.fp = name, fingerprint

    def done(self) -> bool:
        try:
            return json.loads(self.marker.read_text()).get("fingerprint") == self.fp
        except (OSError, json.JSONDecodeError):
            return False

    def finish(self, **info) -> None:
        write_text_atomic(self.marker, json.dumps({"fingerprint": self.fp, **info}, indent=2, default=str))


def validation_evaluator(model, samples):
    """Trial measurement for the Optuna study: answer-token CE on held-out samples at an unseen length with
    the plan applied, and the median forward wall time (ms) on this device."""
    from compressor.evaluation import answer_score
    from compressor.patching import apply

    def evaluate(plan) -> dict:
        apply(model, plan)
        losses, times = [], []
        for s in samples:
            t = time.perf_counter()
            _, loss, n = answer_score(model, s)
            times.append((time.perf_counter() - t) * 1000)
            losses.append(loss / max(n, 1))
        return {"loss": float(sum(losses) / len(losses)), "latency_ms": float(statistics.median(times))}

    return evaluate


def run(cfg: RunConfig) -> dict:
    """The whole pipeline; returns the summary that is also written to report.json. Progress (stderr): one
    line/bar for the stages, and the stages' own (calibration, profile samples, search trials, eval samples)."""
    from compressor.progress import progress

    check_run_config(cfg)  # before the progress line and before anything is loaded or written
    with progress("run", total=1 + len(cfg.budgets) + 1 + len(cfg.eval_tasks) + 1, unit="stages") as tick:
        return _run(cfg, tick)


@dataclass
class _Ctx:
    """What every stage of one run shares."""

    cfg: RunConfig
    out: Path
    model: object
    tok: object
    model_name: str
    tick: object
    timings: dict = field(default_factory=dict)


def check_run_config(cfg: RunConfig) -> None:
    """Raise CompressError for a value the run cannot use, before anything is loaded or written: the option
    values, and every length against the model's positions (read from its config alone)."""
    from compressor.models import check_lengths_fit, load_config

    if cfg.bench_length is not None and cfg.bench_length < 0:
        raise CompressError(f"--bench-length must be >= 0 (0: no bench), got {cfg.bench_length}")
    if cfg.validate_length <= max(cfg.profile_lengths):
        raise CompressError(
            f"--validate-length {cfg.validate_length} must exceed every profiled length {cfg.profile_lengths}")
    if cfg.plan_shape not in ("keep_dense", "search"):
        raise CompressError(f"--plan-shape must be keep_dense or search, got {cfg.plan_shape!r}")
    if cfg.plan_shape == "keep_dense" and cfg.retrieval_samples < 2:
        raise CompressError("--plan-shape keep_dense needs --retrieval-samples >= 2")
    for name, low in (("samples", 1), ("eval_samples", 1), ("trials", 0)):
        if getattr(cfg, name) < low:
            raise CompressError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}")
    bench = [cfg.bench_length] if cfg.bench_length else []
    check_lengths_fit(load_config(cfg.model), [*cfg.profile_lengths, cfg.validate_length, *cfg.eval_lengths, *bench])


def _run(cfg: RunConfig, tick) -> dict:
    from compressor.models import load_model
    from compressor.patching import unapply
    from profilers.calibration import CalibrationRecipe

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tick(0, stage="run: load model")
    model, tok = load_model(cfg.model)
    model_name = str(cfg.model or "default")
    ctx = _Ctx(cfg, out, model, tok, model_name, tick)

    # 1. calibration + profile
    recipe = CalibrationRecipe(sources=cfg.sources, lengths=cfg.profile_lengths, samples_per_length=cfg.samples,
                               seed=cfg.seed, model=model_name)
    val_recipe = CalibrationRecipe(sources=cfg.sources, lengths=[cfg.validate_length],
                                   samples_per_length=cfg.val_samples, seed=cfg.seed + 1, model=model_name)
    if cfg.plan_shape == "keep_dense":
        plans = _keep_dense_stages(ctx, _retrieval_stage(ctx, _fp(model_name)))
    else:
        profile_fp = _profile_stage(ctx, recipe)
        profile_fp = _retrieval_stage(ctx, profile_fp)
        # 2. search, one study per budget
        plans = _search_stages(ctx, val_recipe, profile_fp)
    unapply(model, "sdpa")
    # 3. apply the first budget's plan into a model folder
    _apply_stage(ctx, plans)
    # 4. eval
    reports = _eval_stages(ctx, plans)
    # 5. a light bench (one prefill + a few decode steps per method) for the speed / KV columns
    bench = _bench_stage(ctx, plans)
    unapply(model, "sdpa")
    return _report(ctx, plans, reports, bench, t0)


def _report(ctx: _Ctx, plans: dict, reports: dict, bench: dict | None, t0: float) -> dict:
    """report.json / report.md / report.png in the run folder, and the one-screen table on stderr."""
    from compressor.run_report import build_report, print_report, report_png

    cfg, out = ctx.cfg, ctx.out
    summary = {"config": asdict(cfg), "model": ctx.model_name, "seconds": time.time() - t0,
               "stage_seconds": ctx.timings,
               "plans": {k: {"density": {n: p.density(n) for n in cfg.eval_lengths},
                             "kv_density": {n: p.kv_density(n) for n in cfg.eval_lengths},
                             "predicted": p.predicted.model_dump()} for k, p in plans.items()},
               "eval": {task: r["summary"] for task, r in reports.items()},
               "bench": bench, "report": build_report(plans, reports, bench)}
    summary["files"] = {"png": "report.png" if report_png(reports, plans, out / "report.png") else None}
    write_text_atomic(out / "report.json", json.dumps(summary, indent=2, default=str))
    write_text_atomic(out / "report.md", report_markdown(summary))
    print_report(summary["report"], console)
    return summary


def _bench_stage(ctx: _Ctx, plans: dict) -> dict | None:
    """Whole-model prefill and decode-step time and KV bytes for dense, each plan and its uniform window, at one
    length (``bench_length``; the longest eval length by default): one prefill and ``bench_decode_steps`` decode
    steps per method (:func:`compressor.bench.bench` with ``repeats=0``). None when ``bench_length == 0``."""
    from compressor.bench import bench, results_as_dicts

    cfg, out = ctx.cfg, ctx.out
    n = max(cfg.eval_lengths) if cfg.bench_length is None else cfg.bench_length
    ctx.tick(0, stage="run: bench")
    if not n:
        ctx.tick()
        return None
    st = _Stage(out, "bench", _fp(ctx.model_name, {k: p.model_dump_json() for k, p in plans.items()}, n,
                                  cfg.bench_decode_steps))
    path = out / "bench.json"
    if not st.done() or not path.exists():
        t = time.time()
        results = {tag: results_as_dicts(bench(ctx.model, p, [n], repeats=0, attention=False, whole_model=True,
                                               decode=True, decode_steps=cfg.bench_decode_steps,
                                               time_decode_prefill=True, progress=True))
                   for tag, p in plans.items()}
        data = {"n": n, "decode_steps": cfg.bench_decode_steps, "threads": torch.get_num_threads(),
                "results": results}
        write_text_atomic(path, json.dumps(data, indent=2, default=str))
        st.finish(seconds=time.time() - t)
        ctx.timings["bench"] = time.time() - t
    ctx.tick()
    return json.loads(path.read_text())


def _profile_stage(ctx: _Ctx, recipe) -> str:
    """Calibration samples and the profile; returns the stage fingerprint."""
    from profilers.calibration import get_or_build_calibration
    from compressor.influence_profile import run_profile

    cfg, out = ctx.cfg, ctx.out
    stage = _Stage(out, "profile", _fp(ctx.model_name, recipe.recipe_hash(), cfg.sinks, cfg.block))
    ctx.tick(0, stage="run: profile")
    if not stage.done():
        t = time.time()
        cal = get_or_build_calibration(out / "calibration", ctx.tok, recipe,
                                       model=ctx.model if "qa" in cfg.sources else None)
        run_profile(ctx.model, cal, out / "profile", block=cfg.block, sink_sizes=cfg.sinks, model_name=ctx.model_name)
        stage.finish(seconds=time.time() - t)
        ctx.timings["profile"] = time.time() - t
    else:
        console.print("profile: up to date, skipped")
    ctx.tick()
    return stage.fp


def _retrieval_stage(ctx: _Ctx, profile_fp: str) -> str:
    """Retrieval-head scores (``retrieval.safetensors``) on ``retrieval_samples`` held-in needle prompts at the
    shortest profiled length; returns the fingerprint the search stages depend on."""
    from compressor.retrieval_profile import run_retrieval_profile
    from profilers.retrieval import save_retrieval

    cfg, out = ctx.cfg, ctx.out
    if cfg.retrieval_samples <= 0:
        return profile_fp
    n = min(cfg.profile_lengths)
    stage = _Stage(out, "retrieval", _fp(profile_fp, cfg.retrieval_samples, n, cfg.seed, cfg.local_span,
                                         "question rows"))  # scores from before the question rows are recomputed
    ctx.tick(0, stage="run: retrieval heads")
    if not stage.done():
        t = time.time()
        save_retrieval(run_retrieval_profile(ctx.model, ctx.tok, lengths=[n], samples=cfg.retrieval_samples,
                                             seed=cfg.seed), out / "retrieval")
        stage.finish(seconds=time.time() - t)
        ctx.timings["retrieval"] = time.time() - t
    else:
        console.print("retrieval heads: up to date, skipped")
    return stage.fp


def _keep_dense_stages(ctx: _Ctx, retrieval_fp: str) -> dict:
    """Per budget: the top retrieval heads the budget affords dense, every other KV head sink + ``local_span``,
    budgets at the eval lengths (:func:`search_space.keep_dense.fit_keep_dense_plan`); returns {budget tag: Plan}."""
    from plans.identity import identity_from_config
    from profilers.retrieval import load_retrieval
    from search_space.budgets import parse_budgets
    from search_space.keep_dense import fit_keep_dense_plan

    cfg, out = ctx.cfg, ctx.out
    ident = identity_from_config(ctx.model.config)
    ranked = load_retrieval(out / "retrieval").top(ident.num_layers * ident.num_kv_heads)
    lengths, sink = sorted(set(cfg.eval_lengths)), int(min(cfg.sinks))
    plans = {}
    for b in cfg.budgets:
        tag = _budget_tag(b)
        st = _Stage(out, f"search_{tag}", _fp(retrieval_fp, b, lengths, cfg.local_span, sink))
        plan_path = out / "plans" / f"{tag}.json"
        ctx.tick(0, stage=f"run: plan {b}")
        if not st.done() or not plan_path.exists():
            try:
                plan = fit_keep_dense_plan(ident, ranked, parse_budgets([b]), lengths, cfg.local_span, sink)
            except CompressError as e:
                raise CompressError(f"budget {b}: {e}") from None
            k = sum(h.kind == "dense" for layer in plan.layers for h in layer.heads)
            save_plan(plan, plan_path)
            st.finish(plan=str(plan_path), kept_dense=k)
            console.print(f"plan {b}: {k} retrieval KV heads dense, the rest sink {sink} + span {cfg.local_span}")
        plans[tag] = load_plan(plan_path)
        ctx.tick()
    return plans


def _search_stages(ctx: _Ctx, val_recipe, profile_fp: str) -> dict:
    """One search per budget (validation samples built once, on first need); returns {budget tag: Plan}."""
    from profilers.calibration import get_or_build_calibration
    from compressor.retrieval_profile import kept_retrieval_heads
    from profilers.profile_format import load_profile
    from search_space.search import search

    cfg, out = ctx.cfg, ctx.out
    val = None
    plans = {}
    for b in cfg.budgets:
        tag = _budget_tag(b)
        st = _Stage(out, f"search_{tag}", _fp(profile_fp, b, cfg.trials, cfg.K, cfg.validate_length, val_recipe.recipe_hash(),
                                              cfg.seed, sorted(set(cfg.eval_lengths)), cfg.local_span))
        plan_path = out / "plans" / f"{tag}.json"
        ctx.tick(0, stage=f"run: search {b}")
        if not st.done() or not plan_path.exists():
            t = time.time()
            if val is None:
                val = get_or_build_calibration(out / "calibration", ctx.tok, val_recipe,
                                               model=ctx.model if "qa" in cfg.sources else None)[cfg.validate_length]
            prof = load_profile(out / "profile")
            lengths = sorted(set(cfg.eval_lengths))  # budgets hold where the plan serves (and is judged)
            kept = []
            if cfg.retrieval_samples > 0:
                kept = kept_retrieval_heads(prof, out / "retrieval", [b], "auto", cfg.local_span, lengths)
            res = search(prof, [b], K=cfg.K, out_dir=out / f"search_{tag}", trials=cfg.trials,
                         evaluate=validation_evaluator(ctx.model, val), seed=cfg.seed, resume=True,
                         time_limit=cfg.time_limit, lengths=lengths, keep_dense=kept)
            save_plan(res.plan, plan_path)
            st.finish(seconds=time.time() - t, plan=str(plan_path))
            ctx.timings[f"search_{tag}"] = time.time() - t
        else:
            console.print(f"search {b}: up to date, skipped")
        plans[tag] = load_plan(plan_path)
        ctx.tick()
    return plans


def _apply_stage(ctx: _Ctx, plans: dict) -> None:
    """The patched model folder for the first budget's plan."""
    from compressor.models import apply_to_folder

    cfg, out = ctx.cfg, ctx.out
    first = _budget_tag(cfg.budgets[0])
    st = _Stage(out, "apply", _fp(ctx.model_name, plans[first].model_dump_json()))
    ctx.tick(0, stage="run: apply")
    if not st.done() or not (out / "model" / "config.json").exists():
        t = time.time()
        apply_to_folder(out / "plans" / f"{first}.json", cfg.model, out / "model")
        st.finish(seconds=time.time() - t)
        ctx.timings["apply"] = time.time() - t
    ctx.tick()


def _eval_stages(ctx: _Ctx, plans: dict) -> dict:
    """Dense vs the plans vs uniform per eval task; returns {task: the eval JSON}."""
    from compressor.evaluation import evaluate, heatmap_png
    from profilers.corpora import load_corpus, split_corpus

    cfg, out = ctx.cfg, ctx.out
    haystack = list(split_corpus(load_corpus(cfg.corpus)).heldout)
    reports = {}
    for task in cfg.eval_tasks:
        st = _Stage(out, f"eval_{task}", _fp(ctx.model_name, {k: p.model_dump_json() for k, p in plans.items()},
                                              cfg.eval_lengths, cfg.eval_depths, cfg.eval_samples, cfg.seed, cfg.corpus))
        path = out / f"eval_{task}.json"
        ctx.tick(0, stage=f"run: eval {task}")
        if not st.done() or not path.exists():
            t = time.time()
            rep = evaluate(ctx.model, ctx.tok, plans, task, cfg.eval_lengths, depths=cfg.eval_depths,
                           samples=cfg.eval_samples, seed=cfg.seed, haystack=haystack, progress=True)
            write_text_atomic(path, json.dumps(rep.to_dict(), indent=2, default=str))
            heatmap_png(rep, out / f"eval_{task}.png")
            st.finish(seconds=time.time() - t)
            ctx.timings[f"eval_{task}"] = time.time() - t
        reports[task] = json.loads(path.read_text())
        ctx.tick()
    return reports


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def report_markdown(summary: dict) -> str:
    from compressor.run_report import markdown_section

    lines = ["# compress run report", "", f"model {summary.get('model', '-')}; total {summary['seconds']:.0f} s", ""]
    if summary.get("report"):
        lines += markdown_section(summary["report"])
        if (summary.get("files") or {}).get("png"):
            lines += ["![accuracy by length x depth: dense / plan / uniform](report.png)", ""]
        lines += ["## Eval details", ""]
    for task, rows in summary["eval"].items():
        if task == "ppl":
            lines += [f"## {task}", "", "| method | N | density | perplexity |", "|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['method']} | {r['n']} | {r['density']:.3f} | {_fmt(r.get('ppl'))} |")
        else:
            lines += [f"## {task}", "", "| method | N | density | accuracy | samples | answer-token perplexity |",
                      "|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['method']} | {r['n']} | {r['density']:.3f} | {_fmt(r.get('accuracy'))} | "
                             f"{r.get('samples', '-')} | {_fmt(r.get('answer_ppl'))} |")
        lines.append("")
    return "\n".join(lines) + "\n"
