"""Peak memory and time of the streamed Taylor profiler vs a plain forward+backward.

Each mode runs in its own subprocess (``MALLOC_ARENA_MAX=2`` so glibc RSS is comparable between runs):

* ``baseline``: sdpa, parameters frozen, input embeddings require grad, same loss (mean CE on the target half),
  ``loss.backward()``; nothing else.
* ``profile``: ``compressor.influence_profile.run_profile`` on the same samples (sdpa forward + per-layer blockwise
  recompute in backward).

After loading the model (and a short warm-up at 128 tokens) the peak-RSS mark is reset (``/proc/self/clear_refs``),
so ``peak_rss`` is the highest resident size during the measured samples, model weights included. The ratio
``profile / baseline`` of that peak is the number to watch (goal <= 1.5x).

    python benchmarks/profile_memory.py                       # the project's default model, N = 4096
    python benchmarks/profile_memory.py --model /path/to/hf --length 8192 --samples 2
    python benchmarks/profile_memory.py --model tiny --length 1024   # smoke test on a random tiny Llama

Writes benchmarks/results/profile_memory.json (``--out``) and a markdown table next to it (.md), with the exact
command, machine and date, and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name, write_results

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.5


def _host(torch) -> dict:
    cpu = cpu_name()
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu, "cpus": os.cpu_count(),
            "mem_gib": mem, "platform": platform.platform()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _load(model_arg: str, dtype: str):
    import torch

    if model_arg == "tiny":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                          intermediate_size=512, vocab_size=1024, max_position_embeddings=65536)
        return AutoModelForCausalLM.from_config(cfg).to(getattr(torch, dtype)).eval(), "tiny-random-llama"
    try:
        from compressor.models import load_model, resolve_model
    except ImportError:
        load_model = resolve_model = None
    if load_model is not None:
        m, _ = load_model(None if model_arg == "default" else model_arg, dtype=dtype)
        return m, resolve_model(None if model_arg == "default" else model_arg)
    if model_arg == "default":
        raise SystemExit("compressor.models.load_model is not available: pass --model PATH to a local HF folder")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_arg, dtype=getattr(torch, dtype)).eval(), model_arg


def _samples(n: int, count: int, vocab: int, seed: int = 0):
    import torch

    from profilers.data.samples import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (n,), generator=g)
        lm = torch.zeros(n, dtype=torch.bool)
        lm[n // 2 :] = True  # answer-like: the second half carries the loss
        out.append(Sample(ids, lm))
    return out


def child(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from compressor.args import InfluenceArgs
    from compressor.influence_profile import run_profile, sample_loss

    rss0 = _rss()
    t0 = time.perf_counter()
    model, name = _load(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    vocab = model.get_input_embeddings().weight.shape[0]
    samples = _samples(args.length, args.samples, vocab)
    warm = _samples(128, 1, vocab, seed=1)
    tmp = tempfile.mkdtemp(prefix="profile_memory_")

    def run_baseline(ss):
        model.set_attn_implementation("sdpa")
        model.requires_grad_(False)
        for s in ss:
            with torch.enable_grad():
                sample_loss(model, s).backward()

    def run_prof(ss, stem):
        run_profile(model, {ss[0].length: ss}, os.path.join(tmp, stem),
                    InfluenceArgs(block=args.block, sink_sizes=(args.sink,), row_block=args.row_block,
                                  allow_extrapolation=True, progress=False))

    fn = run_baseline if args.child == "baseline" else (lambda ss: run_prof(ss, "p"))
    (run_baseline if args.child == "baseline" else (lambda ss: run_prof(ss, "warm")))(warm)
    loaded = _rss()
    reset = _reset_hwm()
    t0 = time.perf_counter()
    fn(samples)
    secs = time.perf_counter() - t0
    peak = _hwm()
    return {
        "mode": args.child, "model": name, "length": args.length, "samples": args.samples, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "rss_start": rss0, "rss_loaded": loaded, "peak_rss": peak,
        "peak_extra": peak - loaded, "peak_reset": reset, "seconds_per_sample": secs / args.samples,
        "load_seconds": load_s,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (the project's default model), a local HF folder, or 'tiny'")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--row-block", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_memory.json"))
    p.add_argument("--child", choices=["baseline", "profile"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return 0

    env = dict(os.environ, MALLOC_ARENA_MAX="2", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = {}
    for mode in ("baseline", "profile"):
        cmd = [sys.executable, __file__, "--child", mode] + [
            a for a in (argv if argv is not None else sys.argv[1:])
        ]
        print(f"[profile_memory] running {mode} (N={args.length}, model={args.model}) ...", flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-4000:])
            print(f"[profile_memory] {mode} failed (exit {r.returncode})")
            return 1
        res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    b, q = res["baseline"], res["profile"]
    import torch  # only for the version string

    out = {
        "benchmark": "profile_memory",
        "model": q["model"], "length": args.length, "samples": args.samples, "dtype": args.dtype,
        "block": args.block, "sink": args.sink, "row_block": args.row_block,
        "baseline": b, "profile": q,
        "ratio_peak_rss": q["peak_rss"] / b["peak_rss"],
        "ratio_peak_extra": q["peak_extra"] / max(1, b["peak_extra"]),
        "ratio_time": q["seconds_per_sample"] / b["seconds_per_sample"],
        "goal_ratio_peak_rss": GOAL,
        "command": " ".join(["python", "benchmarks/profile_memory.py"] + list(argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": _host(torch),
    }
    out["meets_goal"] = out["ratio_peak_rss"] <= GOAL
    gib = 2**30
    md = [
        f"# profile_memory ({out['date']})", "",
        f"`{out['command']}`  ", f"model `{out['model']}`, N={args.length}, {args.dtype}, {args.samples} sample(s); "
        f"host: {out['host']['cpu']}, {out['host']['cpus']} CPUs, {out['host']['mem_gib']} GiB, torch {out['host']['torch']}", "",
        "| mode | peak RSS (GiB) | over loaded (GiB) | s/sample |", "|---|---|---|---|",
        f"| sdpa fwd+bwd | {b['peak_rss'] / gib:.2f} | {b['peak_extra'] / gib:.2f} | {b['seconds_per_sample']:.1f} |",
        f"| taylor profile | {q['peak_rss'] / gib:.2f} | {q['peak_extra'] / gib:.2f} | {q['seconds_per_sample']:.1f} |",
        f"| ratio | {out['ratio_peak_rss']:.2f}x (goal <= {GOAL}x) | {out['ratio_peak_extra']:.2f}x | {out['ratio_time']:.2f}x |", "",
    ]
    write_results(args.out, out, "\n".join(md), indent=2)
    print(f"model {out['model']}  N={args.length}  dtype={args.dtype}  samples={args.samples}")
    for k, r in (("baseline fwd+bwd", b), ("profile", q)):
        print(f"  {k:17s} peak RSS {r['peak_rss'] / gib:6.2f} GiB (+{r['peak_extra'] / gib:5.2f} over loaded)  "
              f"{r['seconds_per_sample']:8.1f} s/sample")
    print(f"  ratio peak RSS {out['ratio_peak_rss']:.2f}x (goal <= {GOAL}x: {'ok' if out['meets_goal'] else 'MISSED'}), "
          f"extra {out['ratio_peak_extra']:.2f}x, time {out['ratio_time']:.2f}x")
    print(f"  wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
