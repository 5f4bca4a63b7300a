"""`compress run`: the three commands' stages on one model, composed in memory, everything under one output folder.

    retrieval heads  ->  [influence profile]  ->  plan per budget  ->  patched folder  ->  eval per task  ->  bench

Each stage is the function `compress profile` / `search` / `apply` / `eval` / `bench` runs
(:mod:`compressor.pipeline`, :mod:`compressor.evaluation`, :mod:`compressor.bench`), called here on the one loaded
model with the arguments of :class:`RunConfig` (a composition of :mod:`compressor.args`). Each stage writes its
outputs plus ``<stage>.done.json`` holding a fingerprint of its inputs (its arguments and the fingerprints of the
stages before it); a rerun skips a stage whose marker matches and reads its outputs back into the same types, so an
interrupted run resumes (the profiler also resumes inside a stage, per sample).

Layout of ``OUT``::

    calibration/            cached calibration + validation samples (safetensors + recipe JSON)
    retrieval.safetensors   retrieval-head scores (retrieval.json: metadata)
    profile.safetensors     per-head influence (profile.json: metadata; plan shape ``search`` only)
    search_<budget>/        plan.json, pareto.csv, spans.png, pareto.png, optuna.db (plan shape ``search``)
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
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from compressor.args import PlanArgs, RunConfig, TASKS
from plans.atomic import write_text_atomic
from plans.errors import CompressError
from plans.io import load_plan, save_plan
from profilers.terminal import LiteralConsole

console = LiteralConsole(stderr=True)  # user text printed literally


def _fp(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _budget_tag(b: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in b).strip("_") or "budget"


class _Stage:
    """One stage's marker: ``<name>.done.json`` holding the fingerprint of the stage's inputs."""

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


def run(cfg: RunConfig) -> dict:
    """The whole pipeline; returns the summary that is also written to report.json. Progress (stderr): one
    line/bar for the stages, and the stages' own (calibration, profile samples, search trials, eval samples)."""
    from compressor.progress import progress

    check_run_config(cfg)  # before the progress line and before anything is loaded or written
    total = 1 + len(cfg.plan.budgets) + 1 + len(cfg.eval_tasks) + 1
    with progress("run", total=total, unit="stages") as tick:
        return _run(cfg, tick)


@dataclass
class _Ctx:
    """What every stage of one run shares: the loaded model and tokenizer, the progress tick, stage timings."""

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

    cfg.plan.check()
    if cfg.bench_length is not None and cfg.bench_length < 0:
        raise CompressError(f"--bench-length must be >= 0 (0: no bench), got {cfg.bench_length}")
    if cfg.plan.shape == "search" and cfg.plan.validate_length <= max(cfg.calibration.lengths):
        raise CompressError(f"--validate-length {cfg.plan.validate_length} must exceed every profiled length "
                            f"{list(cfg.calibration.lengths)}")
    if cfg.plan.shape == "keep_dense" and cfg.retrieval_samples < 2:
        raise CompressError("--plan-shape keep_dense needs --retrieval-samples >= 2")
    for name, value, low in (("samples", cfg.calibration.samples, 1), ("eval-samples", cfg.eval.samples, 1),
                             ("trials", cfg.plan.search.trials, 0)):
        if value < low:
            raise CompressError(f"--{name} must be >= {low}, got {value}")
    for task in cfg.eval_tasks:
        if task not in TASKS:
            raise CompressError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    bench = [cfg.bench_length] if cfg.bench_length else []
    lengths = [*cfg.calibration.lengths, cfg.plan.validate_length, *cfg.eval.lengths, *bench]
    check_lengths_fit(load_config(cfg.model), lengths)


def _run(cfg: RunConfig, tick) -> dict:
    from compressor.models import load_model

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tick(0, stage="run: load model")
    model, tok = load_model(cfg.model)
    ctx = _Ctx(cfg, out, model, tok, str(cfg.model or "default"), tick)
    profile, fp = (None, _fp(ctx.model_name)) if cfg.plan.shape == "keep_dense" else _profile_stage(ctx)
    retrieval, fp = _retrieval_stage(ctx, fp)
    plans = _plan_stages(ctx, profile, retrieval, fp)
    _apply_stage(ctx, plans)
    reports = _eval_stages(ctx, plans)
    bench = _bench_stage(ctx, plans)
    return _report(ctx, plans, reports, bench, t0)


def _timed(ctx: _Ctx, stage: _Stage, work, **info):
    """Run ``work()``, then mark ``stage`` done with its seconds (also in the run's timings); returns the result."""
    t = time.time()
    result = work()
    stage.finish(seconds=time.time() - t, **info)
    ctx.timings[stage.name] = time.time() - t
    return result


def _profile_stage(ctx: _Ctx):
    """Calibration samples and the influence profile (`compress profile`); returns (Profile, fingerprint)."""
    from compressor.influence_profile import run_profile
    from compressor.pipeline import calibration
    from profilers.profile_format import load_profile

    cfg, out = ctx.cfg, ctx.out
    recipe = cfg.calibration.recipe(ctx.model_name)
    stage = _Stage(out, "profile", _fp(ctx.model_name, recipe.recipe_hash(), cfg.influence))
    ctx.tick(0, stage="run: profile")
    if not stage.done():
        def work():
            data = calibration(ctx.tok, cfg.calibration, ctx.model_name, ctx.model, out / "calibration")
            return run_profile(ctx.model, data, out / "profile", cfg.influence, model_name=ctx.model_name)
        profile = _timed(ctx, stage, work)
    else:
        console.print("profile: up to date, skipped")
        profile = load_profile(out / "profile")
    ctx.tick()
    return profile, stage.fp


def _retrieval_stage(ctx: _Ctx, upstream: str):
    """Retrieval-head scores (``retrieval.safetensors``, `compress profile --method retrieval`) on
    ``retrieval_samples`` held-in needle prompts at the shortest profiled length; returns (scores or None,
    the fingerprint the plan stages depend on)."""
    from compressor.args import RetrievalArgs
    from compressor.retrieval_profile import run_retrieval_profile
    from profilers.retrieval import load_retrieval, save_retrieval

    cfg, out = ctx.cfg, ctx.out
    if cfg.retrieval_samples <= 0:
        return None, upstream
    args = RetrievalArgs(lengths=(min(cfg.calibration.lengths),), samples=cfg.retrieval_samples, seed=cfg.seed)
    stage = _Stage(out, "retrieval", _fp(upstream, args, "question rows"))
    ctx.tick(0, stage="run: retrieval heads")
    if not stage.done():
        def work():
            scores = run_retrieval_profile(ctx.model, ctx.tok, args)
            save_retrieval(scores, out / "retrieval")
            return scores
        return _timed(ctx, stage, work), stage.fp
    console.print("retrieval heads: up to date, skipped")
    return load_retrieval(out / "retrieval"), stage.fp


def _plan_stages(ctx: _Ctx, profile, retrieval, upstream: str) -> dict:
    """One plan per budget (`compress search`, :func:`compressor.pipeline.make_plan`; validation samples built
    once, on first need); returns {budget tag: Plan}."""
    from compressor.evaluation import validation_evaluator
    from compressor.pipeline import calibration
    from plans.identity import identity_from_config

    cfg, out = ctx.cfg, ctx.out
    base = cfg.plan_args()
    ident = identity_from_config(ctx.model.config)
    val_args = base.validation(cfg.seed)
    evaluate, plans = None, {}
    for b in base.budgets:
        tag, args = _budget_tag(b), replace(base, budgets=(b,))
        st = _Stage(out, f"search_{tag}", _fp(upstream, args, val_args))
        plan_path = out / "plans" / f"{tag}.json"
        ctx.tick(0, stage=f"run: plan {b}")
        if not st.done() or not plan_path.exists():
            if evaluate is None and args.shape == "search" and args.search.trials:
                val = calibration(ctx.tok, val_args, ctx.model_name, ctx.model, out / "calibration")
                evaluate = validation_evaluator(ctx.model, val[args.validate_length])
            search_out = out / f"search_{tag}" if args.shape == "search" else None
            res = _timed(ctx, st, lambda: _plan_one(ctx, args, profile, retrieval, ident, evaluate, search_out),
                         plan=str(plan_path))
            save_plan(res.plan, plan_path)
        else:
            console.print(f"plan {b}: up to date, skipped")
        plans[tag] = load_plan(plan_path)
        ctx.tick()
    return plans


def _plan_one(ctx: _Ctx, args: PlanArgs, profile, retrieval, ident, evaluate, out):
    from compressor.patching import plan_applied
    from compressor.pipeline import make_plan

    with plan_applied(ctx.model, None):  # the study's trials apply plans; the model is dense again afterwards
        res = make_plan(args, profile=profile, retrieval=retrieval, ident=ident, evaluate=evaluate, out=out)
    if args.shape == "keep_dense":
        console.print(f"plan {args.budgets[0]}: {res.kept_dense} retrieval KV heads dense, the rest sink "
                      f"{min(args.search.sinks)} + span {args.local_span}")
    return res


def _apply_stage(ctx: _Ctx, plans: dict) -> None:
    """The patched model folder for the first budget's plan (`compress apply`, on the loaded model)."""
    from compressor.models import save_patched
    from compressor.patching import plan_applied

    first = plans[_budget_tag(ctx.cfg.plan.budgets[0])]
    st = _Stage(ctx.out, "apply", _fp(ctx.model_name, first.model_dump_json()))
    ctx.tick(0, stage="run: apply")
    if not st.done() or not (ctx.out / "model" / "config.json").exists():
        def work():
            with plan_applied(ctx.model, first):
                save_patched(ctx.model, ctx.tok, first, ctx.out / "model")
        _timed(ctx, st, work)
    ctx.tick()


def _eval_stages(ctx: _Ctx, plans: dict) -> dict:
    """Dense vs the plans vs uniform per eval task (`compress eval`); returns {task: EvalReport}."""
    from compressor.evaluation import EvalReport, evaluate, heldout_corpus
    from compressor.pipeline import write_eval

    cfg, out = ctx.cfg, ctx.out
    reports, haystack = {}, None
    for task in cfg.eval_tasks:
        args = replace(cfg.eval, task=task, seed=cfg.seed)
        st = _Stage(out, f"eval_{task}", _fp(ctx.model_name, {k: p.model_dump_json() for k, p in plans.items()}, args))
        path = out / f"eval_{task}.json"
        ctx.tick(0, stage=f"run: eval {task}")
        if not st.done() or not path.exists():
            haystack = haystack or heldout_corpus(cfg.eval.corpus)  # read once for every task
            reports[task] = _timed(ctx, st, lambda: evaluate(ctx.model, ctx.tok, plans, args, haystack=haystack,
                                                              progress=True))
            write_eval(reports[task], out)
        else:
            reports[task] = EvalReport.from_dict(json.loads(path.read_text()))
        ctx.tick()
    return reports


def _bench_stage(ctx: _Ctx, plans: dict) -> dict | None:
    """Whole-model prefill and decode-step time and KV bytes for dense, each plan and its uniform window, at one
    length (``bench_length``; the longest eval length by default): one prefill and ``bench_decode_steps`` decode
    steps per method (`compress bench`, :func:`compressor.bench.bench` with ``repeats=0``). None when
    ``bench_length == 0``."""
    from compressor.args import BenchArgs
    from compressor.bench import bench, results_as_dicts

    cfg, out = ctx.cfg, ctx.out
    n = max(cfg.eval.lengths) if cfg.bench_length is None else cfg.bench_length
    ctx.tick(0, stage="run: bench")
    if not n:
        ctx.tick()
        return None
    args = BenchArgs(lengths=(n,), repeats=0, attention=False, decode_steps=cfg.bench_decode_steps,
                     time_decode_prefill=True)
    st = _Stage(out, "bench", _fp(ctx.model_name, {k: p.model_dump_json() for k, p in plans.items()}, args))
    path = out / "bench.json"
    if not st.done() or not path.exists():
        def work():
            results = {tag: results_as_dicts(bench(ctx.model, p, args, progress=True)) for tag, p in plans.items()}
            data = {"n": n, "decode_steps": cfg.bench_decode_steps, "threads": torch.get_num_threads(),
                    "results": results}
            write_text_atomic(path, json.dumps(data, indent=2, default=str))
        _timed(ctx, st, work)
    ctx.tick()
    return json.loads(path.read_text())


def _report(ctx: _Ctx, plans: dict, reports: dict, bench: dict | None, t0: float) -> dict:
    """report.json / report.md / report.png in the run folder, and the one-screen table on stderr."""
    from compressor.run_report import build_report, print_report, report_png

    cfg, out = ctx.cfg, ctx.out
    lengths = cfg.eval.lengths
    summary = {"config": asdict(cfg), "model": ctx.model_name, "seconds": time.time() - t0,
               "stage_seconds": ctx.timings,
               "plans": {k: {"density": {n: p.density(n) for n in lengths},
                             "kv_density": {n: p.kv_density(n) for n in lengths},
                             "predicted": p.predicted.model_dump()} for k, p in plans.items()},
               "eval": {task: r.summary() for task, r in reports.items()},
               "bench": bench, "report": build_report(plans, reports, bench)}
    summary["files"] = {"png": "report.png" if report_png(reports, plans, out / "report.png") else None}
    write_text_atomic(out / "report.json", json.dumps(summary, indent=2, default=str))
    write_text_atomic(out / "report.md", report_markdown(summary))
    print_report(summary["report"], console)
    return summary


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
