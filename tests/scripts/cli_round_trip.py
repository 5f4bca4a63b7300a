"""CLI round trip on a tiny model: profile -> search -> apply -> eval, then logits of the patched folder, then
`compress run` with both plan shapes (keep_dense, search).

Prints sha256 fingerprints of the plan's layers and predictions, of the patched model's logits on fixed ids, of
the eval summary, and of each run's plans and per-item eval rows, so two trees (before / after a refactor) can be
compared bit for bit (run both from the same checkout path: a calibration recipe names its data file's path):

    python tests/scripts/cli_round_trip.py /tmp/rt_before
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def main(out: Path) -> dict:
    import torch

    from tests.conftest import tiny_model_with_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, COMPRESS_HOME=str(out / "home"))
    model_dir = out / "tiny"
    m, tok = tiny_model_with_tokenizer("llama", max_position_embeddings=8192)
    m.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = str(ROOT / "tests" / "data" / "pride_and_prejudice_ch1-12.txt")
    common = ["--model", str(model_dir), "--lengths", "256", "--samples", "2", "--sources", f"{data},passkey",
              "--sinks", "8", "--block", "16"]

    def cli(*args):
        r = subprocess.run(["compress", *args], env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"compress {' '.join(args)} failed:\n{r.stderr[-3000:]}")
        return r.stdout

    cli("profile", "--out", str(out / "prof"), "--seed", "0", *common)
    cli("search", "--profile", str(out / "prof"), "--budget", "0.5", "--out", str(out / "s"))
    cli("apply", str(out / "s" / "plan.json"), "--model", str(model_dir), "--out", str(out / "patched"))
    ev = json.loads(cli("eval", "--model", str(model_dir), "--plan", str(out / "s" / "plan.json"), "--task", "ppl",
                        "--lengths", "256", "--samples", "2", "--json", "--out", str(out / "ev")))
    plan = json.loads((out / "s" / "plan.json").read_text())
    import compressor  # noqa: F401
    from transformers import AutoModelForCausalLM

    pm = AutoModelForCausalLM.from_pretrained(out / "patched").eval()
    ids = torch.randint(4, 90, (2, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = pm(ids).logits
    fp = {
        "plan_layers": sha(json.dumps(plan["layers"], sort_keys=True).encode()),
        "plan_density": plan["predicted"]["density"],
        "plan_loss": plan["predicted"]["loss"],
        "logits": sha(logits.numpy().tobytes()),
        "eval": sha(json.dumps([{k: v for k, v in r.items() if "second" not in k and "time" not in k}
                                for r in ev["summary"]], sort_keys=True).encode()),
    }
    for shape, budgets in (("keep_dense", ["--budget", "0.5", "--budget", "0.25"]), ("search", ["--budget", "0.5", "--retrieval-samples", "0"])):
        run_out = out / f"run_{shape}"
        cli("run", "--model", str(model_dir), "--out", str(run_out), "--profile-lengths", "256",
            "--validate-length", "320", "--eval-lengths", "384", "--retrieval-samples", "2", *budgets,
            "--samples", "2", "--trials", "2", "--eval-tasks", "niah_single,ppl", "--eval-depths", "0.5",
            "--eval-samples", "2", "--sources", f"{data},passkey", "--sinks", "8", "--block", "16",
            "--local-span", "32", "--bench-length", "0", "--plan-shape", shape)
        plans = {f.name: json.loads(f.read_text())["layers"] for f in sorted((run_out / "plans").glob("*.json"))}
        fp[f"run_{shape}_plans"] = sha(json.dumps(plans, sort_keys=True).encode())
        for task in ("niah_single", "ppl"):
            rows = json.loads((run_out / f"eval_{task}.json").read_text())
            rows = {k: v for k, v in rows.items() if k != "summary"}
            fp[f"run_{shape}_eval_{task}"] = sha(json.dumps(rows, sort_keys=True, default=str).encode())
    (out / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    return fp


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
