"""Plan JSON I/O with errors that name the file and the field, and the shipped JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from plans.atomic import write_text_atomic
from plans.errors import CompressError
from plans.schema import PLAN_FORMAT_VERSION, Plan

SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")


def plan_json_schema() -> dict:
    return Plan.model_json_schema()


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
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
        raise CompressError(f"{where}: invalid plan: {_describe(e)}") from None


def load_plan(path: str | Path) -> Plan:
    path = Path(path)
    if not path.exists():
        raise CompressError(f"plan file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompressError(f"{path}: not a JSON file ({e})") from None
    return plan_from_dict(data, str(path))


def plan_to_json(plan: Plan) -> str:
    return plan.model_dump_json(indent=2)


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan atomically."""
    return write_text_atomic(path, plan_to_json(plan) + "\n")


def write_schema(path: str | Path = SCHEMA_PATH) -> Path:
    return write_text_atomic(path, json.dumps(plan_json_schema(), indent=2) + "\n")
