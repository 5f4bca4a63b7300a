"""What a plan answers on the niah_multikey items it gets wrong in a fidelity results file: the queried value, a
distractor needle's value, or something else (greedy decoding, 12 new tokens).

    python benchmarks/multikey_errors.py    # Qwen's 0.5 plan on fidelity_qwen.json -> qwen_multikey_errors.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from compressor.fidelity import FidelityGrid, make_cell_items
from compressor.models import load_model
from compressor.patching import apply
from plans.atomic import write_text_atomic
from plans.io import load_plan
from profilers.data import ruler

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--results", default=str(RESULTS / "fidelity_qwen.json"))
    ap.add_argument("--plan", default=str(RESULTS / "plans" / "qwen_run_0.5.json"))
    ap.add_argument("--out", default=str(RESULTS / "qwen_multikey_errors.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_model(a.model, dtype="bfloat16")
    d = json.loads(Path(a.results).read_text())
    cell = next(x for x in d["items"] if x["task"] == "niah_multikey")
    g = d["grid"]
    if g["haystack"] != "noise":
        raise SystemExit(f"{a.results}: haystack {g['haystack']!r}; this script rebuilds noise-haystack items only")
    grid = FidelityGrid(tasks=("niah_multikey",), lengths=(cell["n_tokens"],), depths=tuple(g["depths"]),
                        n_per_cell=len(cell["depths"]), seed=g["seed"], style=d["prompt_style"], haystack=g["haystack"])
    items = make_cell_items("niah_multikey", tok, cell["n_tokens"], grid, d["prompt_style"], ruler.NOISE)
    apply(model, load_plan(a.plan))
    rows = []
    for i, (item, ok) in enumerate(zip(items, cell["outcomes"][Path(a.plan).stem])):
        if ok:
            continue
        gen = model.generate(torch.tensor([item.prompt_ids]), max_new_tokens=12, do_sample=False)
        text = tok.decode(gen[0, len(item.prompt_ids):])
        distractors = [n.value for n in item.needles if n.role == "distractor"]
        kind = ("correct" if item.answers[0] in text else
                "distractor" if any(v in text for v in distractors) else "other")
        rows.append({"i": i, "depth": item.depth, "answer": item.answers[0], "generated": text, "kind": kind})
        print(rows[-1], flush=True)
    print(Counter(r["kind"] for r in rows))
    write_text_atomic(Path(a.out), json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
