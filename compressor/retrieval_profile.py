"""`compress profile --method retrieval`'s driver: score every KV head by its attention on held-in needles.

For each held-in needle prompt (RULER ``niah_single``, or ``niah_multikey`` where the queried needle sits among
distractors with other keys; haystack = the calibration side of the corpus, seeds of their
own: never an evaluation item), one forward pass (no grad) through
:data:`compressor.hf.retrieval_attention.RETRIEVAL_ATTN` records, per layer and query head, the attention mass the
question rows (every prompt position after the context: where the key is read; or the last ``query_rows``
positions) put on the needle (:func:`profilers.retrieval.needle_attention_mass`). Scores are averaged over query
heads per KV head and over samples; the even/odd sample halves are kept to report how stable the ranking is.

Why the question rows (measured, ``benchmarks/results/fidelity_method.md``): on Qwen2.5-Coder-0.5B the heads that
match the queried key sit in layers 8-15 and look at the needle from the question, not from the last rows; ranked
by the last 6 rows, the top 16 kept dense retrieve 15/50 held-out multikey needles, ranked by the question rows
43/50 (single needles 50/50 either way).
"""

from __future__ import annotations

import random
from pathlib import Path
from collections.abc import Sequence

import torch

from compressor.args import RetrievalArgs
from compressor.hf.modules import check_model_supported, text_geometry
from compressor.hf.retrieval_attention import RetrievalProbe, retrieval_mode
from plans.defaults import DEFAULT_LOCAL_SPAN, DEFAULT_SINK
from plans.errors import CompressError
from plans.identity import identity_from_config
from profilers.data import ruler
from profilers.progress import progress as progress_helper
from profilers.retrieval import RetrievalScores, kv_head_scores, ranking_agreement

SEED_SALT = 104729  # keeps retrieval-scoring items apart from evaluation items of the same base seed
RETRIEVAL_TASKS = ("niah_single", "niah_multikey")  # RULER tasks with one queried (anchor) needle to score


def check_retrieval_task(task: str) -> None:
    """Raise CompressError unless ``task`` is one of :data:`RETRIEVAL_TASKS` (the CLI calls it before loading a
    model)."""
    if task not in RETRIEVAL_TASKS:
        raise CompressError(f"retrieval scoring needs a task with one queried needle: must be one of "
                            f"{', '.join(RETRIEVAL_TASKS)}, got {task!r}")


def retrieval_items(tokenizer, lengths: Sequence[int], samples: int, seed: int = 0, corpus: str | None = "austen",
                    task: str = "niah_single") -> list[ruler.EvalItem]:
    """``samples`` held-in ``task`` prompts per length (one of :data:`RETRIEVAL_TASKS`), depths of the queried
    needle drawn uniformly in [0.05, 0.95].

    The haystack is the calibration side of ``corpus`` (``None``: RULER noise); item seeds are salted so they
    differ from :func:`profilers.data.ruler.item_seed` of any evaluation cell. Raises CompressError for another task."""
    check_retrieval_task(task)
    hay = ruler.NOISE if corpus is None else ruler.Haystack.calibration_side(corpus)
    single = task == "niah_single"  # niah_single keeps its original streams: earlier scores reproduce
    rng = random.Random(f"retrieval\0{seed}" if single else f"retrieval\0{task}\0{seed}")
    items = []
    for n in lengths:
        for i in range(samples):
            depth = round(rng.uniform(0.05, 0.95), 3)
            s = ruler.item_seed("retrieval-niah" if single else f"retrieval-{task}", int(n), depth, seed + SEED_SALT, i)
            items.append(ruler.make_item(task, tokenizer, int(n), depth, s, haystack=hay, style="plain"))
    return items


def item_needle_mass(model, item: ruler.EvalItem, query_rows: int | None) -> torch.Tensor:
    """[L, Hq] needle attention mass of one prompt: on the anchor needle's token span, averaged over the last
    ``query_rows`` rows (None: every row after the context, i.e. the question, where the key is read, and the
    answer prefix)."""
    a = item.anchor
    if a is None:
        raise CompressError(f"retrieval scoring needs a needle item, got task {item.task!r}")
    n = len(item.prompt_ids)
    if query_rows is None:
        query_rows = n - item.context_span[1]
    positions = torch.arange(max(0, n - query_rows), n)
    probe = RetrievalProbe(positions=positions, needle=a.span)
    dev = model.get_input_embeddings().weight.device
    with retrieval_mode(model, probe), torch.no_grad():
        model(input_ids=torch.tensor([item.prompt_ids], device=dev), use_cache=False, logits_to_keep=1)
    L = len(probe.mass)
    if sorted(probe.mass) != list(range(L)) or L == 0:
        raise CompressError(f"retrieval scoring saw layers {sorted(probe.mass)}: every layer must report once")
    return torch.stack([probe.mass[i] for i in range(L)])


def run_retrieval_profile(model, tokenizer, args: RetrievalArgs = RetrievalArgs(), *,
                          show_progress: bool = True) -> RetrievalScores:
    """Retrieval scores [L, Hkv] of ``model`` over ``args.samples`` held-in ``args.task`` prompts per length (the
    mass on the queried needle; with ``niah_multikey``, among distractor needles) from the last ``args.query_rows``
    rows (None: the question rows, see :func:`item_needle_mass`).

    Raises CompressError for samples < 2, query_rows < 1, a task without one queried needle, or a model the
    profiler does not support."""
    lengths, samples, seed, corpus = args.lengths, args.samples, args.seed, args.corpus
    query_rows, task = args.query_rows, args.task
    if samples < 2:
        raise CompressError(f"retrieval scoring needs at least 2 samples (two halves), got {samples}")
    if query_rows is not None and query_rows < 1:
        raise CompressError(f"query_rows must be >= 1 (or None: the question rows), got {query_rows}")
    check_model_supported(model, "scored")
    _, _, n_kv = text_geometry(model.config)
    items = retrieval_items(tokenizer, lengths, samples, seed, corpus, task)
    masses = []
    with progress_helper("retrieval scoring", total=len(items), enabled=show_progress) as tick:
        for item in items:
            masses.append(kv_head_scores(item_needle_mass(model, item, query_rows), n_kv))
            tick()
    stack = torch.stack(masses)  # [S, L, Hkv]
    halves = torch.stack([stack[0::2].mean(0), stack[1::2].mean(0)])
    scores = stack.mean(0)
    k = max(1, scores.numel() // 3)
    meta = {
        "model": identity_from_config(model.config).model_dump(mode="json"),
        "lengths": [int(n) for n in lengths], "samples_per_length": samples, "seed": seed, "corpus": corpus,
        "query_rows": "question" if query_rows is None else query_rows, "task": f"{task} (held-in)",
        "halves_agreement": ranking_agreement(halves[0], halves[1], k),
    }
    return RetrievalScores(scores=scores, halves=halves, meta=meta)


def check_scores_fit(scores: RetrievalScores, ident, where: str = "the retrieval scores",
                     whose: str = "the model") -> None:
    """Raise CompressError unless ``scores`` are [layers x KV heads] of ``ident`` (a ModelIdentity)."""
    if tuple(scores.scores.shape) != (ident.num_layers, ident.num_kv_heads):
        raise CompressError(f"{where} are [{scores.scores.shape[0]} x {scores.scores.shape[1]}] but {whose} has "
                            f"{ident.num_layers} layers x {ident.num_kv_heads} KV heads")


def kept_retrieval_heads(prof, retrieval: RetrievalScores | str | Path, budgets: Sequence[str],
                         keep_dense: str = "auto", local_span: int = DEFAULT_LOCAL_SPAN,
                         lengths: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The (layer, KV head) pairs to keep dense: the ``keep_dense`` top-scored heads of the retrieval scores, or
    with ``"auto"`` as many as fit the budgets at ``lengths`` (default: the profile's) while every other head keeps
    a sink + window of ``local_span`` tokens (:func:`search_space.keep_dense.largest_keep_dense`).

    Raises CompressError when the scores do not match the profile's model or ``keep_dense`` is not auto / 0..heads."""
    from profilers.retrieval import load_retrieval
    from search_space.budgets import parse_budgets
    from search_space.keep_dense import largest_keep_dense

    r = retrieval if isinstance(retrieval, RetrievalScores) else load_retrieval(retrieval)
    ident = prof.meta.model
    where = "the retrieval scores" if isinstance(retrieval, RetrievalScores) else f"retrieval scores {retrieval}"
    check_scores_fit(r, ident, where, "the profile's model")
    ranked = r.top(r.scores.numel())
    if keep_dense == "auto":
        sink = int(min(prof.meta.sink_sizes or [DEFAULT_SINK]))
        k = largest_keep_dense(ident, ranked, parse_budgets(list(budgets)), sorted(lengths or prof.meta.lengths),
                               span=local_span, sink=sink)
    else:
        try:
            k = int(keep_dense)
        except ValueError:
            raise CompressError(f"--keep-dense must be 'auto' or a whole number, got {keep_dense!r}") from None
        if not 0 <= k <= len(ranked):
            raise CompressError(f"--keep-dense {k}: must be in [0, {len(ranked)}] (KV heads of the model)")
    return ranked[:k]
