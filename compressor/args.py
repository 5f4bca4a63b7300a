"""The arguments of every stage, with their defaults and checks in one place (llm-compressor's ``args/``).

The CLI maps its options onto these once; the Python API (:mod:`compressor.pipeline`) and `compress run`
(:mod:`compressor.run`, whose :class:`RunConfig` is a composition of them) take them as they are. Importing this
module is cheap (no torch). The search's own arguments are :class:`search_space.args.SearchArgs`.

    CalibrationArgs   the calibration set: lengths, samples per length, sources, seed
    PlacementArgs     a model split across devices (device_map, max_memory, offload_folder)
    InfluenceArgs     the influence profile (MoA's first-order estimate): block, sinks, row block, ...
    GateArgs          the gate profile (DuoAttention-style gates)
    RetrievalArgs     retrieval-head scores on held-in needles
    ProfileArgs       `compress profile`: which method, on which calibration set, with which settings
    PlanArgs          `compress search`: budgets, the plan shape, the search, the trials' validation set
    EvalArgs          `compress eval`: task, lengths, depths, samples, held-out corpus
    BenchArgs         `compress bench`: lengths, repeats, decode steps, ...
    RunConfig         `compress run`: the above composed, with the run's defaults
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from plans.defaults import DEFAULT_BLOCK, DEFAULT_LOCAL_SPAN, DEFAULT_SINK
from plans.errors import CompressError
from search_space.args import SearchArgs

RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")
TASKS = ("retrieval", "passkey", "ppl") + RULER_TASKS
PROFILE_METHODS = ("influence", "gates", "retrieval")  # "taylor": the older name of "influence", still accepted
PLAN_SHAPES = ("keep_dense", "search")
DEFAULT_SOURCES = ("austen", "passkey", "lines", "qa")


@dataclass(frozen=True)
class CalibrationArgs:
    """The calibration set: ``samples`` per length in ``lengths`` (tokens) drawn from ``sources`` (corpus names,
    ``passkey``, ``lines``, ``qa``, or text files) with ``seed``."""

    lengths: tuple[int, ...] = (1024, 2048, 4096)
    samples: int = 4
    sources: tuple[str, ...] = DEFAULT_SOURCES
    seed: int = 0

    def recipe(self, model_name: str):
        """The :class:`profilers.data.calibration.CalibrationRecipe`; raises CompressError for a bad one."""
        from profilers.data.calibration import CalibrationRecipe

        try:
            return CalibrationRecipe(sources=list(self.sources), lengths=list(self.lengths),
                                     samples_per_length=self.samples, seed=self.seed, model=model_name)
        except ValueError as e:
            raise CompressError(f"bad calibration recipe: {e}") from None


@dataclass(frozen=True)
class PlacementArgs:
    """A model split across devices: ``device_map`` (auto | balanced | a JSON map), ``max_memory`` (per device),
    ``offload_folder`` (weights offloaded to disk); all None: the model on one device."""

    device_map: object = None
    max_memory: object = None
    offload_folder: str | None = None

    def kwargs(self) -> dict:
        """``from_pretrained`` keywords (:func:`compressor.placement.placement_kwargs`)."""
        from compressor.placement import placement_kwargs

        return placement_kwargs(self.device_map, self.max_memory, self.offload_folder)


@dataclass(frozen=True)
class InfluenceArgs:
    """Settings of the influence profile (MoA's first-order estimate, streamed): distances bucketed by ``block``
    tokens; the sink sizes in ``sink_sizes`` (tokens) profiled; query rows recomputed ``row_block`` at a time and
    at most ``max_block_elems`` score entries per block; ``allow_extrapolation``: lengths past the model's
    positions; ``loss_mode``: the loss the gradients are of (answer_ce: CE over answer tokens); ``resume``: continue
    from the partial files; ``progress``: a bar on stderr."""

    block: int = DEFAULT_BLOCK
    sink_sizes: tuple[int, ...] = (DEFAULT_SINK,)
    row_block: int = 256
    allow_extrapolation: bool = False
    loss_mode: str = "answer_ce"
    resume: bool = True
    max_block_elems: int | None = None  # None: profilers.influence.DEFAULT_MAX_BLOCK_ELEMS
    progress: bool = True


@dataclass(frozen=True)
class GateArgs:
    """Settings of the gate profile (DuoAttention-style per-head gates): the operator ``pair`` a gate mixes, the
    cheap side's ``window`` (sink, span) in tokens, ``steps`` Adam steps at learning rate ``lr`` with an L1 weight
    ``l1`` on the gates, per ``granularity`` (kv_head | query_head) head, gate logits starting at ``init_logit``,
    distillation at ``positions`` (targets: the answer tokens | all), ``block``: the profile's distance bucket
    (tokens), ``seed``: the sample order, ``progress``: a bar on stderr."""

    pair: str = "full_vs_window"  # profilers.gates.PAIRS
    window: tuple[int, int] = (DEFAULT_SINK, DEFAULT_LOCAL_SPAN)
    steps: int = 200
    lr: float = 0.05
    l1: float = 0.05
    granularity: str = "kv_head"
    block: int = DEFAULT_BLOCK
    positions: str = "targets"
    init_logit: float = 3.0
    progress: bool = True
    seed: int = 0


@dataclass(frozen=True)
class RetrievalArgs:
    """How retrieval heads are scored: ``samples`` held-in ``task`` prompts (niah_single | niah_multikey) per length
    in ``lengths`` (tokens) from ``seed``, needles hidden in the calibration side of ``corpus`` (None: RULER noise),
    read from the last ``query_rows`` rows (None: the question rows, see :func:`item_needle_mass`)."""

    lengths: tuple[int, ...] = (1024,)
    samples: int = 8
    seed: int = 0
    corpus: str | None = "austen"
    query_rows: int | None = None
    task: str = "niah_single"


@dataclass(frozen=True)
class EvalArgs:
    """What `compress eval` measures: ``task`` at ``lengths`` (tokens) × ``depths`` (needle position, 0..1; unused
    for ppl), ``samples`` items per cell from ``seed``, needles hidden in the held-out documents of ``corpus``
    (:func:`heldout_corpus`: never calibration text) for every task that takes a haystack; ``include_uniform``
    adds each plan's uniform window at equal prefill density (:func:`compressor.methods.methods_at`)."""

    task: str = "passkey"
    lengths: tuple[int, ...] = (2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    samples: int = 2
    seed: int = 0
    corpus: str = "austen"
    include_uniform: bool = True

    def check(self) -> None:
        """Raise CompressError for an unknown task or a count below 1."""
        if self.task not in TASKS:
            raise CompressError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.samples < 1 or not self.lengths:
            raise CompressError(f"eval needs --samples >= 1 and at least one length (got {self.samples}, "
                                f"{list(self.lengths)})")


@dataclass(frozen=True)
class BenchArgs:
    """What `compress bench` measures. At every length in ``lengths`` (tokens): ``repeats`` alternating prefill
    samples per method (dense attention alone with ``attention``, the whole model with ``whole_model``), and with
    ``decode`` one prefill filling the cache then ``decode_steps`` greedy decode steps. ``time_decode_prefill``:
    that prefill also counts as a whole-model prefill sample, so ``repeats=0`` gives a light bench. ``density``:
    the uniform plan measured when no plan is given; ``threads``: torch's threads (None: unchanged);
    ``kernel_table``: a path to also write the latency table `compress search --latency-table` reads;
    ``kv_budget_gib``: instead, decode throughput at that KV memory budget (GiB) with at most ``max_batch``
    sequences (:func:`throughput`)."""

    lengths: tuple[int, ...] = (4096,)
    repeats: int = 3
    decode_steps: int = 8
    whole_model: bool = True
    attention: bool = True
    decode: bool = True
    time_decode_prefill: bool = False
    density: float = 0.25
    threads: int | None = None
    kernel_table: str | None = None
    kv_budget_gib: float | None = None
    max_batch: int = 64

    def check(self) -> None:
        """Raise CompressError for a non-positive KV budget or max batch, or no length."""
        if self.kv_budget_gib is not None and (self.kv_budget_gib <= 0 or self.max_batch < 1):
            raise CompressError(f"--kv-budget must be > 0 GiB and --max-batch >= 1 (got {self.kv_budget_gib}, "
                                f"{self.max_batch})")
        if not self.lengths:
            raise CompressError("bench needs at least one length")


@dataclass(frozen=True)
class DistillArgs:
    """KD fine-tuning (:func:`compressor.distill.distill`): ``steps`` AdamW steps at learning rate ``lr`` (weight
    decay ``weight_decay``) on ``params`` (non_attention | all) towards the dense model's outputs under ``loss``
    (kl | mse), samples in a ``seed``-ed order, a checkpoint every ``save_every`` steps, ``resume`` from it; the
    teacher's outputs cached (``cache``), a frozen copy (``copy``) or chosen by size against ``max_teacher_bytes``
    (``auto``); ``progress``: a bar on stderr."""

    steps: int = 100
    lr: float = 1e-4
    resume: bool = True
    progress: bool = True
    params: str = "non_attention"
    loss: str = "kl"
    save_every: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    teacher: str = "auto"
    max_teacher_bytes: int = 2 << 30


@dataclass(frozen=True)
class ProfileArgs:
    """`compress profile`: ``method`` influence (per-head gradients, MoA) | gates | retrieval, on the
    ``calibration`` set, with the method's settings (``influence``, ``gates``, ``retrieval``: its lengths, samples
    and seed come from ``calibration``)."""

    method: str = "influence"
    calibration: CalibrationArgs = CalibrationArgs()
    influence: InfluenceArgs = InfluenceArgs()
    gates: GateArgs = GateArgs()
    retrieval: RetrievalArgs = RetrievalArgs()

    def check(self) -> None:
        """Raise CompressError for an unknown method."""
        if self.method not in (*PROFILE_METHODS, "taylor"):
            raise CompressError(f"unknown profiling method {self.method!r} (available: {', '.join(PROFILE_METHODS)})")


@dataclass(frozen=True)
class PlanArgs:
    """`compress search`: one plan under ``budgets`` (``0.5``, ``density@4096=0.25``, ``kv_density@…``,
    ``latency@4096<=120ms``).

    ``shape``: ``search`` (the influence profile solved by the MILP, optionally inside an Optuna study, around the
    kept retrieval heads) | ``keep_dense`` (the top retrieval heads the budgets afford dense, every other KV head
    sink + ``local_span``). ``search``: the solver / study settings (its ``lengths``: where the budgets hold).
    ``keep_dense``: with retrieval scores, how many top heads stay dense (``auto``: as many as the budgets allow
    with every other head at ``local_span``). ``validate_length`` / ``val_samples`` / ``val_sources``: the held-out
    validation samples study trials are measured on (0: trials use the predicted values)."""

    budgets: tuple[str, ...] = ("0.5",)
    shape: str = "search"
    search: SearchArgs = SearchArgs()
    keep_dense: str = "auto"
    local_span: int = DEFAULT_LOCAL_SPAN
    validate_length: int = 0
    val_samples: int = 1
    val_sources: tuple[str, ...] = ("austen", "passkey", "qa")

    def check(self) -> None:
        """Raise CompressError for an unknown shape or no budget."""
        if self.shape not in PLAN_SHAPES:
            raise CompressError(f"--plan-shape must be {' or '.join(PLAN_SHAPES)}, got {self.shape!r}")
        if not self.budgets:
            raise CompressError("give at least one --budget")

    def validation(self, seed: int) -> CalibrationArgs:
        """The validation set's calibration arguments (seed ``seed + 1``: apart from the calibration samples)."""
        return CalibrationArgs(lengths=(self.validate_length,), samples=self.val_samples,
                               sources=tuple(self.val_sources), seed=seed + 1)


@dataclass(frozen=True)
class RunConfig:
    """`compress run`'s arguments: the stage arguments it composes, with the run's defaults.

    ``calibration``: the profile's calibration set (its seed seeds every stage); ``influence``: the influence
    profile (block, sinks); ``retrieval_samples``: held-in needle prompts scoring retrieval heads at the shortest
    calibration length (0: none kept dense); ``plan``: budgets, plan shape and search (its lengths: the eval
    lengths, where the plan is judged); ``eval_tasks`` × ``eval``; ``bench_length``: the light bench's length
    (None: the longest eval length, 0: no bench) with ``bench_decode_steps`` decode steps."""

    model: str | None = None
    out: str = "runs/default"
    calibration: CalibrationArgs = CalibrationArgs(lengths=(1024, 2048), samples=6,  # austen, passkey, qa cycled
                                                   sources=("austen", "passkey", "qa"))
    influence: InfluenceArgs = InfluenceArgs()
    retrieval_samples: int = 8
    # keep_dense: top retrieval heads dense, the rest at local_span (measured best, benchmarks/results/
    # fidelity_method.md); search: influence profile + MILP/Optuna
    plan: PlanArgs = PlanArgs(budgets=("0.5", "0.25"), shape="keep_dense", validate_length=3072,
                              search=SearchArgs(trials=4, K=2, time_limit=30.0))
    eval_tasks: tuple[str, ...] = ("niah_single", "ppl")  # RULER single needle, plain prompt
    eval: EvalArgs = EvalArgs(lengths=(2048, 4096), depths=(0.1, 0.5, 0.9), samples=1)
    bench_length: int | None = None
    bench_decode_steps: int = 8

    @property
    def seed(self) -> int:
        return self.calibration.seed

    def plan_args(self) -> PlanArgs:
        """The plan stage's arguments: budgets hold at the eval lengths (where the plan serves and is judged); the
        keep_dense shape takes the smallest profiled sink, the search the profiled sinks; trials validate on the
        run's calibration sources at ``validate_length``, the search seeded by the run's seed."""
        sinks = tuple(int(x) for x in self.influence.sink_sizes) if self.plan.shape == "keep_dense" else None
        search = replace(self.plan.search, lengths=tuple(sorted(set(self.eval.lengths))), sinks=sinks,
                         seed=self.seed, resume=True)
        return replace(self.plan, search=search, val_sources=tuple(self.calibration.sources))


def args_to_json(args) -> str:
    """``args`` (any of these dataclasses, nested) as JSON text: how `compress profile --workers` hands its
    arguments to every rank."""
    import json
    from dataclasses import asdict

    return json.dumps(asdict(args), sort_keys=True)


def args_from_json(cls, text: str):
    """The ``cls`` dataclass back from :func:`args_to_json`'s text (nested dataclasses rebuilt, lists as tuples);
    raises CompressError for text that is not such JSON."""
    import json

    try:
        return _from_dict(cls, json.loads(text))
    except (ValueError, TypeError) as e:
        raise CompressError(f"bad {cls.__name__} JSON: {e}") from None


def _from_dict(cls, data: dict):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kw[f.name] = value
    return cls(**kw)


__all__ = ["args_from_json", "args_to_json", "BenchArgs", "CalibrationArgs", "DistillArgs", "EvalArgs", "GateArgs", "InfluenceArgs", "PlacementArgs", "PlanArgs",
           "ProfileArgs", "RetrievalArgs", "RunConfig", "SearchArgs", "DEFAULT_SOURCES", "PLAN_SHAPES", "PROFILE_METHODS",
           "RULER_TASKS", "TASKS"]
