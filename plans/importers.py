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
"""

from __future__ import annotations

import json
from pathlib import Path

from plans.errors import CompressError
from plans.identity import ModelIdentity
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern

MOA_SINK, MOA_BLOCK, MOA_MIN_SPAN, MOA_NEW_TOKENS = 64, 64, 128, 1024


def _matrix(rows, what: str, n_layers: int, n_heads: int, where: str) -> list[list[float]]:
    if not isinstance(rows, list) or len(rows) != n_layers:
        got = len(rows) if isinstance(rows, list) else type(rows).__name__
        raise CompressError(f"{where}: {what} has {got} rows, the model has {n_layers} layers")
    out = []
    for li, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n_heads:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise CompressError(f"{where}: {what}[{li}] has {got} values, expected {n_heads} heads")
        try:
            out.append([float(x) for x in row])
        except (TypeError, ValueError):
            raise CompressError(f"{where}: {what}[{li}] holds a non-number") from None
    return out


def from_moa(data: dict, model: ModelIdentity, *, new_tokens: int = MOA_NEW_TOKENS, where: str = "MoA plan") -> Plan:
    """A MoA alphas/betas dict -> Plan. Accepts per-query-head (MoA's MHA-expanded) or per-KV-head shapes."""
    if not isinstance(data, dict) or "alphas" not in data or "betas" not in data:
        raise CompressError(f"{where}: a MoA plan needs the keys 'alphas' and 'betas'")
    n_rows = len(data["alphas"][0]) if data["alphas"] and isinstance(data["alphas"][0], list) else -1
    granularity = "kv_head" if n_rows == model.num_kv_heads and model.num_kv_heads != model.num_heads else "query_head"
    n = model.num_kv_heads if granularity == "kv_head" else model.num_heads
    alphas = _matrix(data["alphas"], "alphas", model.num_layers, n, where)
    betas = _matrix(data["betas"], "betas", model.num_layers, n, where)
    layers = []
    for li in range(model.num_layers):
        heads = []
        for h in range(n):
            a, b = alphas[li][h], betas[li][h]
            if not 0 <= b <= 1:
                raise CompressError(f"{where}: betas[{li}][{h}] = {b} is outside [0, 1]")
            heads.append(SinkWindowPattern(sink=MOA_SINK, alpha=a, beta=b, min_span=MOA_MIN_SPAN, block=MOA_BLOCK))
        layers.append(LayerPlan(heads=heads))
    return Plan(model=model, granularity=granularity, source="import:moa", length_offset=new_tokens, layers=layers)


def to_moa(plan: Plan) -> dict:
    """Plan -> MoA alphas/betas (per query head; dense heads become alpha=0, beta=1)."""
    alphas, betas = [], []
    for li in range(plan.model.num_layers):
        ra, rb = [], []
        for h in range(plan.model.num_heads):
            p = plan.pattern(li, h)
            ra.append(0.0 if isinstance(p, DensePattern) else p.alpha)
            rb.append(1.0 if isinstance(p, DensePattern) else p.beta)
        alphas.append(ra)
        betas.append(rb)
    return {"alphas": alphas, "betas": betas}


def from_duo(rows: list[list[float]], model: ModelIdentity, *, threshold: float = 0.5, sink: int = 64,
             recent: int = 256, where: str = "DuoAttention table") -> Plan:
    table = _matrix(rows, "head table", model.num_layers, model.num_kv_heads, where)
    stream = SinkWindowPattern(sink=sink, alpha=sink + recent, beta=0.0)
    layers = [LayerPlan(heads=[DensePattern() if v >= threshold else stream for v in row]) for row in table]
    return Plan(model=model, granularity="kv_head", source="import:duo", layers=layers)


def read_table(path: Path) -> list[list[float]]:
    text = path.read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for ln, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                rows.append([float(x) for x in line.replace(",", " ").split()])
            except ValueError:
                raise CompressError(f"{path}:{ln}: not a row of numbers") from None
    return rows


def import_plan_file(path: str | Path, model: ModelIdentity, *, fmt: str = "auto", **kw) -> Plan:
    """Import a MoA JSON or a DuoAttention head table, detected from the content when ``fmt='auto'``."""
    path = Path(path)
    if not path.exists():
        raise CompressError(f"file not found: {path}")
    text = path.read_text()
    if fmt == "auto":
        fmt = "moa" if '"alphas"' in text else "duo"
    if fmt == "moa":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CompressError(f"{path}: not a JSON file ({e})") from None
        moa_kw = {k: v for k, v in kw.items() if k == "new_tokens"}
        return from_moa(data, model, where=str(path), **moa_kw)
    if fmt == "duo":
        duo_kw = {k: v for k, v in kw.items() if k in ("threshold", "sink", "recent")}
        return from_duo(read_table(path), model, where=str(path), **duo_kw)
    raise CompressError(f"unknown import format {fmt!r} (moa, duo, auto)")
