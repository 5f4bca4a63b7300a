"""Optional knowledge-distillation fine-tuning for plans with cheap operators (MPCViT's retrain-with-KD step).

    losses = distill(model, plan, samples, DistillArgs(steps=200, lr=1e-4), out_dir="out/distill")

* Teacher: the model as given (dense, or whatever attention it runs now), BEFORE the plan is applied:
  log-probabilities at the predicting positions (t - 1 for every target t of the sample's ``loss_mask``; all
  positions when it has none) for ``loss="kl"``, or the final hidden states (``model.base_model``, after the final
  norm) for ``loss="mse"``. ``teacher="cache"`` computes them once per sample under no_grad and caches them in
  ``out_dir/teacher.safetensors`` (a resumed run reuses the first run's teacher even if the in-memory model was
  already trained); ``"copy"`` keeps a frozen deep copy of the model instead (twice the weights in memory,
  teacher recomputed every step); ``"auto"`` (default) caches unless the cache would exceed
  ``max_teacher_bytes`` (positions x vocab x 4 bytes adds up quickly for large vocabularies).
* Student: the same model object with the plan applied (:func:`compressor.apply`), trained in place. Trainable
  parameters: ``params="non_attention"`` (default) = every parameter outside the attention modules (MLPs, norms,
  embeddings, head); ``"all"`` = everything. The other parameters are frozen during the run; all
  ``requires_grad`` flags are restored at the end. The model runs in eval mode (no dropout).
* Loss: ``kl`` = KL(teacher || student) per position, averaged; ``mse`` = ||H_s - H_t||^2 / ||H_t||^2.
  AdamW (``weight_decay`` 0 by default), one sample per step in a seeded order that depends only on the step, so
  a resumed run gives the same losses as an uninterrupted one.
* Checkpoints (no pickle): every ``save_every`` steps and at the end, ``out_dir/distill.safetensors`` holds the
  trainable parameters and the AdamW state tensors (``exp_avg``, ``exp_avg_sq``, ``step``), and
  ``out_dir/distill.json`` the step, the loss history and the recipe hash (written after the tensors, so it marks
  a complete checkpoint). ``resume=True`` continues from it when the recipe (plan, samples, params, lr, loss, seed,
  model geometry) matches; a different recipe is an error unless ``resume=False``, which starts over.

Returns the loss of every step from step 0 (the history of earlier runs included). The model is left patched
with the plan and holds the trained weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from compressor.args import DistillArgs
from plans.atomic import atomic_path, write_text_atomic
from plans.errors import CompressError
from plans.identity import identity_from_config, text_config
from plans.schema import Plan
from profilers.data.samples import Sample

CKPT_FORMAT = 1
STATE_FILE = "distill.safetensors"
META_FILE = "distill.json"
TEACHER_FILE = "teacher.safetensors"


def _flatten(samples) -> list[Sample]:
    if isinstance(samples, dict):
        out = [s for n in sorted(samples) for s in samples[n]]
    else:
        out = list(samples)
    if not out:
        raise CompressError("distill: no samples given")
    for i, s in enumerate(out):
        if not isinstance(s, Sample):
            raise CompressError(f"distill: sample {i} is a {type(s).__name__}, not a Sample")
        if s.length < 2:
            raise CompressError(f"distill: sample {i} has fewer than 2 tokens")
    return out


def _positions(s: Sample) -> torch.Tensor:
    tgt = torch.nonzero(s.loss_mask[1:]).squeeze(-1)
    return tgt if tgt.numel() else torch.arange(s.length - 1)


def _hash_samples(h, samples: Sequence[Sample]) -> None:
    for s in samples:
        h.update(s.input_ids.to(torch.int64).cpu().numpy().tobytes())
        h.update(s.loss_mask.to(torch.bool).cpu().numpy().tobytes())


def _teacher_recipe(model, samples, loss: str) -> str:
    h = hashlib.sha256()
    ident = identity_from_config(model.config)
    h.update(json.dumps({"identity": ident.config_hash, "model_type": ident.model_type, "loss": loss,
                         "n": len(samples)}, sort_keys=True).encode())
    _hash_samples(h, samples)
    return h.hexdigest()


def _recipe(model, plan: Plan, samples, *, params: str, lr: float, loss: str, seed: int, weight_decay: float) -> str:
    h = hashlib.sha256()
    plan_core = {"granularity": plan.granularity, "length_offset": plan.length_offset,
                 "layers": [[p.model_dump(mode="json") for p in layer.heads] for layer in plan.layers]}
    h.update(json.dumps({"teacher": _teacher_recipe(model, samples, loss), "plan": plan_core, "params": params,
                         "lr": lr, "seed": seed, "weight_decay": weight_decay, "format": CKPT_FORMAT},
                        sort_keys=True).encode())
    return h.hexdigest()


def _accepts_logits_to_keep(model) -> bool:
    from compressor.hf.modules import accepts_logits_to_keep as acc

    return acc(model)


def _forward(model, s: Sample, pos: torch.Tensor, loss: str, use_ltk: bool) -> torch.Tensor:
    dev = model.get_input_embeddings().weight.device
    ids = s.input_ids.to(dev)[None]
    pos = pos.to(dev)
    if loss == "mse":
        out = model.base_model(input_ids=ids, use_cache=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return h[0, pos].float()
    if use_ltk:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=pos).logits[0]
    else:
        logits = model(input_ids=ids, use_cache=False).logits[0, pos]
    return F.log_softmax(logits.float(), dim=-1)


def _teachers(model, samples, loss: str, out_dir: Path, use_ltk: bool) -> list[torch.Tensor]:
    path = out_dir / TEACHER_FILE
    recipe = _teacher_recipe(model, samples, loss)
    if path.exists():
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("recipe") == recipe:
                    return [f.get_tensor(f"t.{i}") for i in range(len(samples))]
        except Exception:  # noqa: BLE001 -- an unreadable cache is recomputed
            pass
    out = []
    with torch.no_grad():
        for s in samples:
            out.append(_forward(model, s, _positions(s), loss, use_ltk).cpu().contiguous())
    with atomic_path(path) as tmp:
        save_file({f"t.{i}": t for i, t in enumerate(out)}, str(tmp), metadata={"recipe": recipe})
    return out


def _sample_index(step: int, n: int, seed: int) -> int:
    epoch, k = divmod(step, n)
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[k]


def _trainable(model, params: str) -> list[tuple[str, torch.nn.Parameter]]:
    if params == "all":
        return list(model.named_parameters())
    if params != "non_attention":
        raise CompressError(f"params must be 'non_attention' or 'all', got {params!r}")
    from compressor.patching import attention_modules

    attn = {id(p) for m in attention_modules(model) for p in m.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in attn]


# --------------------------------------------------------------------------------------------------------------
# checkpoints


def _save_ckpt(out_dir: Path, named, opt: torch.optim.Optimizer, step: int, losses: list[float], recipe: str,
               info: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, p in named:
        tensors[f"param.{name}"] = p.detach().cpu().clone().contiguous()
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"opt.{key}.{name}"] = torch.as_tensor(st[key]).detach().cpu().clone().contiguous()
    with atomic_path(out_dir / STATE_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"recipe": recipe, "step": str(step), "format": str(CKPT_FORMAT)})
    write_text_atomic(out_dir / META_FILE, json.dumps(
        {"format": CKPT_FORMAT, "recipe": recipe, "step": step, "losses": losses, **info}, indent=2))


def _load_ckpt(out_dir: Path, named, opt: torch.optim.Optimizer, recipe: str) -> tuple[int, list[float]]:
    st_path, js_path = out_dir / STATE_FILE, out_dir / META_FILE
    if not js_path.exists():
        return 0, []
    if not st_path.exists():
        raise CompressError(f"{js_path}: checkpoint without its tensors {st_path.name}; delete it (or resume=False)")
    try:
        meta = json.loads(js_path.read_text())
        step, losses = int(meta["step"]), [float(x) for x in meta["losses"]]
        saved_recipe = meta["recipe"]
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise CompressError(f"{js_path}: corrupt distillation checkpoint ({e}); delete it (or resume=False)") from None
    if saved_recipe != recipe:
        raise CompressError(f"{out_dir}: the checkpoint was made with a different model, plan, samples or settings; "
                            "use another out_dir or resume=False to start over")
    try:
        with safe_open(str(st_path), framework="pt") as f:
            m = f.metadata() or {}
            if m.get("recipe") != recipe or int(m.get("step", -1)) != step:
                raise ValueError("tensors and json disagree")
            keys = set(f.keys())
            by_param = {}
            for name, p in named:
                if f"param.{name}" not in keys:
                    raise ValueError(f"no tensor for parameter {name}")
                by_param[name] = {k: f.get_tensor(f"opt.{k}.{name}") for k in ("exp_avg", "exp_avg_sq", "step")
                                  if f"opt.{k}.{name}" in keys}
                with torch.no_grad():
                    p.copy_(f.get_tensor(f"param.{name}").to(p.device, p.dtype))
    except CompressError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CompressError(f"{st_path}: corrupt distillation checkpoint ({type(e).__name__}: {e}); "
                            "delete it (or resume=False)") from None
    if len(losses) != step:
        raise CompressError(f"{js_path}: corrupt checkpoint ({len(losses)} losses for step {step})")
    for name, p in named:
        st = by_param[name]
        if st:
            opt.state[p] = {"step": st["step"].to(torch.float32) if "step" in st else torch.tensor(float(step)),
                            "exp_avg": st["exp_avg"].to(p.device, p.dtype),
                            "exp_avg_sq": st["exp_avg_sq"].to(p.device, p.dtype)}
    return step, losses


def _check_settings(*, steps: int, lr: float, save_every: int, loss: str, params: str, teacher: str) -> None:
    if steps < 0 or lr <= 0 or save_every < 1:
        raise CompressError(f"bad settings: steps={steps}, lr={lr}, save_every={save_every}")
    if loss not in ("kl", "mse"):
        raise CompressError(f"loss must be 'kl' or 'mse', got {loss!r}")
    if params not in ("non_attention", "all"):
        raise CompressError(f"params must be 'non_attention' or 'all', got {params!r}")
    if teacher not in ("auto", "cache", "copy"):
        raise CompressError(f"teacher must be 'auto', 'cache' or 'copy', got {teacher!r}")


def _teacher_kind(model, samples: list[Sample], loss: str, teacher: str, max_teacher_bytes: int) -> str:
    """``auto`` -> ``cache`` when the cached teacher outputs fit in ``max_teacher_bytes``, else ``copy``."""
    if teacher != "auto":
        return teacher
    width = text_config(model.config).vocab_size if loss == "kl" else text_config(model.config).hidden_size
    need = sum(int(_positions(s).numel()) for s in samples) * int(width) * 4
    return "cache" if need <= max_teacher_bytes else "copy"


def _step_loss(model, s: Sample, tgt: torch.Tensor, loss: str, use_ltk: bool) -> torch.Tensor:
    """The student's KD loss on one sample against the teacher's ``tgt`` (with grad)."""
    out = _forward(model, s, _positions(s), loss, use_ltk)
    if loss == "kl":
        return F.kl_div(out, tgt, log_target=True, reduction="batchmean")
    return (out - tgt).pow(2).mean() / tgt.pow(2).mean().clamp(min=1e-12)


@dataclass
class _Training:
    """One distillation's moving parts: the samples, the teacher's targets, the optimiser over ``named``
    parameters, the losses so far, and where (``out_dir``, ``recipe``, ``info``) checkpoints go."""

    model: object
    ss: list[Sample]
    target: Callable[[int, Sample], torch.Tensor]
    opt: torch.optim.Optimizer
    named: list
    losses: list[float]
    use_ltk: bool
    out_dir: Path
    recipe: str
    info: dict


def _train(tr: _Training, args: DistillArgs, start: int, on_step: Callable[[int, float], None] | None) -> None:
    """Steps ``start`` .. ``args.steps - 1``, appending to ``tr.losses``, with checkpoints and the progress helper."""
    from profilers.progress import progress as progress_helper

    model, ss, target, opt, named, losses = tr.model, tr.ss, tr.target, tr.opt, tr.named, tr.losses
    steps, loss, seed, save_every, progress = args.steps, args.loss, args.seed, args.save_every, args.progress
    use_ltk, out_dir, recipe, info = tr.use_ltk, tr.out_dir, tr.recipe, tr.info

    with progress_helper("distill", total=steps, unit="steps", done=min(start, steps), enabled=progress) as tick:
        if losses:
            tick(0, loss=losses[-1])
        for step in range(start, steps):
            i = _sample_index(step, len(ss), seed)
            s = ss[i]
            tgt = target(i, s)
            with torch.enable_grad():
                val = _step_loss(model, s, tgt, loss, use_ltk)
                if not torch.isfinite(val):
                    raise CompressError(f"distill: non-finite loss at step {step} (sample {i})")
                opt.zero_grad(set_to_none=True)
                val.backward()
            opt.step()
            losses.append(float(val.detach()))
            done = step + 1
            if done % save_every == 0 or done == steps:
                _save_ckpt(out_dir, named, opt, done, losses, recipe, info)
            tick(1, loss=losses[-1])
            if on_step is not None:
                on_step(done, losses[-1])


# --------------------------------------------------------------------------------------------------------------


def distill(model, plan: Plan, samples: Sequence[Sample] | dict[int, list[Sample]], args: DistillArgs, *,
            out_dir: str | Path, on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """KD fine-tuning of ``model`` (patched in place with ``plan``) towards its own dense outputs with
    :class:`compressor.args.DistillArgs` ``args``, checkpoints in ``out_dir``; see the module docstring.
    ``on_step(step, loss)`` is called after each step (1-based; raising from it stops the run, leaving the last
    checkpoint for a resume). Returns every step's loss from step 0 (a checkpoint already at or past ``steps`` is
    loaded and its history returned without training). Raises CompressError for bad settings or no samples."""
    steps, lr, resume, params, loss = args.steps, args.lr, args.resume, args.params, args.loss
    save_every, weight_decay, seed, teacher = args.save_every, args.weight_decay, args.seed, args.teacher
    max_teacher_bytes = args.max_teacher_bytes
    from compressor import apply

    _check_settings(steps=steps, lr=lr, save_every=save_every, loss=loss, params=params, teacher=teacher)
    ss = _flatten(samples)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        for f in (STATE_FILE, META_FILE, TEACHER_FILE):
            (out_dir / f).unlink(missing_ok=True)
    use_ltk = _accepts_logits_to_keep(model)
    was_training = model.training
    model.eval()
    teacher = _teacher_kind(model, ss, loss, teacher, max_teacher_bytes)
    teachers, teacher_model = None, None
    if teacher == "cache":
        teachers = _teachers(model, ss, loss, out_dir, use_ltk)  # before the plan is applied
    else:
        teacher_model = copy.deepcopy(model).eval().requires_grad_(False)
    recipe = _recipe(model, plan, ss, params=params, lr=lr, loss=loss, seed=seed, weight_decay=weight_decay)
    apply(model, plan)

    def target(i: int, s: Sample) -> torch.Tensor:
        if teacher_model is None:
            return teachers[i].to(model.get_input_embeddings().weight.device)
        with torch.no_grad():
            return _forward(teacher_model, s, _positions(s), loss, use_ltk)

    flags = [(p, p.requires_grad) for p in model.parameters()]
    named = _trainable(model, params)
    if not named:
        raise CompressError("distill: no trainable parameters")
    model.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    info = {"steps": steps, "lr": lr, "params": params, "loss": loss, "samples": len(ss), "seed": seed, "teacher": teacher,
            "trainable": sum(p.numel() for _, p in named)}
    try:
        start, losses = _load_ckpt(out_dir, named, opt, recipe) if resume else (0, [])
        if start >= steps:  # already there (a checkpoint past ``steps`` is kept as it is)
            return losses
        _train(_Training(model, ss, target, opt, named, losses, use_ltk, out_dir, recipe, info), args, start, on_step)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)
    return losses


__all__ = ["distill"]
