"""The Python API behind the CLI, one function per command (the CLI is a thin Typer layer over these)."""

from __future__ import annotations

import json
from pathlib import Path

from plans.atomic import atomic_path
from plans.errors import CompressError
from plans.identity import ModelIdentity, identity_from_config
from plans.importers import import_plan_file
from plans.io import load_plan, save_plan
from plans.schema import Plan, span_for_density, uniform_plan


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
                      length: int = 4096, sink: int = 64, granularity: str = "kv_head") -> Plan:
    """StreamingLLM baseline: one sink+window for every head, by span or by density at ``length``."""
    if (span is None) == (density is None):
        raise CompressError("give exactly one of --span or --density")
    ident = model_identity(model)
    if density is not None:
        span = span_for_density(density, length)
    if span < 1:
        raise CompressError(f"--span must be >= 1, got {span}")
    return uniform_plan(ident, span, sink=sink, granularity=granularity, lengths=[length])


def import_plan(path: str | Path, model: str | None, **kw) -> Plan:
    return import_plan_file(path, model_identity(model), **kw)


def apply_to_folder(plan_path: str | Path, model: str | None, out: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Write a self-contained patched model folder: safetensors weights, tokenizer, plan.json, config that
    selects the ``compress`` attention. Nothing is written to ``out`` unless everything succeeds."""
    from compressor.models import load_model
    from compressor.patching import apply

    plan = load_plan(plan_path)
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    apply(m, plan)
    return save_patched(m, tok, plan, out)


def save_patched(model, tokenizer, plan: Plan, out: str | Path) -> Path:
    """Write a patched model folder atomically: weights, tokenizer, plan.json, and a config selecting ``compress``."""
    out = Path(out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_plan(plan, tmp / "plan.json")
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["attn_implementation"] = "compress"  # stock from_pretrained picks it up once compressor is imported
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out
