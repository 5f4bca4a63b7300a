"""Import other tools' plan files into our Plan.

MoA (``{"alphas": [[...]], "betas": [[...]]}``, one row per layer, one value per *query* head after MoA's
MHA expansion). MoA's run time (``moa_config_to_cache_config``) keeps, at input length N' = prompt + 1024::

    cache = ceil(max(min(int(alpha + beta*N'), N'), 128) / 64) * 64 ;  sink = min(cache, 64) ; local = cache - sink

We import each head as ``SinkWindowPattern(sink=64, alpha, beta, min_span=128, block=64)`` and set the plan's
``length_offset`` (MoA's +1024 by default), so :func:`plans.span.span_at` gives the same ``cache`` tokens:
floor, lower clamp 128, round up to 64, cap at N. (MoA caps at N' before rounding, we round then cap: both
give every token when the rule exceeds the input.) The sink lies inside the span, as in MoA's run time; MoA's
search-time layout keeps one extra 64-token block, which we do not reproduce.

DuoAttention: a full-attention-head table, one row per layer and one value per KV head (TSV/whitespace text
or a JSON list of lists). Heads with value >= ``threshold`` stay dense; the others become sink + recent
(``sink`` + ``recent`` tokens, constant).

Every number is checked and a bad one ends in a CompressError naming the file, the position and the value:
NaN / ±Infinity (as JSON literals, strings like ``"nan"`` or text-table cells) and numbers too large for a
float are refused everywhere. MoA alphas may be any finite real (MoA's own plans hold negative ones; the
imported span is clamped to >= ``MOA_MIN_SPAN`` tokens); betas must lie in [0, 1]. DuoAttention gate values
may be any finite real; the threshold must be finite, ``sink >= 0`` and ``recent >= 1``.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import ValidationError

from plans.defaults import DEFAULT_SINK
from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.io import describe_validation_error, loads_json
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern

MOA_SINK, MOA_BLOCK, MOA_MIN_SPAN, MOA_NEW_TOKENS = 64, 64, 128, 1024
_ALPHA_HINT = f" (an alpha is any finite number of tokens, negative included: the span is clamped to >= {MOA_MIN_SPAN})"
_BETA_HINT = " (a beta is a finite number in [0, 1], tokens per input token)"


def _matrix(rows, what: str, n_layers: int, n_heads: int, where: str, hint: str = "") -> list[list[float]]:
    if not isinstance(rows, list) or len(rows) != n_layers:
        got = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise CompressError(f"{where}: {what} has {got} rows, the model has {n_layers} layers")
    out = []
    for li, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n_heads:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise CompressError(f"{where}: {what}[{li}] has {got} values, expected {n_heads} heads")
        out.append([_number(x, f"{what}[{li}][{hi}]", where, hint) for hi, x in enumerate(row)])
    return out


def _number(x, pos: str, where: str, hint: str = "") -> float:
    """A finite float from a JSON value, or a CompressError naming the position and the value."""
    try:
        v = float(x)
    except (TypeError, ValueError, OverflowError):
        v = None
    if v is None:
        raise CompressError(f"{where}: {pos} = {_show(x)} is not a number")
    if not math.isfinite(v):
        raise CompressError(
            f"{where}: {pos} = {_show(x)} is not a finite number; NaN and Infinity are not accepted{hint}")
    return v


def _finite(x) -> bool:
    """A real number (not a bool) that is finite."""
    if isinstance(x, bool):
        return False
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError, OverflowError):
        return False


def _show(x) -> str:
    try:
        s = repr(x)
    except ValueError:  # an int too long to print
        return "<a number too long to print>"
    return s if len(s) <= 40 else s[:37] + "..."


def _plan(where: str, **kw) -> Plan:
    """Plan(**kw), its validation errors as a CompressError naming ``where``."""
    try:
        return Plan(**kw)
    except ValidationError as e:
        raise CompressError(f"{where}: the imported plan is invalid: {describe_validation_error(e)}") from None


def from_moa(data: dict, model: ModelIdentity, *, new_tokens: int = MOA_NEW_TOKENS, where: str = "MoA plan") -> Plan:
    """A MoA alphas/betas dict -> Plan. Accepts per-query-head (MoA's MHA-expanded) or per-KV-head shapes."""
    if not isinstance(data, dict) or "alphas" not in data or "betas" not in data:
        raise CompressError(f"{where}: a MoA plan needs the keys 'alphas' and 'betas'")
    alphas_in = data["alphas"]
    n_rows = len(alphas_in[0]) if isinstance(alphas_in, list) and alphas_in and isinstance(alphas_in[0], list) else -1
    granularity = "kv_head" if n_rows == model.num_kv_heads and model.num_kv_heads != model.num_heads else "query_head"
    n = model.num_kv_heads if granularity == "kv_head" else model.num_heads
    alphas = _matrix(data["alphas"], "alphas", model.num_layers, n, where, _ALPHA_HINT)
    betas = _matrix(data["betas"], "betas", model.num_layers, n, where, _BETA_HINT)
    if not (_finite(new_tokens) and float(new_tokens) == int(new_tokens) >= 0):
        raise CompressError(f"MoA new_tokens = {new_tokens!r}: must be a whole number of tokens >= 0")
    new_tokens = int(new_tokens)
    layers = []
    for li in range(model.num_layers):
        heads = []
        for h in range(n):
            a, b = alphas[li][h], betas[li][h]
            if not 0 <= b <= 1:
                raise CompressError(f"{where}: betas[{li}][{h}] = {b!r} is outside [0, 1]{_BETA_HINT}")
            heads.append(SinkWindowPattern(sink=MOA_SINK, alpha=a, beta=b, min_span=MOA_MIN_SPAN, block=MOA_BLOCK))
        layers.append(LayerPlan(heads=heads))
    return _plan(where, model=model, granularity=granularity, source="import:moa", length_offset=new_tokens,
                 layers=layers)


def from_duo(rows: list[list[float]], model: ModelIdentity, *, threshold: float = 0.5, sink: int = DEFAULT_SINK,
             recent: int = 256, where: str = "DuoAttention table") -> Plan:
    if not _finite(threshold):
        raise CompressError(f"DuoAttention threshold = {threshold!r}: must be a finite number")
    for name, v, lo in (("sink", sink, 0), ("recent", recent, 1)):
        if not (_finite(v) and float(v) == int(v) >= lo):
            raise CompressError(f"DuoAttention {name} = {v!r}: must be a whole number of tokens >= {lo}")
    sink, recent = int(sink), int(recent)
    table = _matrix(rows, "head table", model.num_layers, model.num_kv_heads, where)
    stream = SinkWindowPattern(sink=sink, alpha=sink + recent, beta=0.0)
    layers = [LayerPlan(heads=[DensePattern() if v >= threshold else stream for v in row]) for row in table]
    return _plan(where, model=model, granularity="kv_head", source="import:duo", layers=layers)


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError as e:
        raise CompressError(f"{path}: not a text file ({e})") from None


def read_table(path: Path) -> list[list[float]]:
    """A DuoAttention head table: a JSON list of lists, or text (TSV, CSV, NumPy ``savetxt``; ``#`` comments).

    Every cell must be a finite number; a bad one is named by line and column (and its [layer][head] index).
    """
    path = Path(path)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        return loads_json(text, str(path), root="head table")
    rows = []
    for ln, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            row = []
            for ci, tok in enumerate(line.replace(",", " ").split()):
                li = len(rows)
                at = f"{path}: line {ln}, column {ci + 1} (head table[{li}][{ci}]: layer {li}, KV head {ci})"
                try:
                    v = float(tok)
                except ValueError:
                    raise CompressError(f"{at} = {_show(tok)} is not a number") from None
                if not math.isfinite(v):
                    raise CompressError(f"{at} = {_show(tok)} is not a finite number; NaN and Infinity are not accepted")
                row.append(v)
            rows.append(row)
    return rows


def import_plan_file(path: str | Path, model: ModelIdentity, *, fmt: str = "auto", **kw) -> Plan:
    """Import a MoA JSON or a DuoAttention head table, detected from the content when ``fmt='auto'``."""
    path = Path(path)
    if not path.exists():
        raise CompressError(f"file not found: {path}")
    text = _read_text(path)
    if fmt == "auto":
        fmt = "moa" if '"alphas"' in text else "duo"
    if fmt == "moa":
        data = loads_json(text, str(path))
        moa_kw = {k: v for k, v in kw.items() if k == "new_tokens"}
        return from_moa(data, model, where=str(path), **moa_kw)
    if fmt == "duo":
        duo_kw = {k: v for k, v in kw.items() if k in ("threshold", "sink", "recent")}
        return from_duo(read_table(path), model, where=str(path), **duo_kw)
    raise CompressError(f"unknown import format {fmt!r} (moa, duo, auto)")
