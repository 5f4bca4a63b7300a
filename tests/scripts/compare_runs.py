"""Compare two `compress run` folders item by item (a refactor must not change a single outcome):

    python tests/scripts/compare_runs.py BEFORE AFTER OUT.md --label-before "560f862" --label-after "HEAD"

Writes OUT.md (and OUT.json): per plan, whether its layers are identical; per eval task, method and length, the
per-item outcomes (RULER tasks) or the summed loss (ppl) of both runs side by side; the patched folders' weights
and config compared byte for byte. Exits 1 when anything differs.
"""

import argparse
import filecmp
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path


def compare(before: Path, after: Path) -> dict:
    plans = {f.stem: json.loads(f.read_text())["layers"] == json.loads((after / "plans" / f.name).read_text())["layers"]
             for f in sorted((before / "plans").glob("*.json"))}
    cells = []
    for f in sorted(p for p in before.glob("eval_*.json") if not p.name.endswith(".done.json")):
        b, a = json.loads(f.read_text()), json.loads((after / f.name).read_text())
        other = {(c["method"], c["n"], c["depth"]): c for c in a["cells"]}
        for c in b["cells"]:
            d = other.get((c["method"], c["n"], c["depth"]), {})
            cells.append({"task": b["task"], "method": c["method"], "n": c["n"], "depth": c["depth"],
                          "before": c["outcomes"] or c["loss_sum"], "after": d.get("outcomes") or d.get("loss_sum"),
                          "same": {k: v for k, v in c.items()} == d})
    folder = {"weights": filecmp.cmp(before / "model" / "model.safetensors", after / "model" / "model.safetensors",
                                     shallow=False),
              "config": json.loads((before / "model" / "config.json").read_text())
              == json.loads((after / "model" / "config.json").read_text())}
    return {"plans": plans, "cells": cells, "model_folder": folder,
            "identical": all(plans.values()) and all(c["same"] for c in cells) and all(folder.values())}


def markdown(res: dict, args) -> str:
    lines = ["# `compress run` before and after a refactor, item by item", "",
             f"before: `{args.label_before}` ({args.before}); after: `{args.label_after}` ({args.after})",
             f"command: `{' '.join(sys.argv)}`; machine: {platform.machine()} {platform.system()}, "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"**identical: {res['identical']}**", "", "| plan | layers identical |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in res["plans"].items()]
    lines += ["", f"patched folder: weights identical {res['model_folder']['weights']}, config identical "
              f"{res['model_folder']['config']}", "",
              "| task | method | N | depth | before (per item, or summed loss) | after | identical |", "|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        fmt = (lambda v: "".join(str(int(x)) for x in v)) if isinstance(c["before"], list) else (lambda v: f"{v:.6f}")
        lines.append(f"| {c['task']} | {c['method']} | {c['n']} | {c['depth']} | {fmt(c['before'])} | "
                     f"{fmt(c['after'])} | {c['same']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--label-before", default="before")
    ap.add_argument("--label-after", default="after")
    args = ap.parse_args()
    res = compare(args.before, args.after)
    args.out.write_text(markdown(res, args))
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
