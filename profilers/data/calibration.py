"""Calibration sets: long real text, synthetic retrieval tasks and model-answered questions, cached on disk.

``build_calibration(tokenizer, recipe, model)`` returns ``{length N: [Sample, ...]}``; every sample is exactly N
tokens (template and BOS included). Sample ``i`` at length N comes from ``sources[i % len(sources)]``:

- a corpus (``"austen"``, ``"wikipedia"`` or a .txt / .jsonl path): N consecutive tokens of the corpus'
  *calibration* split (see :func:`profilers.data.corpora.split_corpus`; evaluation uses the held-out part), after
  the tokenizer's BOS. The loss covers the last ``text_loss_fraction`` (default 25%) of the tokens, the part
  that can draw on the longest context.
- ``"passkey"`` / ``"lines"``: :mod:`profilers.data.synthetic` tasks, loss on the answer tokens; depths are stratified
  over the samples of that source at that length.
- ``"qa"``: a question after a long context from the haystack corpus, answered by the *dense* model
  greedily (``max_new_tokens=qa_max_new_tokens``); the answer tokens are the supervision. Questions are about
  the first sentence (a long-range dependency) or the last paragraph of the text; successive qa samples at a
  length cycle through :data:`QA_QUESTIONS`. When the answer stops early
  (EOS) the context is extended by the unused tokens on the side the question does not ask about (end for
  "first ...", start for "last ..."), so the length stays N without re-running the model; ``meta["context_shift"]``
  records by how much. Without a model, ``qa`` is skipped with a warning (recorded, and rebuilt once a model
  is given).

The cache is a folder: ``samples.safetensors`` (token ids and masks concatenated, with offsets; no pickle) and
``calibration.json`` (recipe, its hash, tokenizer fingerprint, answers and per-sample meta).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors.torch import load_file, save_file

from plans.atomic import atomic_path
from plans.errors import CompressError
from profilers.data import corpora, synthetic
from profilers.progress import progress as progress_helper
from profilers.data.samples import Sample

CALIBRATION_FORMAT_VERSION = 1
TASK_SOURCES = ("passkey", "lines", "qa")

QA_INSTRUCTION = "Read the text below, then answer the question after it.\n\n"
QA_QUESTIONS: tuple[tuple[str, str], ...] = (  # (question, which end of the text it is about)
    ("Repeat the first sentence of the text above, word for word.", "start"),
    ("Who is the first person named in the text above? Answer with the name only.", "start"),
    ("Repeat the last sentence of the text above, word for word.", "end"),
    ("Summarise the last paragraph of the text above in one sentence.", "end"),
)
_QA_SLACK = 256  # extra window tokens so a "first sentence" context can start at a sentence start


class CalibrationRecipe(BaseModel):
    """Everything that decides the calibration samples; its hash keys the cache."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(default_factory=lambda: ["austen", "passkey", "lines", "qa"],
                               description="corpus names / file paths, and tasks 'passkey', 'lines', 'qa'")
    lengths: list[int] = Field(default_factory=lambda: [1024, 2048, 4096])
    samples_per_length: int = 4
    seed: int = 0
    model: str = Field("", description="identity of the model (and tokenizer) the samples are made for")
    version: int = CALIBRATION_FORMAT_VERSION
    haystack: str | None = Field(None, description="corpus for passkey / qa contexts; default: the first "
                                                   "corpus in sources, else 'austen'")
    heldout_fraction: float = 0.2
    text_loss_fraction: float = 0.25
    qa_max_new_tokens: int = 24
    use_chat_template: bool | None = Field(None, description="None: when the tokenizer has one")

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("sources must not be empty")
        return v

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if not v or any(n <= 0 for n in v):
            raise ValueError("lengths must be positive token counts")
        return sorted(set(v))

    @field_validator("samples_per_length", "qa_max_new_tokens")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("text_loss_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v

    def recipe_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()

    @property
    def corpus_sources(self) -> list[str]:
        return [s for s in self.sources if s not in TASK_SOURCES]

    @property
    def haystack_corpus(self) -> str:
        return self.haystack or (self.corpus_sources[0] if self.corpus_sources else "austen")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what decides token ids: vocabulary size, a probe encoding, special prefix, chat template."""
    probe = "It is a truth universally acknowledged, 12345 <REGISTER_CONTENT>\n\n\"Quoted\" -- naïve."
    parts = [str(len(tokenizer)), json.dumps(synthetic.encode(tokenizer, probe)),
             json.dumps(synthetic.special_prefix(tokenizer)), str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# building


class _Corpora:
    """Calibration-split text per corpus, loaded once per build."""

    def __init__(self, recipe: CalibrationRecipe, data_dir):
        self.recipe, self.data_dir = recipe, data_dir
        self.cache: dict[str, tuple[str, int]] = {}

    def text(self, name: str) -> tuple[str, int]:
        if name not in self.cache:
            docs = corpora.load_corpus(name, self.data_dir)
            split = corpora.split_corpus(docs, self.recipe.heldout_fraction, seed=0)
            self.cache[name] = ("\n\n".join(split.calibration), len(split.calibration))
        return self.cache[name]

    def window(self, tokenizer, name: str, n: int, rng: random.Random, length: int):
        text, n_docs = self.text(name)
        try:
            return synthetic.text_window(tokenizer, text, n, rng, what=f"corpus {name!r}")
        except CompressError as e:
            raise CompressError(
                f"corpus {name!r} is too short for calibration length {length}: its calibration split has "
                f"{n_docs} documents, {len(text)} characters ({e})") from None


def _text_sample(tokenizer, corpora_: _Corpora, name: str, n: int, rng: random.Random,
                 recipe: CalibrationRecipe) -> Sample:
    prefix = synthetic.special_prefix(tokenizer)
    if n <= len(prefix) + 1:
        raise CompressError(f"calibration length {n} is too short for a text sample")
    ids, _ = corpora_.window(tokenizer, name, n - len(prefix), rng, n)
    ids = prefix + ids
    mask = torch.zeros(n, dtype=torch.bool)
    k = max(1, min(n - 1, math.ceil(recipe.text_loss_fraction * n)))
    mask[n - k:] = True
    return Sample(torch.tensor(ids, dtype=torch.long), mask, None,
                  {"task": "text", "corpus": name, "loss_tokens": k})


def _eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


@torch.inference_mode()
def _greedy(model, prompt: list[int], max_new_tokens: int, eos: set[int], pad_id: int) -> list[int]:
    device = next(model.parameters()).device
    x = torch.tensor([prompt], dtype=torch.long, device=device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, num_beams=1)
    gen = out[0, len(prompt):].tolist()
    for i, t in enumerate(gen):
        if t in eos:
            return gen[:i + 1]
    return gen


def _qa_sample(tokenizer, model, corpora_: _Corpora, n: int, rng: random.Random, recipe: CalibrationRecipe,
               j: int) -> Sample:
    # the j-th qa sample at this length takes the question after the previous one's (seed-dependent start)
    first = random.Random(f"{recipe.seed}:{n}:qa-questions").randrange(len(QA_QUESTIONS))
    question, side = QA_QUESTIONS[(first + j) % len(QA_QUESTIONS)]
    chat = synthetic.resolve_chat(tokenizer, recipe.use_chat_template)
    after = "\n\nQuestion: " + question + ("" if chat else "\nAnswer:")
    head, tail, chat = synthetic.build_frame(tokenizer, QA_INSTRUCTION, after, "", chat)
    m = recipe.qa_max_new_tokens
    h = n - len(head) - len(tail) - m
    if h < 16:
        raise CompressError(f"calibration length {n} is too short for a qa sample: the template, question and "
                            f"{m} answer tokens take {n - h} tokens")
    window, bounds = corpora_.window(tokenizer, recipe.haystack_corpus, h + m + _QA_SLACK, rng, n)
    b0 = 0
    if side == "start":  # start at a sentence start; any extension goes at the end
        b0 = next((b for b in bounds if 0 < b <= _QA_SLACK), 0)
        context = window[b0:b0 + h]
    else:  # end where the window ends (a paragraph end); any extension goes at the start
        context = window[len(window) - h:]
    prompt = head + context + tail
    eos = _eos_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    answer_ids = _greedy(model, prompt, m, eos, pad_id)
    shift = m - len(answer_ids)
    if shift:
        context = window[b0:b0 + h + shift] if side == "start" else window[len(window) - h - shift:]
        prompt = head + context + tail
    ids = torch.tensor(prompt + answer_ids, dtype=torch.long)
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    mask[len(prompt):] = True
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    return Sample(ids, mask, answer, {"task": "qa", "question": question, "about": side,
                                      "corpus": recipe.haystack_corpus, "context_shift": shift,
                                      "prompt_len": len(prompt), "chat_template": chat,
                                      "answered_by": recipe.model or "dense model"})


def _effective_sources(recipe: CalibrationRecipe, model) -> list[str]:
    sources = list(recipe.sources)
    if model is None and "qa" in sources:
        warnings.warn("calibration source 'qa' needs the dense model to answer; no model given, so it is skipped")
        sources = [s for s in sources if s != "qa"]
    if not sources:
        raise CompressError("no calibration sources left (only 'qa', and no model to answer it)")
    return sources


def build_calibration(tokenizer, recipe: CalibrationRecipe, model=None, data_dir=None,
                      progress: bool = True) -> dict[int, list[Sample]]:
    """{N: samples} for every length of the recipe; see the module docstring for what each source makes.
    Deterministic: sample i at length N depends only on (seed, N, i, source) and the data."""
    sources = _effective_sources(recipe, model)
    corpora_ = _Corpora(recipe, data_dir)
    if model is not None:
        was_training = model.training
        model.eval()
    plan = [(n, i) for n in recipe.lengths for i in range(recipe.samples_per_length)]
    out: dict[int, list[Sample]] = {n: [] for n in recipe.lengths}
    try:
        with progress_helper("calibration", total=len(plan), unit="samples", enabled=progress) as tick:
            for n, i in plan:
                tick(0, stage=f"calibration N={n}")
                source = sources[i % len(sources)]
                rng = random.Random(f"{recipe.seed}:{n}:{i}:{source}")
                # stratified depth over this source's samples at this length
                j, count = i // len(sources), len(range(i % len(sources), recipe.samples_per_length, len(sources)))
                depth = min(1.0, (j + rng.random()) / count)
                if source == "passkey":
                    text, _ = corpora_.text(recipe.haystack_corpus)
                    try:
                        s = synthetic.passkey(tokenizer, text, n, depth, rng,
                                              use_chat_template=recipe.use_chat_template).to_sample()
                    except CompressError as e:
                        if "too short" in str(e) and "haystack" in str(e):
                            raise CompressError(f"corpus {recipe.haystack_corpus!r} is too short for calibration "
                                                f"length {n}: {e}") from None
                        raise
                elif source == "lines":
                    s = synthetic.lines_retrieval(tokenizer, n, depth, rng,
                                                  use_chat_template=recipe.use_chat_template).to_sample()
                elif source == "qa":
                    s = _qa_sample(tokenizer, model, corpora_, n, rng, recipe, j)
                else:
                    s = _text_sample(tokenizer, corpora_, source, n, rng, recipe)
                s.meta["source"] = source
                out[n].append(s)
                tick()
    finally:
        if model is not None and was_training:
            model.train()
    return out


# ----------------------------------------------------------------------------------------------------------
# cache


@dataclass
class CalibrationSet:
    samples: dict[int, list[Sample]]
    recipe: CalibrationRecipe
    info: dict = field(default_factory=dict)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def save_calibration(path: str | os.PathLike, samples_by_length: dict[int, list[Sample]],
                     recipe: CalibrationRecipe, info: dict | None = None) -> Path:
    """Write the folder ``path`` atomically: ``samples.safetensors`` + ``calibration.json``."""
    path = Path(path)
    flat = [(n, s) for n in sorted(samples_by_length) for s in samples_by_length[n]]
    if not flat:
        raise CompressError("no calibration samples to save")
    offsets = [0]
    for _, s in flat:
        offsets.append(offsets[-1] + s.length)
    tensors = {
        "input_ids": torch.cat([s.input_ids.to(torch.int64) for _, s in flat]).contiguous(),
        "loss_mask": torch.cat([s.loss_mask.to(torch.bool) for _, s in flat]).contiguous(),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
        "lengths": torch.tensor([n for n, _ in flat], dtype=torch.int64),
    }
    meta = {
        "format_version": CALIBRATION_FORMAT_VERSION,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_hash": recipe.recipe_hash(),
        **(_jsonable(info) if info else {}),
        "samples": [{"length": n, "answer": s.answer, "meta": _jsonable(s.meta)} for n, s in flat],
    }
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "samples.safetensors"), metadata={"format": "attention-compressor calibration"})
        (tmp / "calibration.json").write_text(json.dumps(meta, indent=1))
    return path


def load_calibration(path: str | os.PathLike) -> CalibrationSet:
    """Read a folder written by :func:`save_calibration`."""
    path = Path(path)
    jpath, tpath = path / "calibration.json", path / "samples.safetensors"
    if not jpath.is_file() or not tpath.is_file():
        raise CompressError(f"{path} is not a calibration folder (needs calibration.json and samples.safetensors)")
    try:
        meta = json.loads(jpath.read_text())
        tensors = load_file(str(tpath))
        recipe = CalibrationRecipe.model_validate(meta["recipe"])
    except Exception as e:  # unreadable JSON / safetensors / recipe: one clear error
        raise CompressError(f"could not read the calibration set in {path}: {e}") from e
    if meta.get("format_version") != CALIBRATION_FORMAT_VERSION:
        raise CompressError(f"{jpath}: format_version {meta.get('format_version')} is not "
                            f"{CALIBRATION_FORMAT_VERSION}; rebuild the calibration set")
    ids, mask, offsets = tensors["input_ids"], tensors["loss_mask"], tensors["offsets"].tolist()
    rows = meta["samples"]
    if len(offsets) != len(rows) + 1:
        raise CompressError(f"{path}: {len(rows)} samples in calibration.json but {len(offsets) - 1} in the tensors")
    samples: dict[int, list[Sample]] = {}
    for k, row in enumerate(rows):
        a, b = offsets[k], offsets[k + 1]
        samples.setdefault(int(row["length"]), []).append(
            Sample(ids[a:b].clone(), mask[a:b].clone(), row.get("answer"), row.get("meta") or {}))
    info = {k: v for k, v in meta.items() if k not in ("samples", "recipe")}
    return CalibrationSet(samples, recipe, info)


def calibration_dir(cache_dir: str | os.PathLike, tokenizer, recipe: CalibrationRecipe) -> Path:
    """The cache folder of (recipe, tokenizer) under ``cache_dir``."""
    key = hashlib.sha256((recipe.recipe_hash() + tokenizer_fingerprint(tokenizer)).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"calibration-{key}"


def get_or_build_calibration(cache_dir: str | os.PathLike, tokenizer, recipe: CalibrationRecipe, model=None,
                             data_dir=None, progress: bool = True) -> dict[int, list[Sample]]:
    """Load the cached set for this recipe and tokenizer, or build and cache it. Rebuilds when the recipe
    (hash) or the tokenizer differs, when the cache is unreadable, and when 'qa' was skipped for lack of a
    model and a model is given now."""
    path = calibration_dir(cache_dir, tokenizer, recipe)
    fp = tokenizer_fingerprint(tokenizer)
    if path.exists():
        try:
            cached = load_calibration(path)
        except CompressError as e:
            warnings.warn(f"rebuilding the calibration set: {e}")
        else:
            fresh = (cached.info.get("recipe_hash") == recipe.recipe_hash()
                     and cached.info.get("tokenizer_fingerprint") == fp
                     and not (cached.info.get("qa_skipped") and model is not None))
            if fresh:
                return cached.samples
    samples = build_calibration(tokenizer, recipe, model=model, data_dir=data_dir, progress=progress)
    info = {"tokenizer_fingerprint": fp, "qa_skipped": "qa" in recipe.sources and model is None}
    save_calibration(path, samples, recipe, info)
    return samples
