"""GPU benchmark (prepared for one H200; not yet run): Triton sparse_prefill / sparse_decode vs torch SDPA,
FlashAttention-2 (when ``flash-attn`` is installed) and FlexAttention; decode throughput at a KV budget.

    python benchmarks/gpu_kernels.py            # writes $OUT/gpu_kernels.json (or benchmarks/results/)
    python benchmarks/gpu_kernels.py --quick    # N=8192 only
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --interpret-check --out /tmp/x   # the same code, tiny, on CPU

1. Correctness: sparse_prefill / sparse_decode against the reference at N=2048 (bf16, GQA 32/8) and the
   interpreter-tested fp32 path with tf32 off.
2. Prefill, bf16, B=1, Hq=32, Hkv=8, D in {64, 128}, N in {8k, 16k, 32k, 64k}, densities ~0.1/0.25/0.5 (spans as in
   benchmarks/kernels_cpu.make_windows, sink 64): dense causal SDPA (flash backend, K/V repeated beforehand),
   sparse_prefill with the plan, and sparse_prefill with every head full (the kernel's own dense efficiency).
3. Decode, bf16, B in {1, 8}: SDPA over the full cache vs sparse_decode over the full cache vs sparse_decode
   over the compressed cache (each head keeps min(span, N) slots).
4. Throughput (``--model``, default ``qwen2.5-coder-0.5b``; needs ``pip install -e '.[models]'``): the largest batch
   whose KV cache fits ``--kv-budget`` GiB at 32k for dense / a uniform plan / the same at its KV density
   (:func:`compressor.bench.throughput`), and its decode tokens/s.
Times are medians from triton.testing.do_bench (ms; a plain timer under ``--interpret-check``). Every row is written
as soon as it is measured.
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
    ap.add_argument("--interpret-check", action="store_true",
                    help="run every section at tiny sizes on the CPU under TRITON_INTERPRET=1 (what CI can check)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="model of the throughput section")
    ap.add_argument("--kv-budget", type=float, default=16.0, help="GiB of KV cache for the throughput section")
    args = ap.parse_args()
    global HQ, HKV
    check = args.interpret_check
    if check:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--interpret-check needs TRITON_INTERPRET=1 set before Python starts")
        HQ, HKV = 4, 2
    elif not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA device (or --interpret-check under TRITON_INTERPRET=1)")
    else:
        os.environ.pop("TRITON_INTERPRET", None)

    import contextlib

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from triton.testing import do_bench

    try:
        from flash_attn import flash_attn_func  # FlashAttention-2, the dense peer on a GPU
    except ImportError:
        flash_attn_func = None

    from attention_kernels.reference import reference_attention
    from attention_kernels.reference import decode_reference
    from attention_kernels.triton_decode import sparse_decode
    from attention_kernels.triton_prefill import sparse_prefill
    from kernels_cpu import make_windows
    from plans.span import prefill_density

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "gpu_kernels.json"
    dev = torch.device("cpu" if check else "cuda")
    result = {
        "meta": {
            "command": "python " + " ".join(sys.argv),
            "device": "cpu (TRITON_INTERPRET=1 check)" if check else torch.cuda.get_device_name(dev),
            "flash_attn": "installed" if flash_attn_func is not None else "not installed (FA2 columns null)",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "heads": {"q": HQ, "kv": HKV}, "sink": SINK, "dtype": "bfloat16",
        },
        "checks": [], "prefill": [], "decode": [], "throughput": [], "errors": [],
    }

    def save():
        path.write_text(json.dumps(result, indent=1) + "\n")

    def bench(fn):
        if check:  # the interpreter: a plain timer, one warm-up
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1000
        return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def flash_backend():
        return contextlib.nullcontext() if check else sdpa_kernel(SDPBackend.FLASH_ATTENTION)

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
        n = 256 if check else 2048
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
        lmax = 256 if check else 4096
        q = rnd(4, HQ, d, dtype=dtype)
        kc, vc = rnd(4, HKV, lmax, d, dtype=dtype), rnd(4, HKV, lmax, d, dtype=dtype)
        kv_len = torch.randint(1, lmax + 1, (4, HKV), device=dev, generator=g)
        ref = decode_reference(q.double(), kc.double(), vc.double(), kv_len)
        out = sparse_decode(q, kc, vc, kv_len)
        err = (out.double() - ref).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        return {"what": "decode", "dtype": str(dtype), "D": d, "max_abs_err": err, "ok": err < tol}

    for dtype in ((torch.float32,) if check else (torch.bfloat16, torch.float16, torch.float32)):
        for d in ((64,) if check else (64, 128)):
            guarded("checks", f"prefill {dtype} {d}", lambda: check_prefill(dtype, d))
            guarded("checks", f"decode {dtype} {d}", lambda: check_decode(dtype, d))

    # ---- 2. prefill
    lengths = [512] if check else [8192] if args.quick else [8192, 16384, 32768, 65536]
    dims = (64,) if check else (64, 128)
    targets = (0.25,) if check else (0.1, 0.25, 0.5)
    dt = torch.float32 if check else torch.bfloat16
    flex = flex_attention if check else torch.compile(flex_attention, dynamic=False)

    def flex_mask(spans: torch.Tensor, n: int):
        from plans.span import split_span_tensor

        sink_eff, window = split_span_tensor(torch.full_like(spans, SINK), spans)
        full = spans >= n
        sink_eff, window = torch.where(full, 0, sink_eff), torch.where(full, n, window)

        def mask_mod(b, h, qi, ki):
            return (ki <= qi) & ((ki < sink_eff[h]) | (qi - ki < window[h]))

        return create_block_mask(mask_mod, 1, HQ, n, n, device=str(dev.type))

    def prefill_row(n, d, target):
        spans_l = make_windows(n, HQ, target)
        density = sum(prefill_density(s, n) for s in spans_l) / HQ
        q, k, v = rnd(1, HQ, n, d, dtype=dt), rnd(1, HKV, n, d, dtype=dt), rnd(1, HKV, n, d, dtype=dt)
        kr, vr = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
        spans = torch.tensor(spans_l, device=dev)
        sink = torch.full((HQ,), SINK, device=dev)
        full = torch.full((HQ,), n, device=dev)
        with flash_backend():
            t_dense = bench(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        sparse_prefill(q, k, v, sink, spans)  # autotune outside the timing
        t_sparse = bench(lambda: sparse_prefill(q, k, v, sink, spans))
        t_full = bench(lambda: sparse_prefill(q, k, v, sink, full))
        bm = flex_mask(spans, n)
        t0 = time.perf_counter()
        o_flex = flex(q, kr, vr, block_mask=bm)
        flex_compile_s = time.perf_counter() - t0
        flex_err = float((o_flex.float() - sparse_prefill(q, k, v, sink, spans).float()).abs().max())
        t_flex = bench(lambda: flex(q, kr, vr, block_mask=bm))
        t_fa2 = None
        if flash_attn_func is not None:  # (B, N, H, D) layout, GQA native
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            t_fa2 = bench(lambda: flash_attn_func(qt, kt, vt, causal=True))
        flops = 4 * n * n / 2 * d * HQ
        return {
            "flex_ms": round(t_flex, 3), "flex_compile_s": round(flex_compile_s, 1), "flex_max_abs_diff": flex_err,
            "speedup_vs_flex": round(t_flex / t_sparse, 2),
            "fa2_ms": None if t_fa2 is None else round(t_fa2, 3),
            "speedup_vs_fa2": None if t_fa2 is None else round(t_fa2 / t_sparse, 2),
            "pct_of_ideal_vs_fa2": None if t_fa2 is None else round(100 * t_fa2 / t_sparse * density, 1),
            "N": n, "D": d, "target": target, "density": round(density, 4), "ideal": round(1 / density, 2),
            "sdpa_flash_ms": round(t_dense, 3), "sparse_ms": round(t_sparse, 3), "triton_full_ms": round(t_full, 3),
            "speedup_vs_sdpa": round(t_dense / t_sparse, 2), "pct_of_ideal": round(100 * t_dense / t_sparse * density, 1),
            "sdpa_tflops": round(flops / t_dense / 1e9, 1), "triton_full_tflops": round(flops / t_full / 1e9, 1),
        }

    for n in lengths:
        for d in dims:
            for target in targets:
                guarded("prefill", f"N={n} D={d} {target}", lambda: prefill_row(n, d, target))
                torch.cuda.empty_cache()

    # ---- 3. decode
    def decode_row(n, d, b, target):
        spans_l = make_windows(n, HQ, target)  # per query head; a KV head keeps the largest span of its group
        grp = HQ // HKV
        kv_span = [max(spans_l[h * grp : (h + 1) * grp]) for h in range(HKV)]
        q = rnd(b, HQ, d, dtype=dt)
        kc, vc = rnd(b, HKV, n, d, dtype=dt), rnd(b, HKV, n, d, dtype=dt)
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
        for d in dims:
            for b in ((2,) if check else (1, 8)):
                guarded("decode", f"N={n} D={d} B={b}", lambda: decode_row(n, d, b, 0.25))
                torch.cuda.empty_cache()

    # ---- 4. throughput at a KV budget (MoA's metric) on a real model
    def throughput_rows():
        from compressor.bench import throughput
        from compressor.models import load_model
        from plans.identity import identity_from_config
        from plans.schema import span_for_density, uniform_plan

        model, _ = load_model(args.model, dtype="bfloat16", device_map={"": dev.type})
        n = 32768
        plan = uniform_plan(identity_from_config(model.config), span_for_density(0.25, n), sink=SINK, lengths=[n])
        with torch.no_grad():
            rows = throughput(model, plan, [n], int(args.kv_budget * 2**30), max_batch=256, decode_steps=16)
        return {"model": args.model, "N": n, "kv_budget_gib": args.kv_budget,
                "rows": [{k: getattr(r, k) for k in ("method", "kv_density", "batch", "step_ms", "tok_s", "ratios")}
                         for r in rows]}

    if not check:
        guarded("throughput", args.model, throughput_rows)

    result["meta"]["finished"] = time.strftime("%H:%M:%S")
    save()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
