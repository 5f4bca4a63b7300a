"""Plan JSON I/O with errors that name the file and the field, and the shipped JSON Schema.

Every number read from a user file is checked: Python's json accepts ``NaN``, ``Infinity`` and ``-Infinity``
and turns ``1e400`` into infinity; :func:`loads_json` refuses them all, naming the file, the position (JSON path,
line and column) and the literal. Range checks (``sink >= 0``, densities in [0, 1], ...) live in
:mod:`plans.schema` and are reported by :func:`plan_from_dict` with the field and the offending value.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pydantic import ValidationError

from plans.atomic import write_text_atomic
from plans.errors import CompressError
from plans.schema import PLAN_FORMAT_VERSION, Plan

SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")


def plan_json_schema() -> dict:
    return Plan.model_json_schema()


class _NonFinite:
    """Stands in for a NaN / ±Infinity / overflowing literal while parsing, so its JSON path can be found."""

    __slots__ = ("token",)

    def __init__(self, token: str):
        self.token = token


def json_path(parts, root: str = "") -> str:
    """``("layers", 0, "heads", 2, "alpha")`` -> ``layers[0].heads[2].alpha`` (``root`` prefixes it)."""
    out = root
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def _find(node, target, path=()):
    if node is target:
        return path
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        found = _find(v, target, path + (k,))
        if found is not None:
            return found
    return None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NUMBER = re.compile(r"-?Infinity|NaN|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")


def _line_col(text: str) -> tuple[int, int] | None:
    """Line and column (1-based) of the first non-finite number literal outside strings."""
    blank = _STRING.sub(lambda m: " " * len(m.group()), text)  # JSON strings hold no raw newlines
    for m in _NUMBER.finditer(blank):
        tok = m.group()
        constant = tok.lstrip("-") in ("Infinity", "NaN")
        if constant or (any(c in tok for c in ".eE") and not math.isfinite(float(tok))):  # as json's parse_float
            off = m.start()
            return text.count("\n", 0, off) + 1, off - text.rfind("\n", 0, off)
    return None


def loads_json(text: str, where: str, *, root: str = ""):
    """``json.loads`` that refuses NaN, ±Infinity and numbers that overflow a float, naming where they are."""
    bad: list[_NonFinite] = []

    def constant(tok: str):
        bad.append(_NonFinite(tok))
        return bad[-1]

    def number(tok: str):
        v = float(tok)
        if math.isfinite(v):
            return v
        bad.append(_NonFinite(tok))
        return bad[-1]

    try:
        data = json.loads(text, parse_constant=constant, parse_float=number)
    except ValueError as e:  # JSONDecodeError, or an integer literal too long to convert
        raise CompressError(f"{where}: not a JSON file ({e})") from None
    if bad:
        first = bad[0]  # parse order is document order
        path = _find(data, first)
        lc = _line_col(text)
        at = f" (line {lc[0]}, column {lc[1]})" if lc else ""
        what = ("too large for a float (it reads as infinity)" if first.token.lstrip("-")[:1].isdigit()
                else "NaN and Infinity are not accepted")
        pos = json_path(path or (), root)
        raise CompressError(f"{where}: {pos} = {first.token}{at}: {what}; write a finite number")
    return data


def _loc(loc) -> str:
    """A pydantic error location, without the tag a discriminated union inserts (``sink_window``)."""
    out, prev = [], None
    for x in loc:
        if not (isinstance(x, str) and isinstance(prev, int) and x in _PATTERN_TAGS):
            out.append(str(x))
        prev = x
    return ".".join(out) or "(root)"


_PATTERN_TAGS = {"dense", "sink_window", "linear"}


def describe_validation_error(e: ValidationError) -> str:
    """The first errors of a pydantic ValidationError as one line: ``field.path = value: message; ...``."""
    parts = []
    for err in e.errors()[:5]:
        loc = _loc(err["loc"])
        value = err.get("input")
        shown = f" = {value!r}" if isinstance(value, (int, float, str)) and err["type"] != "missing" else ""
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}{shown}: {msg}" if err["loc"] else msg)
    more = f" (+{e.error_count() - 5} more)" if e.error_count() > 5 else ""
    return "; ".join(parts) + more


def plan_from_dict(data: dict, where: str = "plan") -> Plan:
    if not isinstance(data, dict):
        raise CompressError(f"{where}: a plan is a JSON object, got {type(data).__name__}")
    version = data.get("format_version", PLAN_FORMAT_VERSION)
    if isinstance(version, int) and version > PLAN_FORMAT_VERSION:
        raise CompressError(
            f"{where}: format_version {version} is newer than this tool supports ({PLAN_FORMAT_VERSION}); upgrade attention-compressor"
        )
    if "alphas" in data and "layers" not in data:
        raise CompressError(f"{where}: this is a MoA alphas/betas file; use `compress plan import` first")
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        raise CompressError(f"{where}: invalid plan: {describe_validation_error(e)}") from None


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.exists():
        raise CompressError(f"plan file not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise CompressError(f"{path}: not a JSON file ({e})") from None
    data = loads_json(text, str(path))
    return plan_from_dict(data, str(path))


def plan_to_json(plan: Plan) -> str:
    return plan.model_dump_json(indent=2)


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan atomically."""
    return write_text_atomic(path, plan_to_json(plan) + "\n")
