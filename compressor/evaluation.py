"""`compress eval`: retrieval (LongEval lines), passkey and perplexity for dense, the plan(s) and the uniform
StreamingLLM plan at each plan's density, on the same samples and seed.

Retrieval/passkey are scored by greedy exact match, computed teacher-forced: one forward over prompt+answer,
and the answer counts as retrieved iff every answer token is the argmax given the tokens before it — exactly
what greedy decoding would produce as its first tokens, at the cost of one prefill.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from compressor.args import RULER_TASKS, TASKS, EvalArgs  # noqa: F401  (TASKS: re-exported)
from plans.errors import CompressError
from plans.schema import Plan
from profilers.data.samples import Sample



@dataclass
class Cell:
    method: str
    task: str
    n: int
    depth: float | None
    correct: int = 0
    total: int = 0
    loss_sum: float = 0.0
    tokens: int = 0
    density: float = 1.0
    outcomes: list[bool] = field(default_factory=list)  # per sample, same samples in the same order for every method

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    @property
    def ppl(self) -> float | None:
        return math.exp(self.loss_sum / self.tokens) if self.tokens else None


@dataclass
class EvalReport:
    task: str
    lengths: list[int]
    depths: list[float]
    methods: list[str]
    cells: list[Cell] = field(default_factory=list)
    seed: int = 0

    def summary(self) -> list[dict]:
        """One row per (method, length): accuracy over depths, or perplexity, plus density."""
        rows = []
        for m in self.methods:
            for n in self.lengths:
                cs = [c for c in self.cells if c.method == m and c.n == n]
                if not cs:
                    continue
                row = {"method": m, "n": n, "density": cs[0].density}
                if self.task == "ppl":
                    loss, toks = sum(c.loss_sum for c in cs), sum(c.tokens for c in cs)
                    row["ppl"] = math.exp(loss / toks) if toks else None
                else:
                    cor, tot = sum(c.correct for c in cs), sum(c.total for c in cs)
                    row["accuracy"] = cor / tot if tot else None
                    row["samples"] = tot
                    row["answer_ppl"] = math.exp(sum(c.loss_sum for c in cs) / max(1, sum(c.tokens for c in cs)))
                rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {"task": self.task, "lengths": self.lengths, "depths": self.depths, "methods": self.methods,
                "seed": self.seed, "summary": self.summary(),
                "cells": [asdict(c) | {"accuracy": c.accuracy, "ppl": c.ppl} for c in self.cells]}

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        """The report back from :meth:`to_dict`'s JSON (derived keys dropped; older files lack ``outcomes``)."""
        names = {f for f in Cell.__dataclass_fields__}
        cells = [Cell(**{k: v for k, v in c.items() if k in names}) for c in d.get("cells", [])]
        return cls(task=d["task"], lengths=list(d["lengths"]), depths=list(d["depths"]), methods=list(d["methods"]),
                   cells=cells, seed=d.get("seed", 0))


def answer_score(model, sample: Sample) -> tuple[bool, float, int]:
    """(exact match under greedy decoding, summed CE over answer tokens, answer token count), one forward."""
    ids = sample.input_ids[None]
    mask = sample.loss_mask
    first = int(mask.nonzero()[0])
    keep = ids.shape[1] - first + 1
    with torch.no_grad():
        logits = model(ids, logits_to_keep=keep, use_cache=False).logits[0, :-1].float()
    target = sample.input_ids[first:]
    ce = F.cross_entropy(logits, target, reduction="sum")
    return bool((logits.argmax(-1) == target).all()), float(ce), int(target.numel())


def validation_evaluator(model, samples: list[Sample]):
    """The Optuna study's trial measurement: ``evaluate(plan) -> {"loss", "latency_ms"}``, the answer-token CE
    (nats per answer token, mean over ``samples``) with the plan applied, and the median forward wall time (ms)
    on this device. The plan stays applied after each call (the next trial replaces it)."""
    import statistics
    import time

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


def text_loss(model, ids: torch.Tensor, chunk: int = 1024) -> tuple[float, int]:
    """Summed next-token CE over a sequence, computing the vocabulary projection in chunks."""
    with torch.no_grad():
        hidden = model.base_model(ids[None], use_cache=False).last_hidden_state[0]
        head = model.get_output_embeddings()
        total, count = 0.0, 0
        for s in range(0, ids.numel() - 1, chunk):
            e = min(s + chunk, ids.numel() - 1)
            logits = head(hidden[s:e]).float()
            total += float(F.cross_entropy(logits, ids[s + 1 : e + 1], reduction="sum"))
            count += e - s
    return total, count


def make_samples(task: str, tokenizer, lengths, depths, n_per_cell: int, seed: int, haystack: list[str],
                 style: str = "plain"):
    """{(n, depth): [Sample]} for retrieval/passkey and the RULER tasks (:mod:`profilers.data.ruler`: needles in the
    held-out ``haystack`` documents, or RULER's noise when none; ``style`` plain or chat prompt); {(n, None):
    [Sample]} for ppl (held-out text windows)."""
    from profilers.data import ruler, synthetic

    out = {}
    if task in RULER_TASKS:
        hs = ruler.Haystack("text", "\n\n".join(haystack), "heldout") if haystack else ruler.NOISE
        kw = ruler.haystack_options(task, hs)
        for n in lengths:
            for d in depths:
                out[(n, d)] = [ruler.to_sample(it, tokenizer) for it in
                               ruler.make_items(task, tokenizer, n, d, n_per_cell, seed, style=style, **kw)]
        return out
    for n in lengths:
        if task == "ppl":
            text = "\n\n".join(haystack)
            rng = synthetic.as_rng(f"{seed}-ppl-{n}")
            samples = []
            for _ in range(n_per_cell):
                ids, _ = synthetic.text_window(tokenizer, text, n, rng, what="the perplexity text")
                t = torch.tensor(ids, dtype=torch.long)
                samples.append(Sample(input_ids=t, loss_mask=torch.ones_like(t, dtype=torch.bool).index_fill(0, torch.tensor([0]), False)))
            out[(n, None)] = samples
            continue
        for d in depths:
            rng = synthetic.as_rng(f"{seed}-{task}-{n}-{d}")
            tasks = []
            for _ in range(n_per_cell):
                if task == "retrieval":
                    tasks.append(synthetic.lines_retrieval(tokenizer, n, d, rng))
                else:
                    tasks.append(synthetic.passkey(tokenizer, haystack, n, d, rng))
            out[(n, d)] = [t.to_sample() for t in tasks]
    return out


def evaluate(model, tokenizer, plans: dict[str, Plan], args: EvalArgs, *, haystack: list[str] | None = None,
             progress: bool = False) -> EvalReport:
    """Evaluate dense, the plans and their uniform baselines on identical samples. ``haystack``: the documents
    needles hide in (default: :func:`heldout_corpus` of ``args.corpus``). With ``progress``: a bar on a terminal,
    plain lines on stderr otherwise (see :mod:`profilers.progress`), one step per sample, and the stage names the
    method and length. Raises CompressError for bad ``args`` or lengths past the model's positions."""
    from compressor.methods import methods_at
    from compressor.models import check_lengths_fit
    from compressor.patching import plan_applied
    from profilers.progress import progress as progress_helper

    args.check()
    task, lengths, seed = args.task, list(args.lengths), args.seed
    check_lengths_fit(model, lengths)
    if haystack is None and task != "retrieval":
        haystack = heldout_corpus(args.corpus)
    if task in ("passkey", "ppl") and not haystack:
        raise CompressError(f"task {task} needs a real-text haystack (--corpus)")
    depths = list(args.depths) if task != "ppl" else []
    data = make_samples(task, tokenizer, lengths, depths or [None], args.samples, seed, haystack or [])
    report = EvalReport(task=task, lengths=lengths, depths=depths, methods=[], seed=seed)
    axes = ("prefill_density",) if args.include_uniform else ()
    per_n = {n: methods_at(plans, n, axes) for n in lengths}
    count = {n: sum(len(ss) for (nn, _), ss in data.items() if nn == n) * len(per_n[n]) for n in lengths}
    prog = progress_helper(f"eval {task}", total=sum(count.values()), unit="samples",
                           work_total=sum(c * n for n, c in count.items()), enabled=progress)
    with prog as tick:
        for n in lengths:
            for m in per_n[n]:
                if m.name not in report.methods:
                    report.methods.append(m.name)
            for m in per_n[n]:
                tick(0, stage=f"eval {task}: {m.name} N={n}")
                with plan_applied(model, m.plan):
                    report.cells += [_score_cell(model, task, m.name, n, d, m.plan, ss, tick)
                                     for (nn, d), ss in data.items() if nn == n]
    return report


def _score_cell(model, task: str, name: str, n: int, depth, plan: Plan | None, samples, tick) -> Cell:
    """One (method, length, depth) cell over its samples, with the model already under ``plan``."""
    cell = Cell(name, task, n, depth, density=1.0 if plan is None else plan.density(n))
    for s in samples:
        if task == "ppl":
            loss, toks = text_loss(model, s.input_ids)
        else:
            ok, loss, toks = answer_score(model, s)
            cell.correct += int(ok)
            cell.total += 1
            cell.outcomes.append(bool(ok))
        cell.loss_sum += loss
        cell.tokens += toks
        tick(1, work=n)
    return cell


def heldout_corpus(corpus: str) -> list[str]:
    """The held-out documents of ``corpus`` (``austen``, ``wikipedia``, files; comma-separated for several): the
    same split calibration uses, so eval never sees calibration text."""
    from profilers.data.corpora import load_corpus, split_corpus

    docs = load_corpus(corpus.split(",") if "," in corpus else corpus)
    return list(split_corpus(docs).heldout)


def heatmap_png(report: EvalReport, path) -> None:
    """Accuracy by length x depth, one panel per method."""
    accuracy_png([report], path)


def accuracy_png(reports: list[EvalReport], path, methods: list[str] | None = None) -> bool:
    """Accuracy by length x depth: one row of panels per accuracy task, one column per method (dense, plans,
    uniform side by side, in ``methods`` order when given), each square labelled correct/total. Perplexity
    reports are skipped; returns False (nothing written) when no accuracy task is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from plans.atomic import atomic_path

    reports = [r for r in reports if r.task != "ppl"]
    if not reports:
        return False
    cols = methods or list(dict.fromkeys(m for r in reports for m in r.methods))
    fig, axes = plt.subplots(len(reports), len(cols), figsize=(3.2 * len(cols), 2.8 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        for j, (ax, m) in enumerate(zip(row, cols)):
            im = _accuracy_panel(ax, report, m)
            ax.tick_params(labelleft=j == 0)
        row[0].set_ylabel(f"{report.task}: length")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _accuracy_panel(ax, report: EvalReport, method: str):
    grid = torch.full((len(report.lengths), len(report.depths)), float("nan"))
    correct = total = 0
    for c in report.cells:
        if c.method == method and c.accuracy is not None:
            i, j = report.lengths.index(c.n), report.depths.index(c.depth)
            grid[i, j] = c.accuracy
            correct, total = correct + c.correct, total + c.total
            ax.text(j, i, f"{c.correct}/{c.total}", ha="center", va="center", fontsize=8)
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_title(f"{method}: {correct}/{total}", fontsize=9)
    ax.set_xticks(range(len(report.depths)), [f"{d:g}" for d in report.depths])
    ax.set_yticks(range(len(report.lengths)), [str(n) for n in report.lengths])
    ax.set_xlabel("depth")
    return im
