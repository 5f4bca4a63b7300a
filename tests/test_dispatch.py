"""attention_kernels.dispatch: backend choice from COMPRESS_ATTENTION and the device, and same results everywhere."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # the forced-Triton cases run in the interpreter on CPU

from attention_kernels import dispatch  # noqa: E402

for _name in ("attention_kernels.triton_prefill", "attention_kernels.triton_decode"):  # imported before the variable was set: redo
    _mod = sys.modules.get(_name)
    if _mod is not None and not CUDA and not _mod.INTERPRET:
        importlib.reload(_mod)
from attention_kernels.options import KeyPositions  # noqa: E402
from attention_kernels.reference import reference_attention  # noqa: E402

torch.set_num_threads(1)


def _prefill_inputs(n=150):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, n, 16, generator=g)
    k = torch.randn(1, 2, n, 16, generator=g)
    v = torch.randn(1, 2, n, 16, generator=g)
    return q, k, v, torch.tensor([4, 0, 2, 64]), torch.tensor([20, 40, 1000, 70])


def _decode_inputs():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 16, generator=g)
    k = torch.randn(2, 2, 50, 16, generator=g)
    v = torch.randn(2, 2, 50, 16, generator=g)
    return q, k, v, torch.tensor([[50, 3], [1, 20]])


def test_backend_choice(monkeypatch):
    q = torch.zeros(1, 1, 1, 16)
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert dispatch.backend(q) == "banded"
    if CUDA:
        assert dispatch.backend(q.cuda()) == "triton"
    for value, want in (("", "banded"), ("auto", "banded"), ("Reference", "reference"), ("banded", "banded"),
                        ("triton", "triton")):
        monkeypatch.setenv(dispatch.ENV, value)
        assert dispatch.backend(q) == want
    monkeypatch.setenv(dispatch.ENV, "flash")
    with pytest.raises(ValueError, match="COMPRESS_ATTENTION"):
        dispatch.backend(q)


@pytest.mark.parametrize("choice", ["", "reference", "banded", "triton"])
def test_sparse_attention_backends_agree(monkeypatch, choice):
    q, k, v, sink, span = _prefill_inputs()
    monkeypatch.setenv(dispatch.ENV, choice)
    dev = "cuda" if choice == "triton" and CUDA else "cpu"
    out = dispatch.sparse_attention(*(t.to(dev) for t in (q, k, v, sink, span))).cpu()
    ref = reference_attention(q.double(), k.double(), v.double(), sink, span)
    assert out.shape == q.shape and (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("choice", ["", "reference", "banded", "triton"])
def test_decode_attention_backends_agree(monkeypatch, choice):
    q, k, v, kv_len = _decode_inputs()
    monkeypatch.setenv(dispatch.ENV, choice)
    dev = "cuda" if choice == "triton" and CUDA else "cpu"
    out = dispatch.decode_attention(*(t.to(dev) for t in (q, k, v, kv_len))).cpu()
    from attention_kernels.reference import decode_reference

    ref = decode_reference(q.double(), k.double(), v.double(), kv_len)
    assert out.shape == q.shape and (out.double() - ref).abs().max() < 1e-5


def test_reference_backend_validates(monkeypatch):
    q, k, v, sink, span = _prefill_inputs()
    monkeypatch.setenv(dispatch.ENV, "reference")
    with pytest.raises(ValueError):
        dispatch.sparse_attention(q, k, v, sink[:2], span[:2])


@pytest.mark.parametrize("side", ["left", "right", "holes"])
def test_padded_batch_equals_reference_on_real_rows(side):
    import torch

    from attention_kernels.dispatch import sparse_attention_padded
    from attention_kernels.reference import reference_attention

    torch.manual_seed(0)
    b, hq, hkv, n, d = 3, 4, 2, 77, 16
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    n_real = torch.tensor([77, 50, 9])
    valid = torch.arange(n)[None] >= (n - n_real)[:, None]
    if side == "right":
        valid = valid.flip(-1)
    elif side == "holes":  # padding inside the sequence (packed inputs): gathered, not sliced
        valid = torch.rand(b, n, generator=torch.Generator().manual_seed(1)) < 0.6
        valid[:, 0] = True
        n_real = valid.sum(-1)
    pos = torch.where(valid, valid.long().cumsum(-1) - 1, -1)
    sink = torch.tensor([[4, 0, 2, 70]] * b)
    span = torch.stack([torch.tensor([20, 33, 5, 100]).clamp(max=int(m)) for m in n_real])
    got = sparse_attention_padded(q, k, v, sink, span, valid, None)
    ref = reference_attention(q, k, v, sink, span, None, positions=KeyPositions(q_pos=pos, k_pos=pos, k_valid=valid))
    assert (got - ref)[valid[:, None, :, None].expand_as(got)].abs().max() < 1e-5
