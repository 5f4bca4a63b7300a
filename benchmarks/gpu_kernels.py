"""GPU benchmark (prepared for one H200; not yet run): Triton sparse_prefill / sparse_decode vs torch SDPA.

    python benchmarks/gpu_kernels.py            # writes $OUT/gpu_kernels.json (or benchmarks/results/)
    python benchmarks/gpu_kernels.py --quick    # N=8192 only

1. Correctness: sparse_prefill / sparse_decode against the reference at N=2048 (bf16, GQA 32/8) and the
   interpreter-tested fp32 path with tf32 off.
2. Prefill, bf16, B=1, Hq=32, Hkv=8, D in {64, 128}, N in {8k, 16k, 32k, 64k}, densities ~0.1/0.25/0.5 (spans as in
   benchmarks/kernels_cpu.make_windows, sink 64): dense causal SDPA (flash backend, K/V repeated beforehand),
   sparse_prefill with the plan, and sparse_prefill with every head full (the kernel's own dense efficiency).
3. Decode, bf16, B in {1, 8}: SDPA over the full cache vs sparse_decode over the full cache vs sparse_decode
   over the compressed cache (each head keeps min(span, N) slots).
Times are medians from triton.testing.do_bench (ms). Every row is written as soon as it is measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HQ, HKV, SINK = 32, 8, 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA device")
    os.environ.pop("TRITON_INTERPRET", None)

    import triton
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.reference import reference_attention
    from kernels.reference import decode_reference
    from kernels.triton_decode import sparse_decode
    from kernels.triton_prefill import sparse_prefill
    from kernels_cpu import make_windows
    from plans.span import prefill_density

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_kernels.json"
    dev = torch.device("cuda")
    result = {
        "meta": {
            "command": "python " + " ".join(sys.argv),
            "device": torch.cuda.get_device_name(dev),
            "torch": torch.__version__, "triton": triton.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "heads": {"q": HQ, "kv": HKV}, "sink": SINK, "dtype": "bfloat16",
        },
        "checks": [], "prefill": [], "decode": [], "errors": [],
    }

    def save():
        path.write_text(json.dumps(result, indent=1) + "\n")

    def bench(fn):
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def guarded(section, label, fn):
        try:
            row = fn()
            result[section].append(row)
            print(section, json.dumps(row), flush=True)
        except Exception as e:  # keep going: one failing shape must not lose the other rows
            result["errors"].append({"where": f"{section} {label}", "error": repr(e), "trace": traceback.format_exc()[-2000:]})
            print("ERROR", section, label, repr(e), flush=True)
            torch.cuda.empty_cache()
        save()

    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device=dev, generator=g, dtype=torch.float32).to(dtype)

    # ---- 1. correctness
    def check_prefill(dtype, d):
        n = 2048
        q, k, v = rnd(1, HQ, n, d, dtype=dtype), rnd(1, HKV, n, d, dtype=dtype), rnd(1, HKV, n, d, dtype=dtype)
        spans = torch.tensor(make_windows(n, HQ, 0.25), device=dev)
        spans[0] = n
        sink = torch.full((HQ,), SINK, device=dev)
        sink[1] = 0
        ref = reference_attention(q.double(), k.double(), v.double(), sink, spans)
        out = sparse_prefill(q, k, v, sink, spans)
        err = (out.double() - ref).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        return {"what": "prefill", "dtype": str(dtype), "D": d, "max_abs_err": err, "ok": err < tol}

    def check_decode(dtype, d):
        lmax = 4096
        q = rnd(4, HQ, d, dtype=dtype)
        kc, vc = rnd(4, HKV, lmax, d, dtype=dtype), rnd(4, HKV, lmax, d, dtype=dtype)
        kv_len = torch.randint(1, lmax + 1, (4, HKV), device=dev, generator=g)
        ref = decode_reference(q.double(), kc.double(), vc.double(), kv_len)
        out = sparse_decode(q, kc, vc, kv_len)
        err = (out.double() - ref).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        return {"what": "decode", "dtype": str(dtype), "D": d, "max_abs_err": err, "ok": err < tol}

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 128):
            guarded("checks", f"prefill {dtype} {d}", lambda: check_prefill(dtype, d))
            guarded("checks", f"decode {dtype} {d}", lambda: check_decode(dtype, d))

    # ---- 2. prefill
    lengths = [8192] if args.quick else [8192, 16384, 32768, 65536]

    def prefill_row(n, d, target):
        spans_l = make_windows(n, HQ, target)
        density = sum(prefill_density(s, n) for s in spans_l) / HQ
        q, k, v = rnd(1, HQ, n, d), rnd(1, HKV, n, d), rnd(1, HKV, n, d)
        kr, vr = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        spans = torch.tensor(spans_l, device=dev)
        sink = torch.full((HQ,), SINK, device=dev)
        full = torch.full((HQ,), n, device=dev)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t_dense = bench(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        sparse_prefill(q, k, v, sink, spans)  # autotune outside the timing
        t_sparse = bench(lambda: sparse_prefill(q, k, v, sink, spans))
        t_full = bench(lambda: sparse_prefill(q, k, v, sink, full))
        flops = 4 * n * n / 2 * d * HQ
        return {
            "N": n, "D": d, "target": target, "density": round(density, 4), "ideal": round(1 / density, 2),
            "sdpa_flash_ms": round(t_dense, 3), "sparse_ms": round(t_sparse, 3), "triton_full_ms": round(t_full, 3),
            "speedup_vs_sdpa": round(t_dense / t_sparse, 2), "pct_of_ideal": round(100 * t_dense / t_sparse * density, 1),
            "sdpa_tflops": round(flops / t_dense / 1e9, 1), "triton_full_tflops": round(flops / t_full / 1e9, 1),
        }

    for n in lengths:
        for d in (64, 128):
            for target in (0.1, 0.25, 0.5):
                guarded("prefill", f"N={n} D={d} {target}", lambda: prefill_row(n, d, target))
                torch.cuda.empty_cache()

    # ---- 3. decode
    def decode_row(n, d, b, target):
        spans_l = make_windows(n, HQ, target)  # per query head; a KV head keeps the largest span of its group
        grp = HQ // HKV
        kv_span = [max(spans_l[h * grp : (h + 1) * grp]) for h in range(HKV)]
        q = rnd(b, HQ, d)
        kc, vc = rnd(b, HKV, n, d), rnd(b, HKV, n, d)
        full_len = torch.full((b, HKV), n, device=dev, dtype=torch.int32)
        comp_len = torch.tensor(kv_span, device=dev, dtype=torch.int32).clamp(max=n).expand(b, HKV).contiguous()
        lc = int(max(kv_span))
        kcc, vcc = kc[:, :, :lc].contiguous(), vc[:, :, :lc].contiguous()
        kr, vr = kc.repeat_interleave(grp, 1), vc.repeat_interleave(grp, 1)
        q4 = q[:, :, None]
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q4, kr, vr))
        t_full = bench(lambda: sparse_decode(q, kc, vc, full_len))
        t_comp = bench(lambda: sparse_decode(q, kcc, vcc, comp_len))
        kv_frac = sum(min(s, n) for s in kv_span) / (HKV * n)
        return {
            "N": n, "D": d, "B": b, "target": target, "kv_fraction": round(kv_frac, 4),
            "sdpa_full_ms": round(t_sdpa, 4), "triton_full_ms": round(t_full, 4), "triton_compressed_ms": round(t_comp, 4),
            "speedup_vs_sdpa": round(t_sdpa / t_comp, 2), "speedup_vs_triton_full": round(t_full / t_comp, 2),
        }

    for n in lengths:
        for d in (64, 128):
            for b in (1, 8):
                guarded("decode", f"N={n} D={d} B={b}", lambda: decode_row(n, d, b, 0.25))
                torch.cuda.empty_cache()

    result["meta"]["finished"] = time.strftime("%H:%M:%S")
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
