"""``--budget`` strings -> plans.schema.Budget.

Accepted forms (lengths may be written ``8192`` or ``8k``; ``<=`` and ``=`` are interchangeable)::

    0.5                          prefill density 0.5 at every target length
    density=0.5                  the same
    density@8192=0.25            prefill density at one length
    kv_density@4096=0.3          KV tokens kept / N at one length (kv_density=0.3: every length)
    latency@4096<=120ms          measured/predicted attention time at one length (units ms, s, us)

Several budgets may be given comma-separated: ``density@8k=0.5,density@32k=0.25``.

Every number is checked: values must be finite (no ``nan``/``inf``, nothing that overflows), densities in
(0, 1], latencies > 0, lengths whole numbers >= 1; the error names the budget, the part (value or length) and
the number as written.

    >>> parse_budget("density@8k=0.25")
    Budget(kind='density', value=0.25, length=8192)
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

from plans.errors import CompressError
from plans.schema import Budget

ACCEPTED = (
    "accepted forms: 0.5 | density=0.5 | density@8192=0.25 | kv_density@4096=0.3 | "
    "latency@4096<=120ms (units ms, s, us; lengths like 8192 or 8k)"
)

_KIND = {"density": "density", "kv_density": "kv_density", "kv": "kv_density", "latency": "latency_ms"}
_RE = re.compile(
    r"^(?P<kind>[a-z_]+)(?:@(?P<len>\d+(?:\.\d+)?[kK]?))?\s*(?:<=|=)\s*(?P<val>[0-9.eE+-]+|[+-]?(?:nan|inf(?:inity)?))\s*(?P<unit>ms|s|us|µs)?$"
)
_UNIT_MS = {None: 1.0, "ms": 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3}


def _length(text: str, raw: str) -> int:
    mult = 1024 if text[-1] in "kK" else 1
    num = float(text.rstrip("kK"))
    if not math.isfinite(num * mult):
        raise CompressError(f"budget {raw!r}: length {text!r} is not a finite number of tokens; {ACCEPTED}")
    n = int(round(num * mult))
    if n <= 0 or abs(num * mult - n) > 1e-9:
        raise CompressError(f"budget {raw!r}: length {text!r} is not a positive whole number of tokens; {ACCEPTED}")
    return n


def parse_budget(text: str) -> Budget:
    """One budget string -> Budget; a malformed string raises CompressError naming it and the accepted forms."""
    raw = text
    s = str(text).strip().replace(" ", "")
    if not s:
        raise CompressError(f"budget {raw!r} is empty; {ACCEPTED}")
    try:
        value = float(s)
    except ValueError:
        value = None
    if value is not None:
        kind, length, unit, token = "density", None, None, s
    else:
        m = _RE.match(s)
        if not m or m.group("kind") not in _KIND:
            raise CompressError(f"budget {raw!r} is not understood; {ACCEPTED}")
        kind = _KIND[m.group("kind")]
        length = _length(m.group("len"), raw) if m.group("len") else None
        unit = m.group("unit")
        token = m.group("val") + (unit or "")
        try:
            value = float(m.group("val"))
        except ValueError:
            raise CompressError(f"budget {raw!r}: {m.group('val')!r} is not a number; {ACCEPTED}") from None
        if kind != "latency_ms" and unit is not None:
            raise CompressError(f"budget {raw!r}: a {kind} budget is a fraction without a unit; {ACCEPTED}")
        if kind == "latency_ms":
            value *= _UNIT_MS[unit]
    if not math.isfinite(value):
        raise CompressError(f"budget {raw!r}: the value {token} is not a finite number; {ACCEPTED}")
    if kind in ("density", "kv_density") and not 0 < value <= 1:
        raise CompressError(f"budget {raw!r}: a {kind} must be in (0, 1], got the value {token}; {ACCEPTED}")
    if kind == "latency_ms" and not value > 0:
        raise CompressError(f"budget {raw!r}: a latency must be > 0, got the value {token}; {ACCEPTED}")
    return Budget(kind=kind, value=value, length=length)


def parse_budgets(spec: str | float | Budget | Iterable[str | float | Budget] | None) -> list[Budget]:
    """Budgets from a string (comma-separated allowed), a number, a Budget, or a list of them."""
    if spec is None:
        return []
    if isinstance(spec, Budget):
        return [spec]
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return [parse_budget(str(spec))]
    if isinstance(spec, str):
        return [parse_budget(p) for p in spec.split(",") if p.strip()] or [parse_budget(spec)]
    out: list[Budget] = []
    for item in spec:
        out.extend(parse_budgets(item))
    return out


def format_budget(b: Budget) -> str:
    """Budget -> its canonical string (round-trips through parse_budget)."""
    at = f"@{b.length}" if b.length is not None else ""
    if b.kind == "latency_ms":
        return f"latency{at}<={b.value:g}ms"
    return f"{b.kind}{at}={b.value:g}"


def expand_budgets(budgets: Sequence[Budget], lengths: Sequence[int]) -> list[tuple[Budget, int]]:
    """(budget, length) pairs: a budget without a length applies at every target length.

    A per-length budget overrides an every-length one of the same kind at that length.
    """
    specific = {(b.kind, b.length) for b in budgets if b.length is not None}
    out: list[tuple[Budget, int]] = []
    for b in budgets:
        if b.length is not None:
            out.append((b, b.length))
        else:
            out.extend((b, n) for n in lengths if (b.kind, n) not in specific)
    # the tightest of duplicates at the same (kind, length) wins
    best: dict[tuple[str, int], tuple[Budget, int]] = {}
    for b, n in out:
        key = (b.kind, n)
        if key not in best or b.value < best[key][0].value:
            best[key] = (b, n)
    return sorted(best.values(), key=lambda t: (t[1], t[0].kind))
