"""Attention-only decode step on the CPU: the plan's bounded KV (ring groups, kept tokens only) vs dense.

One layer of the default model's geometry (Hq 9, Hkv 3, D 64, fp32, batch 1) at context N: dense = the same
grouped-query SDPA call (:func:`attention_kernels.cpu_decode.sdpa_decode`) over all N cached keys of a preallocated cache
(no concatenation charged to dense);
ours = ``PlanKV.append`` + ``PlanKV.attend`` (the whole PlanCache step: the ring write and
:func:`attention_kernels.dispatch.decode_attention` over the kept slots) for a uniform sink-64 + window plan whose KV density
(kept tokens / N) is the row's. Ideal speed-up = 1 / KV density; the issue's goal is >= 0.8 of it. Paired repeats
in alternating order, median of per-repeat ratios, steps timed in batches of ``--inner`` to beat timer noise.

    python benchmarks/decode_cpu.py            # writes benchmarks/results/decode_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from attention_kernels.cpu_decode import sdpa_decode
from attention_kernels.kv_groups import AttendSpec, PlanKV
from common import command_line, machine, utc_minute, write_results

RESULTS = Path(__file__).resolve().parent / "results"
SINK = 64


def case(n: int, kv_density: float, hq: int, hkv: int, d: int, repeats: int, inner: int) -> dict:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, hkv, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g)
    q = torch.randn(1, hq, 1, d, generator=g)
    kn, vn = torch.randn(1, hkv, 1, d, generator=g), torch.randn(1, hkv, 1, d, generator=g)
    keep = max(SINK + 1, round(kv_density * n))
    window = keep - SINK
    kv = PlanKV(hq // hkv)
    sink_q, window_q = torch.full((1, hq), SINK), torch.full((1, hq), window)
    kv.store(k, v, torch.arange(n)[None], sink_q, window_q, torch.zeros(hkv, dtype=torch.bool))
    spec = AttendSpec(sink_q, window_q)
    state = {"p": n}

    def ours():
        for _ in range(inner):
            p = torch.tensor([[state["p"]]])
            kv.append(kn, vn, p)
            kv.attend(q, p, spec)
            state["p"] += 1

    full = torch.full((1, hkv), n)

    def dense():  # the same grouped-query SDPA over every cached key (stronger than SDPA's enable_gqa, which
        for _ in range(inner):  # repeats K/V per query head on this build)
            sdpa_decode(q[:, :, 0], k, v, full)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) / inner

    ours(), dense()
    to, td = [], []
    for r in range(repeats):
        if r % 2:
            to.append(timed(ours)), td.append(timed(dense))
        else:
            td.append(timed(dense)), to.append(timed(ours))
    speed = statistics.median(a / b for a, b in zip(td, to))
    real = (keep) / n
    return {"N": n, "Hq": hq, "Hkv": hkv, "D": d, "kv_density": round(real, 4), "kept_slots": keep,
            "ideal": round(1 / real, 2), "dense_us": round(1e6 * statistics.median(td), 1),
            "ours_us": round(1e6 * statistics.median(to), 1), "speedup": round(speed, 2),
            "pct_of_ideal": round(100 * speed * real, 1), "goal_met": speed >= 0.8 / real,
            "ring_bytes": kv.nbytes(), "dense_bytes": 2 * k.nbytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="*", default=[16384])
    ap.add_argument("--density", type=float, nargs="*", default=[0.05, 0.1, 0.25, 0.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    with torch.no_grad():
        for n in a.n:
            for dens in a.density:
                r = case(n, dens, 9, 3, 64, a.repeats, a.inner)
                rows.append(r)
                print(json.dumps({k: r[k] for k in ("N", "kv_density", "dense_us", "ours_us", "speedup", "pct_of_ideal")}),
                      flush=True)
    meta = {"command": command_line(), "machine": machine("threads"), "date": utc_minute(), "loadavg_start": load,
            "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    if a.no_write:
        return
    lines = ["# Attention-only decode step on the CPU: PlanCache ring groups vs dense", "",
             f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- date: {meta['date']}; load average at start {load}, at end {meta['loadavg_end']}",
             "- one layer, default-model geometry (Hq 9, Hkv 3, D 64), fp32, batch 1; dense = the same grouped-query "
             "SDPA call (attention_kernels.cpu_decode.sdpa_decode) over all N keys of a preallocated cache; ours = PlanKV append + attend (ring write + decode_attention over "
             "the kept slots) for a uniform sink-64 + window plan; median of paired per-repeat ratios", "",
             "| N | KV density | kept slots | ideal 1/density | dense µs | ours µs | speed-up | % of ideal | ≥ 80%? |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['kv_density']:.3f} | {r['kept_slots']} | {r['ideal']:.1f} | {r['dense_us']:.0f} | "
                     f"{r['ours_us']:.0f} | {r['speedup']:.2f} | {r['pct_of_ideal']:.0f}% | {'yes' if r['goal_met'] else 'no'} |")
    write_results(RESULTS / "decode_cpu.json", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
