"""What the Qwen 0.5 plan answers on the niah_multikey items it gets wrong (fidelity_qwen.json): the queried value,
a distractor needle's value, or something else. Run from the repository root:

    python benchmarks/multikey_errors.py
"""
import json, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
from compressor.models import load_model
from compressor.fidelity import FidelityGrid, make_cell_items
from compressor.patching import apply
from plans.io import load_plan
from profilers import ruler
m, tok = load_model("qwen2.5-coder-0.5b", dtype="bfloat16")
d = json.load(open("benchmarks/results/fidelity_qwen.json"))
it = next(x for x in d["items"] if x["task"] == "niah_multikey")
out = it["outcomes"]["qwen_run_0.5"]
grid = FidelityGrid(tasks=("niah_multikey",), lengths=(2048,), n_per_cell=50, seed=0, style="plain", haystack="noise")
items = make_cell_items("niah_multikey", tok, 2048, grid, "plain", ruler.NOISE)
apply(m, load_plan("benchmarks/results/plans/qwen_run_0.5.json"))
rows = []
for i, (item, ok) in enumerate(zip(items, out)):
    if ok:
        continue
    g = m.generate(torch.tensor([item.prompt_ids]), max_new_tokens=12, do_sample=False)
    text = tok.decode(g[0, len(item.prompt_ids):])
    distract = [n.value for n in item.needles if n.role == "distractor"]
    kind = "correct" if item.answers[0] in text else ("distractor" if any(v in text for v in distract) else "other")
    rows.append({"i": i, "depth": item.depth, "answer": item.answers[0], "generated": text, "kind": kind})
    print(rows[-1], flush=True)
from collections import Counter
print(Counter(r["kind"] for r in rows))
json.dump(rows, open("benchmarks/results/qwen_multikey_errors.json", "w"), indent=1)
