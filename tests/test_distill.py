"""compressor.distill: KD fine-tuning of a patched model, loss decreases, resumable bit for bit, errors."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.args import DistillArgs
from compressor.distill import META_FILE, STATE_FILE, TEACHER_FILE, distill
from compressor.patching import attention_modules
from plans.errors import CompressError
from plans.identity import identity_from_config
from plans.schema import DensePattern, LayerPlan, Plan, SinkWindowPattern
from profilers.data.samples import Sample
from tests.conftest import VOCAB, tiny_model


def window_plan(model) -> Plan:
    ident = identity_from_config(model.config)
    w = SinkWindowPattern(sink=2, alpha=6, beta=0.0)
    return Plan(model=ident, layers=[LayerPlan(heads=[w, DensePattern()]), LayerPlan(heads=[w, w])])


def samples(k=2, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        ids = torch.randint(1, VOCAB, (n,), generator=g)
        lm = torch.zeros(n, dtype=torch.bool)
        lm[n // 2:] = True
        out.append(Sample(ids, lm))
    return out


def test_loss_decreases_and_state(tmp_path):
    m = tiny_model("llama")
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    attn_before = {n: p.detach().clone() for n, p in attention_modules(m)[0].named_parameters()}
    mlp_before = m.model.layers[0].mlp.up_proj.weight.detach().clone()
    losses = distill(m, window_plan(m), samples(1), DistillArgs(steps=8, lr=3e-3, progress=True, save_every=4), out_dir=tmp_path)
    assert len(losses) == 8 and all(x >= 0 for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert m.config._attn_implementation == "compress"  # the student stays patched
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    # non_attention: attention weights untouched, MLP trained
    assert all(torch.equal(p, attn_before[n]) for n, p in attention_modules(m)[0].named_parameters())
    assert not torch.equal(m.model.layers[0].mlp.up_proj.weight, mlp_before)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["step"] == 8 and meta["losses"] == losses and meta["params"] == "non_attention"
    assert (tmp_path / STATE_FILE).exists() and (tmp_path / TEACHER_FILE).exists()


class Stop(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path):
    ss = samples(3)
    full = distill(tiny_model("llama"), window_plan(tiny_model("llama")), ss, DistillArgs(steps=6, lr=2e-3, progress=False, params="all", save_every=2), out_dir=tmp_path / "full")

    def stop_at_4(step, loss):
        if step == 4:
            raise Stop

    m1 = tiny_model("llama")
    with pytest.raises(Stop):
        distill(m1, window_plan(m1), ss, DistillArgs(steps=6, lr=2e-3, progress=False, params="all", save_every=2), out_dir=tmp_path / "r", on_step=stop_at_4)
    assert json.loads((tmp_path / "r" / META_FILE).read_text())["step"] == 4
    seen = []
    m2 = tiny_model("llama")  # a fresh process: the base weights again
    resumed = distill(m2, window_plan(m2), ss, DistillArgs(steps=6, lr=2e-3, progress=False, params="all", save_every=2), out_dir=tmp_path / "r", on_step=lambda s, v: seen.append(s))
    assert seen == [5, 6]  # continued from the saved step
    assert torch.allclose(torch.tensor(resumed), torch.tensor(full), rtol=1e-5, atol=1e-7), (resumed, full)
    # already done: nothing to run
    m3 = tiny_model("llama")
    again = distill(m3, window_plan(m3), ss, DistillArgs(steps=6, lr=2e-3, progress=False, params="all", save_every=2), out_dir=tmp_path / "r", on_step=lambda s, v: seen.append(s))
    assert again == resumed and seen == [5, 6]
    # a different recipe is refused, resume=False starts over
    with pytest.raises(CompressError, match="different"):
        distill(tiny_model("llama"), window_plan(m3), ss, DistillArgs(steps=6, lr=1e-3, progress=False, params="all"), out_dir=tmp_path / "r")
    fresh = distill(tiny_model("llama"), window_plan(m3), ss, DistillArgs(steps=2, lr=1e-3, progress=False, params="all", resume=False, loss="mse"), out_dir=tmp_path / "r")
    assert len(fresh) == 2 and fresh[1] < fresh[0] * 1.5


def test_teacher_copy_equals_cache(tmp_path):
    ss = samples(2)
    runs = {}
    for t in ("cache", "copy"):
        m = tiny_model("llama")
        runs[t] = distill(m, window_plan(m), ss, DistillArgs(steps=3, lr=3e-3, progress=False, teacher=t, loss="mse"), out_dir=tmp_path / t)
    assert torch.allclose(torch.tensor(runs["cache"]), torch.tensor(runs["copy"]), rtol=1e-5, atol=1e-8)
    assert not (tmp_path / "copy" / TEACHER_FILE).exists() and (tmp_path / "cache" / TEACHER_FILE).exists()
    m = tiny_model("llama")  # auto: over the cache limit -> a frozen copy
    distill(m, window_plan(m), ss, DistillArgs(steps=1, progress=False, max_teacher_bytes=10), out_dir=tmp_path / "auto")
    assert json.loads((tmp_path / "auto" / META_FILE).read_text())["teacher"] == "copy"


def test_errors(tmp_path):
    m = tiny_model("llama")
    with pytest.raises(CompressError, match="no samples"):
        distill(m, window_plan(m), [], DistillArgs(steps=1, progress=False), out_dir=tmp_path)
    with pytest.raises(CompressError, match="params"):
        distill(m, window_plan(m), samples(1), DistillArgs(steps=1, progress=False, params="attention"), out_dir=tmp_path)
    with pytest.raises(CompressError, match="loss"):
        distill(m, window_plan(m), samples(1), DistillArgs(steps=1, progress=False, loss="ce"), out_dir=tmp_path)
    with pytest.raises(CompressError, match="teacher"):
        distill(m, window_plan(m), samples(1), DistillArgs(steps=1, progress=False, teacher="none"), out_dir=tmp_path)
