"""CPU prefill benchmark: attention_kernels.banded.banded_attention vs FlexAttention vs dense causal SDPA (paired ratios).

For every (N, density) the heads get sink 64 and power-of-two windows spread over three octaves (as in
docs/cpu-kernels.md ``make_windows``); each repeat times dense, banded and FlexAttention back to back in
rotating order, and each reported speedup is the median of the per-repeat ratios against dense. FlexAttention
(``torch.nn.attention.flex_attention``, the peer a user would pick) runs the same per-head sink+window pattern
through a block mask (``create_block_mask``, block 128) under ``torch.compile``; its compile time (first call)
is reported apart and every output is checked against the banded kernel.

    python benchmarks/kernels_cpu.py                 # full run, writes benchmarks/results/kernels_cpu.{json,md}
    python benchmarks/kernels_cpu.py --quick --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attention_kernels.banded import banded_attention
from attention_kernels.native_cpu import native_kernel
from common import command_line, machine, utc_minute, write_results
from plans.span import prefill_density

SINK = 64
RESULTS = Path(__file__).resolve().parent / "results"
NOTES = [
    "Idle machine (no other job; load average in the header). `banded` is the native kernel "
    "(attention_kernels/csrc/sink_window_cpu.c, built on first use): one pass per 16-row block over the gathered "
    "sink + window keys. The 80% goal holds at every (N, density): 83-120% of 1/density at 8k, 98-118% at 16k; above "
    "100% because dense SDPA's own tiles run below the native kernel's FMA rate (the full-head row of the per-window "
    "table: 1.20x dense at equal work).",
    "The lowest row (8k, density 0.05: spans 96-320) is bounded by a floor that does not shrink with the window: at "
    "W = 32 about 40% of the kernel's time is first-touch page faults of the 32 MB output (11-17 ms a call, which "
    "dense SDPA pays too), reading Q and writing O; the score and P.V loops run at the FMA rate (ablations in "
    "docs/cpu-kernels.md section 7). Single-window heads below W = 128 stay under 80% for that reason "
    "(52-68%); the mixes reach 80% because their larger windows carry most of the work.",
    "FlexAttention (torch.compile, block mask of 128) computes the same pattern (max abs difference in the json) and "
    "is slower at every point: banded / flex = 1.80-2.71x. Its compile time (first call) is reported apart and not "
    "charged to it.",
    "The SDPA composition (the fallback without a C compiler, timed in the same rotation) reaches 47-88% of 1/density; "
    "the native kernel is faster at every window, full heads included (per-window table), so "
    "banded_attention(kernel='auto') uses it for every head.",
]


def make_windows(n: int, h: int, target: float, sink: int = SINK) -> list[int]:
    """Spans (sink + power-of-two window, or n for a full head) over three octaves with mean density ~ target."""

    def spans_for(x: float) -> list[int]:
        out = []
        for i in range(h):
            e = round(x + 3.0 * i / max(h - 1, 1))
            w = 2**e
            out.append(n if sink + w >= n else sink + w)
        return out

    def dens(sp: list[int]) -> float:
        return sum(prefill_density(s, n) for s in sp) / len(sp)

    best, best_err = None, math.inf
    x = 3.0
    while x <= math.log2(n) + 0.01:
        sp = spans_for(x)
        err = abs(math.log(dens(sp) / target))
        if err < best_err:
            best, best_err = sp, err
        x += 0.02
    return sorted(best)


def flex_runner(q, k, v, sink: torch.Tensor, span: torch.Tensor):
    """(run, compile_s, mask_s): FlexAttention over the same per-head sink+window pattern (plans.span.sees)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from plans.span import sink_window_mask_mod, split_span_tensor

    n = q.shape[2]
    mask_mod = sink_window_mask_mod(*split_span_tensor(sink, span), n=n)
    t = time.perf_counter()
    # compiled at long N: builds the block mask without materialising the (H, N, N) mask (34 GB at N = 16k, H = 16)
    build = torch.compile(create_block_mask) if n >= 4096 else create_block_mask
    block_mask = build(mask_mod, 1, q.shape[1], n, n, device="cpu")
    mask_s = time.perf_counter() - t
    compiled = torch.compile(flex_attention, dynamic=False)
    t = time.perf_counter()
    compiled(q, k, v, block_mask=block_mask)
    compile_s = time.perf_counter() - t
    return (lambda: compiled(q, k, v, block_mask=block_mask)), compile_s, mask_s


def rotated_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """One warm-up call of each function, then ``repeats`` rounds in rotating order: seconds per call and round."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times = {m: [] for m in fns}
    for r in range(repeats):
        for m in names[r % len(names):] + names[: r % len(names)]:
            t = time.perf_counter()
            fns[m]()
            times[m].append(time.perf_counter() - t)
    return times


def bench(n: int, h: int, d: int, target: float, repeats: int, dtype=torch.float32, flex: bool = True) -> dict:
    spans = make_windows(n, h, target)
    density = sum(prefill_density(s, n) for s in spans) / h
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g, dtype=dtype) for _ in range(3))
    sink = torch.full((h,), SINK, dtype=torch.int64)
    span = torch.tensor(spans, dtype=torch.int64)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def banded():
        return banded_attention(q, k, v, sink, span)

    def composition():
        return banded_attention(q, k, v, sink, span, kernel="sdpa")

    fns = {"dense": dense, "banded": banded, "composition": composition}
    extra = {}
    if flex:
        run, compile_s, mask_s = flex_runner(q, k, v, sink, span)
        err = float((run() - banded()).abs().max())
        if err > 1e-3:
            raise AssertionError(f"FlexAttention differs from the banded kernel by {err} at N={n}")
        fns["flex"] = run
        extra = {"flex_compile_s": round(compile_s, 1), "flex_block_mask_s": round(mask_s, 2), "flex_max_abs_diff": err}
    times = rotated_times(fns, repeats)
    med = lambda m: statistics.median(times["dense"][i] / times[m][i] for i in range(repeats))  # noqa: E731
    speed = med("banded")
    row = {
        "N": n, "H": h, "D": d, "dtype": str(dtype).replace("torch.", ""), "sink": SINK, "spans": spans,
        "density": round(density, 4), "ideal": round(1 / density, 2),
        "dense_ms": round(1000 * statistics.median(times["dense"]), 1),
        "banded_ms": round(1000 * statistics.median(times["banded"]), 1),
        "speedup": round(speed, 2), "pct_of_ideal": round(100 * speed * density, 1),
        "ratios": [round(times["dense"][i] / times["banded"][i], 3) for i in range(repeats)],
        "composition_ms": round(1000 * statistics.median(times["composition"]), 1),
        "composition_speedup": round(med("composition"), 2),
        "composition_pct_of_ideal": round(100 * med("composition") * density, 1),
        "kernel": "native" if native_kernel() is not None else "sdpa composition (no C compiler)",
    }
    if flex:
        fs = med("flex")
        row.update(flex_ms=round(1000 * statistics.median(times["flex"]), 1), flex_speedup=round(fs, 2),
                   flex_pct_of_ideal=round(100 * fs * density, 1), banded_vs_flex=round(speed / fs, 2), **extra)
    return row


def by_window(n: int, h: int, d: int, windows: list[int], repeats: int) -> list[dict]:
    """The path decision: every head at one window W (sink 64; W = N: a full head), the native kernel and the SDPA
    composition each vs dense, % of ideal, and which is faster."""
    out = []
    for w in windows:
        span = min(SINK + w, n)
        r = bench_spans(n, h, d, [span] * h, repeats)
        r = {"N": n, "H": h, "window": w} | r
        r["faster"] = "native" if r["native_speedup"] >= r["composition_speedup"] else "composition"
        out.append(r)
        print(f"window {w:>5}: density {r['density']:.3f} native {r['native_pct_of_ideal']:.0f}% composition "
              f"{r['composition_pct_of_ideal']:.0f}% of ideal", flush=True)
    return out


def bench_spans(n: int, h: int, d: int, spans: list[int], repeats: int) -> dict:
    """Native kernel and SDPA composition vs dense for given per-head spans (no FlexAttention), rotating order."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, d, generator=g) for _ in range(3))
    sink, span = torch.full((h,), SINK, dtype=torch.int64), torch.tensor(spans, dtype=torch.int64)
    density = sum(prefill_density(x, n) for x in spans) / h
    fns = {
        "dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "native": lambda: banded_attention(q, k, v, sink, span, kernel="native"),
        "composition": lambda: banded_attention(q, k, v, sink, span, kernel="sdpa"),
    }
    times = rotated_times(fns, repeats)
    out = {"density": round(density, 4)}
    for m in ("native", "composition"):
        speed = statistics.median(times["dense"][i] / times[m][i] for i in range(repeats))
        out[f"{m}_speedup"] = round(speed, 2)
        out[f"{m}_pct_of_ideal"] = round(100 * speed * density, 1)
    return out


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# CPU prefill: banded_attention vs FlexAttention vs dense causal SDPA",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}, load average (1/5/15 min) at start {meta['loadavg']}, at end {meta['loadavg_end']}",
        f"- method: {meta['method']}",
        "",
        "`banded` is `banded_attention` as shipped (the native kernel where it builds: see `kernel` in the json); "
        "`composition` is its SDPA-composition fallback (`kernel=\"sdpa\"`), timed in the same rotation.",
        "",
        "| N | H | D | density | ideal 1/density | dense ms | banded ms | banded × | banded % of ideal | "
        "composition × | composition % of ideal | flex ms | flex × | flex % of ideal | banded ÷ flex | flex compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    g = lambda r, key, fmt: format(r[key], fmt) if key in r else "-"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['H']} | {r['D']} | {r['density']:.3f} | {r['ideal']:.2f} | {r['dense_ms']:.0f} | "
            f"{r['banded_ms']:.0f} | {r['speedup']:.2f} | {r['pct_of_ideal']:.0f}% | {g(r, 'composition_speedup', '.2f')} | "
            f"{g(r, 'composition_pct_of_ideal', '.0f')}% | {g(r, 'flex_ms', '.0f')} | "
            f"{g(r, 'flex_speedup', '.2f')} | {g(r, 'flex_pct_of_ideal', '.0f')}% | {g(r, 'banded_vs_flex', '.2f')} | "
            f"{g(r, 'flex_compile_s', '.1f')} |"
        )
    lines += ["", "Spans per configuration (sink 64 included; N = full head):", ""]
    for r in rows:
        lines.append(f"- N={r['N']}, density {r['density']:.3f}: {r['spans']}")
    if meta.get("by_window"):
        lines += ["", "The path decision (`banded_attention(kernel=\"auto\")`): every head at one window W (sink 64; "
                  "W = N is a full head), each kernel vs dense in one rotation:", "",
                  "| N | window W | density | native × | native % of ideal | composition × | composition % of ideal "
                  "| faster |", "|---|---|---|---|---|---|---|---|"]
        for r in meta["by_window"]:
            lines.append(f"| {r['N']} | {r['window']} | {r['density']:.3f} | {r['native_speedup']:.2f} | "
                         f"{r['native_pct_of_ideal']:.0f}% | {r['composition_speedup']:.2f} | "
                         f"{r['composition_pct_of_ideal']:.0f}% | {r['faster']} |")
    lines += ["", "Notes:", ""] + [f"- {x}" for x in NOTES]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=4096 only, 3 repeats")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n", type=int, nargs="*", help="override the lengths")
    ap.add_argument("--density", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--by-window", action="store_true",
                    help="only the per-window path decision at N=8192 (added to the existing results)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.by_window:
        data = json.loads((RESULTS / "kernels_cpu.json").read_text())
        data["meta"]["by_window"] = by_window(8192, 16, args.d, [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192],
                                              args.repeats or 5)
        data["meta"]["by_window_command"] = command_line()
        write_results(RESULTS / "kernels_cpu.json", data, to_markdown(data["meta"], data["rows"]))
        return
    plan = {8192: (16, 5), 16384: (16, 3)}  # N -> (heads, repeats): the issue's lengths, Hq 16
    if args.quick:
        plan = {4096: (16, 3)}
    if args.n:
        plan = {n: plan.get(n, (8 if n > 8192 else 16, 3)) for n in args.n}
    load = os.getloadavg()
    rows = []
    print(f"{'N':>6} {'H':>3} {'D':>4} {'density':>8} {'ideal':>6} {'dense ms':>9} {'banded ms':>10} {'speedup':>8} {'%ideal':>7} {'flex x':>7}")
    for n, (h, reps) in plan.items():
        for dens in args.density:
            r = bench(n, h, args.d, dens, args.repeats or reps, flex=not args.no_flex)
            rows.append(r)
            if not args.no_write:
                write(rows, load, args)
            print(f"{r['N']:>6} {r['H']:>3} {r['D']:>4} {r['density']:>8.3f} {r['ideal']:>6.2f} {r['dense_ms']:>9.0f} "
                  f"{r['banded_ms']:>10.0f} {r['speedup']:>8.2f} {r['pct_of_ideal']:>6.0f}% {r.get('flex_speedup', '-'):>7}",
                  flush=True)
    if not args.no_write:
        write(rows, load, args)
        print(f"wrote {RESULTS / 'kernels_cpu.json'} and .md")


def write(rows: list[dict], load, args) -> None:
    """Rewrite the results after every row (a stopped run keeps what it measured)."""
    meta = {
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": command_line(),
        "machine": machine("threads"),
        "date": utc_minute(),
        "loadavg": " ".join(f"{x:.2f}" for x in load),
        "method": "fp32, batch 1, one warm-up, repeats in rotating order, median of per-repeat dense/method ratios; "
                  "FlexAttention compiled once per configuration (compile time apart), block mask built once",
    }
    write_results(RESULTS / "kernels_cpu.json", {"meta": meta, "rows": rows}, to_markdown(meta, rows))


if __name__ == "__main__":
    main()
