"""CLI round trip on a tiny model: profile -> search -> apply -> eval, then logits of the patched folder.

Prints sha256 fingerprints of the plan's layers and predictions, of the patched model's logits on fixed ids and of
the eval summary, so two trees (before / after a refactor) can be compared bit for bit:

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
    (out / "fingerprint.json").write_text(json.dumps(fp, indent=1))
    return fp


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
