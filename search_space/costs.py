"""Cost models for candidates: prefill density, KV density and a measured latency table.

Densities follow :mod:`plans.span` (``prefill_density``, ``decode_density``). The latency table stores the
time of ONE query head's causal prefill attention at (length N, span) on one device; a KV head in a
``kv_head`` plan costs ``group_size`` times its span's time, and a GQA group decided per query head costs its
widest member (the solver takes the group maximum, see :mod:`search_space.milp`).

    >>> t = LatencyTable(device="cpu", dtype="float32", head_dim=64, entries={1024: {64: 1.0, 1024: 9.0}})
    >>> t.ms(1024, 544)
    5.0
"""

from __future__ import annotations

import bisect
import importlib
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from plans.defaults import DEFAULT_SINK
from plans.atomic import write_text_atomic
from plans.errors import CompressError
from plans.span import decode_density, kept_entries, prefill_density

from search_space.candidates import Candidate


# ------------------------------------------------------------------------------------------------ densities
def density_costs(cands: Sequence[Candidate], n: int) -> np.ndarray:
    """[C] prefill density of each candidate at length n (dense = 1)."""
    return np.array([prefill_density(min(c.span(n), n), n) for c in cands], dtype=np.float64)


def kv_density_costs(cands: Sequence[Candidate], n: int) -> np.ndarray:
    """[C] KV tokens kept / n of each candidate after a prefill of n (dense = 1)."""
    return np.array([decode_density(min(c.span(n), n), n) for c in cands], dtype=np.float64)


# ------------------------------------------------------------------------------------------------ latency
class LatencyTable(BaseModel):
    """Measured ms of one query head's causal prefill attention, per input length N and span (sink included).

    ``entries[N][span]``; the dense time at N is ``entries[N][N]``. Lookups interpolate linearly in span
    within a row, and across rows by rescaling each neighbour row's time with the work ratio
    ``kept_entries(span, N) / kept_entries(span', N')`` and interpolating linearly in N.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    device: str
    dtype: str
    head_dim: int
    kernel: str = "unknown"
    entries: dict[int, dict[int, float]]
    operators: dict[str, dict[int, float]] = Field(
        default_factory=dict, description="ms of one query head per operator (softmax, sink_window, relu_softmax, "
                                          "linear) per N, from search_space.operator_selection.measure_operator_costs")
    meta: dict = Field(default_factory=dict)

    @field_validator("entries")
    @classmethod
    def _check_entries(cls, v):
        if not v:
            raise ValueError("latency table has no entries")
        for n, row in v.items():
            if not row:
                raise ValueError(f"entries[{n}] is empty")
            for s, ms in row.items():
                if s <= 0 or s > n:
                    raise ValueError(f"entries[{n}]: span {s} outside (0, {n}]")
                if not ms >= 0:
                    raise ValueError(f"entries[{n}][{s}]: time {ms} is not >= 0")
        return v

    # -- lookups --------------------------------------------------------------------------------------------
    def _row_ms(self, n_row: int, span: int) -> float:
        row = self.entries[n_row]
        xs = sorted(row)
        ys = [row[x] for x in xs]
        if len(xs) == 1:  # one point: scale by the work ratio
            return ys[0] * kept_entries(span, n_row) / max(kept_entries(xs[0], n_row), 1)
        if span <= xs[0]:
            return max(0.0, ys[0] + (span - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
        if span >= xs[-1]:
            return max(0.0, ys[-1] + (span - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return float(np.interp(span, xs, ys))

    def ms(self, n: int, span: int) -> float:
        """Estimated ms of one query head at length n keeping ``span`` keys per query."""
        span = max(1, min(int(span), int(n)))
        rows = sorted(self.entries)
        if n in self.entries:
            return self._row_ms(n, span)

        def from_row(r: int) -> float:
            s_r = min(span, r)
            return self._row_ms(r, s_r) * kept_entries(span, n) / max(kept_entries(s_r, r), 1)

        i = bisect.bisect_left(rows, n)
        if i == 0:
            return from_row(rows[0])
        if i == len(rows):
            return from_row(rows[-1])
        lo, hi = rows[i - 1], rows[i]
        t = (n - lo) / (hi - lo)
        return (1 - t) * from_row(lo) + t * from_row(hi)

    def dense_ms(self, n: int) -> float:
        return self.ms(n, n)

    def costs(self, cands: Sequence[Candidate], n: int) -> np.ndarray:
        """[C] ms of one query head for each candidate at length n."""
        return np.array([self.ms(n, c.span(n)) for c in cands], dtype=np.float64)

    # -- files ----------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        path = Path(path)
        if not path.exists():
            raise CompressError(f"latency table not found: {path}")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CompressError(f"{path}: not a JSON file ({e})") from None
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "(root)"
            raise CompressError(f"{path}: invalid latency table: {loc}: {first['msg']}") from None


def _attention_fn() -> tuple[Callable, str]:
    """attention_kernels.dispatch.sparse_attention when present, else the reference (masked dense) attention."""
    try:
        mod = importlib.import_module("attention_kernels.dispatch")
        fn = getattr(mod, "sparse_attention")
        return fn, "attention_kernels.dispatch.sparse_attention"
    except (ImportError, AttributeError):
        from attention_kernels.reference import reference_attention

        return reference_attention, "attention_kernels.reference.reference_attention"


@dataclass(frozen=True)
class TimingOptions:
    """How :func:`measure_latency_table` times each (N, span): ``repeats`` timed calls after one warm-up (their
    median is stored), on random q/k/v drawn from a generator seeded with ``seed``."""

    repeats: int = 3
    seed: int = 0


def measure_latency_table(
    device: str = "cpu",
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    lengths: Sequence[int] = (1024, 2048),
    spans: Sequence[int] | None = None,
    sink: int = DEFAULT_SINK,
    fn: Callable | None = None,
    timing: TimingOptions = TimingOptions(),
) -> LatencyTable:
    """Time one head's prefill attention ``fn(q, k, v, sink, span, scale)`` at each (N, span); dense = span N.

    ``spans`` default: powers of two from 128 below N, plus N. ``timing``: repeats and seed (:class:`TimingOptions`).
    ``fn`` defaults to attention_kernels.dispatch.sparse_attention (falls back to the reference).
    """
    repeats, seed = timing.repeats, timing.seed
    name = getattr(fn, "__qualname__", "custom") if fn is not None else None
    if fn is None:
        fn, name = _attention_fn()
    gen = torch.Generator().manual_seed(seed)
    scale = head_dim ** -0.5
    entries: dict[int, dict[int, float]] = {}
    for n in lengths:
        n = int(n)
        if spans is None:
            row_spans = [s for s in (2 ** k for k in range(7, 20)) if s < n] + [n]
        else:
            row_spans = sorted({min(int(s), n) for s in spans} | {n})
        q = torch.randn(1, 1, n, head_dim, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        k = torch.randn(1, 1, n, head_dim, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        v = torch.randn(1, 1, n, head_dim, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        row: dict[int, float] = {}
        for s in row_spans:
            sink_t = torch.tensor([min(sink, s - 1)], dtype=torch.int64, device=device)
            span_t = torch.tensor([s], dtype=torch.int64, device=device)
            times = []
            for r in range(repeats + 1):
                _sync(device)
                t0 = time.perf_counter()
                fn(q, k, v, sink_t, span_t, scale)
                _sync(device)
                if r:  # first call is the warm-up
                    times.append((time.perf_counter() - t0) * 1e3)
            row[s] = float(np.median(times))
        entries[n] = row
    return LatencyTable(
        device=str(device) if device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        dtype=str(dtype).replace("torch.", ""), head_dim=head_dim, kernel=name, entries=entries,
        meta={"repeats": repeats, "sink": sink, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )


def _sync(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()
