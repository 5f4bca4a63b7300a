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
from rich.console import Console
from rich.table import Table

from plans.errors import CompressError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Compress the attention of pretrained causal LMs.")
plan_app = typer.Typer(no_args_is_help=True, help="Create, import and inspect plans.")
app.add_typer(plan_app, name="plan")
console = Console(stderr=True)
out_console = Console()

MODEL_HELP = "'default' (SmolLM2-135M-Instruct, installed with the project), a local HF folder, or a hub id"


def user_errors(fn):
    """Turn CompressError into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except CompressError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(e.exit_code) from None

    return wrapper


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
    from plans.io import load_plan

    p = load_plan(plan)
    n = n or (p.lengths[0] if p.lengths else 4096)
    rows = [[p.describe_span(li, h, n) for h in range(p.heads_per_layer)] for li in range(len(p.layers))]
    summary = {"n": n, "density": p.density(n), "kv_density": p.kv_density(n), "granularity": p.granularity,
               "source": p.source, "model": p.model.model_dump()}
    if as_json:
        emit_json({**summary, "spans": rows})
        return
    t = Table(title=f"{plan}  ({p.model.model_type}, {p.granularity}, source={p.source}) — spans at N={n}")
    t.add_column("layer", justify="right")
    for h in range(p.heads_per_layer):
        t.add_column(f"h{h}", justify="right")
    t.add_column("density", justify="right")
    for li, row in enumerate(rows):
        spans = p.spans(li, n)
        from plans.span import prefill_density

        dens = sum(prefill_density(min(int(s), n), n) for s in spans) / len(spans)
        t.add_row(str(li), *row, f"{dens:.3f}")
    out_console.print(t)
    out_console.print(f"prefill density {summary['density']:.3f} · KV density {summary['kv_density']:.3f} at N={n}")
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
    from plans.io import save_plan

    p = make_uniform_plan(model, span=span, density=density, length=length, sink=sink, granularity=granularity)
    save_plan(p, out)
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
    from plans.io import save_plan

    p = import_plan(file, model, fmt=fmt, threshold=threshold, sink=sink, recent=recent, new_tokens=new_tokens)
    save_plan(p, out)
    console.print(f"wrote {out} ({p.source}, {p.granularity}, {len(p.layers)} layers)")


@plan_app.command("schema")
@user_errors
def plan_schema(out: Optional[Path] = typer.Option(None, "--out")):
    """Print (or write) the plan JSON Schema."""
    from plans.atomic import write_text_atomic
    from plans.io import plan_json_schema

    text = json.dumps(plan_json_schema(), indent=2) + "\n"
    if out:
        write_text_atomic(out, text)
    else:
        sys.stdout.write(text)


# -- apply ---------------------------------------------------------------------------------------------------
@app.command("apply")
@user_errors
def apply_cmd(
    plan: Path = typer.Argument(..., help="plan.json"),
    out: Path = typer.Option(..., "--out", help="folder for the patched model"),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
):
    """Write a patched model folder (weights, tokenizer, plan) that loads with stock from_pretrained."""
    from compressor.pipeline import apply_to_folder

    with console.status("loading model and applying the plan"):
        path = apply_to_folder(plan, model, out, trust_remote_code=trust_remote_code)
    console.print(f"wrote {path}  (load: `import compressor; AutoModelForCausalLM.from_pretrained('{path}')`)")


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
