"""The native CPU sink+window prefill kernel (``csrc/sink_window_cpu.c``): build on first use, load, call.

One pass per block of 16 query rows: the block's sink keys and window keys are gathered as one key list, scored
with the rows in the vector lanes, masked, soft-maxed exactly and multiplied by V (no separate sink call, no
log-sum-exp merge, no N x N). It is compiled on the machine it runs on (``cc -O3 -march=native -fopenmp``) into
``$ATTENTION_COMPRESSOR_CACHE/kernels/<hash>/`` (default ``~/.cache/attention-compressor``; the hash covers the
source, the flags, the compiler and the CPU), written to a temporary name and renamed, so concurrent first
calls never load a half-written library. Without a working C compiler :func:`native_kernel` returns None and
:func:`attention_kernels.banded.banded_attention` keeps its SDPA composition; ``COMPRESS_NATIVE_CPU=0`` does the
same on purpose. Speed against the composition and dense SDPA: ``benchmarks/kernels_cpu.py`` (per-window table).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).resolve().parent / "csrc" / "sink_window_cpu.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
ENV_OFF = "COMPRESS_NATIVE_CPU"
_P, _I = ctypes.c_void_p, ctypes.c_int64


def _cache_root() -> Path:
    root = os.environ.get("ATTENTION_COMPRESSOR_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "attention-compressor"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))), platform.processor())
    except OSError:
        return platform.processor()


def _build(cc: str) -> Path:
    """Compile the kernel (if this exact build is not cached yet) and return the library's path.

    Raises subprocess.CalledProcessError / OSError when the compiler fails.
    """
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([src, " ".join(FLAGS).encode(), version.encode(), _cpu_id().encode()]))
    out_dir = _cache_root() / "kernels" / key.hexdigest()[:16]
    lib = out_dir / "sink_window_cpu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, text=True)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _load() -> ctypes.CDLL | None:
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: the CPU prefill uses the SDPA composition (slower at small windows)")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("the native CPU kernel did not build (%s): the CPU prefill uses the SDPA composition", detail)
        return None
    fn = lib.sink_window_prefill
    fn.argtypes = [_I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float,
                   ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def native_kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (no compiler, a failed build, or ``COMPRESS_NATIVE_CPU=0``)."""
    if os.environ.get(ENV_OFF, "").strip() == "0":
        return None
    return _load()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with unit stride over D (a copy only when it has none)."""
    return x if x.stride(3) == 1 or x.shape[3] <= 1 else x.contiguous()


def sink_window_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink_eff: torch.Tensor,
    window: torch.Tensor,
    scale: float,
    *,
    selected: torch.Tensor | None = None,
    block: int = 64,
) -> torch.Tensor | None:
    """Exact causal sink+window attention, fp32: q (B, Hq, N, D), k/v (B, Hkv, N, D) un-repeated (GQA by head
    index ``h // (Hq / Hkv)``), ``sink_eff``/``window`` (Hq,) int64 from
    :func:`attention_kernels.banded.head_pattern` (key j visible from row i iff ``j <= i`` and
    ``(j < sink_eff or i - j < window)``) -> (B, Hq, N, D) fp32, or None when the kernel is not available.

    ``selected`` (B, Hkv, ceil(N / block)) bool adds content-selected blocks of ``block`` keys per KV head (its
    query heads share them): key j is also visible from every row ``i >= j`` when block ``j // block`` is
    selected (:func:`plans.span.sees_or_selected`; the selection rule: :mod:`attention_kernels.selection`).

    Strided views (e.g. ``(B, N, H, D).transpose(1, 2)``) are read in place when D has unit stride and each
    tensor's row stride is one number. Runs on ``torch.get_num_threads()`` OpenMP threads.

    Raises MemoryError when the kernel cannot allocate its per-thread scratch (O(S + W + 16) x 16 floats).
    """
    lib = native_kernel()
    if lib is None:
        return None
    b, hq, n, d = q.shape
    if n >= 2**31:
        raise ValueError(f"the native CPU kernel takes sequences below 2^31 tokens; got {n}")
    hkv = k.shape[1]
    n_rep = hq // hkv
    q, k, v = (_rows(t.to(torch.float32)) for t in (q, k, v))
    out = torch.empty(b, hq, n, d, dtype=torch.float32)
    bi = torch.arange(b).repeat_interleave(hq)
    hi = torch.arange(hq).repeat(b)
    kv = hi // n_rep

    def offsets(x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        return (bi * x.stride(0) + heads * x.stride(1)).contiguous()

    q_off, k_off, v_off, o_off = offsets(q, hi), offsets(k, kv), offsets(v, kv), offsets(out, hi)
    s_item = sink_eff.to(torch.int64)[hi].contiguous()
    w_item = window.to(torch.int64)[hi].contiguous()
    sel_map = sel_off = None
    if selected is not None:
        n_blocks = -(-n // block)
        if block < 1 or selected.shape != (b, hkv, n_blocks) or selected.dtype != torch.bool:
            raise ValueError(f"selected must be a bool tensor of shape ({b}, {hkv}, {n_blocks}) for block {block}; "
                             f"got {selected.dtype} {tuple(selected.shape)}")
        sel_map = selected.to(torch.uint8).contiguous()
        sel_off = ((bi * hkv + kv) * n_blocks).contiguous()
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    rc = lib.sink_window_prefill(
        b * hq, q_off.data_ptr(), k_off.data_ptr(), v_off.data_ptr(), o_off.data_ptr(), s_item.data_ptr(),
        w_item.data_ptr(), ptr(sel_map), ptr(sel_off), int(block), q.data_ptr(), k.data_ptr(), v.data_ptr(),
        out.data_ptr(), q.stride(2), k.stride(2), v.stride(2), out.stride(2), n, d, float(scale),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("the native CPU prefill kernel could not allocate its scratch memory")
    return out


__all__ = ["native_kernel", "sink_window_prefill"]
