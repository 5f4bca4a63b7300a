"""The profile driver (compressor.influence_profile): output format, resume, errors, model state restored."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.hf.modules import attention_modules, module_state
from compressor.influence_profile import InfluenceArgs, partial_paths, run_profile
from plans.errors import CompressError
from profilers.profile_format import load_profile
from profilers.influence import kv_aggregate
from tests.test_profile_influence import make_sample, tiny


class Stop(Exception):
    pass


def samples():
    return {48: [make_sample(48, 20, seed=s) for s in range(3)], 80: [make_sample(80, 30, seed=10 + s) for s in range(2)]}


def test_output_format_and_state_restored(tmp_path):
    model = tiny("llama")
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    impl = model.config._attn_implementation
    prof = run_profile(model, samples(), tmp_path / "prof", InfluenceArgs(block=16, sink_sizes=(16, 32), progress=True), model_name="tiny-llama")
    assert model.config._attn_implementation == impl and model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert len(attention_modules(model)) == 2
    assert all(module_state(m).collector is None for m in attention_modules(model))

    loaded = load_profile(tmp_path / "prof")
    m = loaded.meta
    assert m.method == "taylor" and m.lengths == [48, 80] and m.samples == {48: 3, 80: 2}
    assert m.block == 16 and m.sink_sizes == [16, 32] and m.model.name == "tiny-llama"
    assert m.model.model_type == "llama" and m.model.num_kv_heads == 2 and m.tool_version
    for n, nb in ((48, 3), (80, 5)):
        dq, sq = loaded.dist(n, "q"), loaded.sinkdist(n, "q")
        assert dq.shape == (2, 4, nb) and sq.shape == (2, 4, 2, nb) and dq.dtype == torch.float64
        assert torch.equal(loaded.dist(n, "kv"), kv_aggregate(dq, 2, 1))
        assert torch.equal(loaded.sinkdist(n, "kv"), kv_aggregate(sq, 2, 1))
        assert torch.equal(dq, prof.dist(n, "q"))
        assert (dq > 0).all()
    assert loaded.masked_loss(80, 16, 32).shape == (2, 2)
    assert not any(p.exists() for p in partial_paths(tmp_path / "prof"))


def test_average_over_samples(tmp_path):
    model = tiny("llama")
    s = samples()[48]
    full = run_profile(model, {48: s}, tmp_path / "all", InfluenceArgs(block=16, progress=False))
    parts = [run_profile(model, {48: [x]}, tmp_path / f"one{i}", InfluenceArgs(block=16, progress=False)) for i, x in enumerate(s)]
    mean = sum(p.dist(48, "q") for p in parts) / 3
    assert torch.allclose(full.dist(48, "q"), mean, rtol=1e-12, atol=0)


def test_resume_gives_identical_result(tmp_path):
    model = tiny("gpt_neox")
    ref = run_profile(model, samples(), tmp_path / "ref", InfluenceArgs(block=16, progress=False))

    for stop_after, first, remaining in [((48, 2), (48, 3), 3), ((80, 1), (80, 2), 1)]:
        stem = tmp_path / f"res{stop_after[0]}_{stop_after[1]}"

        def stop(n, k, stop_after=stop_after):
            if (n, k) == stop_after:
                raise Stop

        with pytest.raises(Stop):
            run_profile(model, samples(), stem, InfluenceArgs(block=16, progress=False), on_sample=stop)
        st, js = partial_paths(stem)
        assert st.exists() and js.exists() and not stem.with_suffix(".json").exists()
        done = json.loads(js.read_text())["done"]
        assert done[str(stop_after[0])] == stop_after[1]
        seen = []
        out = run_profile(model, samples(), stem, InfluenceArgs(block=16, progress=False), on_sample=lambda n, k: seen.append((n, k)))
        assert seen[0] == first and len(seen) == remaining
        for key, t in ref.tensors.items():
            assert torch.equal(out.tensors[key], t), key
        assert not st.exists() and not js.exists()


def test_partial_errors(tmp_path):
    model = tiny("llama")
    stem = tmp_path / "p"
    st, js = partial_paths(stem)

    def stop(n, k):
        raise Stop

    with pytest.raises(Stop):
        run_profile(model, samples(), stem, InfluenceArgs(block=16, progress=False), on_sample=stop)
    good = st.read_bytes()
    # corrupt tensors
    st.write_bytes(b"not a safetensors file")
    with pytest.raises(CompressError, match="corrupt partial"):
        run_profile(model, samples(), stem, InfluenceArgs(block=16, progress=False))
    # corrupt json
    st.write_bytes(good)
    js.write_text("{not json")
    with pytest.raises(CompressError, match="corrupt partial progress"):
        run_profile(model, samples(), stem, InfluenceArgs(block=16, progress=False))
    # other recipe (different block) -> refuse to mix; resume=False starts over
    js.unlink()
    with pytest.raises(CompressError, match="different model, samples or settings"):
        run_profile(model, samples(), stem, InfluenceArgs(block=32, progress=False))
    prof = run_profile(model, samples(), stem, InfluenceArgs(block=32, progress=False, resume=False))
    assert prof.meta.block == 32 and not st.exists()


def test_input_errors(tmp_path):
    model = tiny("llama")  # max_position_embeddings 2048 by default
    model.config.max_position_embeddings = 64
    with pytest.raises(CompressError, match="max_position_embeddings"):
        run_profile(model, {80: [make_sample(80, 30)]}, tmp_path / "a", InfluenceArgs(progress=False))
    prof = run_profile(model, {80: [make_sample(80, 30)]}, tmp_path / "a", InfluenceArgs(block=16, progress=False, allow_extrapolation=True))
    assert prof.meta.lengths == [80]
    with pytest.raises(CompressError, match="sample 1 has 47 tokens"):
        run_profile(model, {48: [make_sample(48, 20), make_sample(47, 20)]}, tmp_path / "b", InfluenceArgs(progress=False))
    with pytest.raises(CompressError, match="no target tokens"):
        run_profile(model, {48: [make_sample(48, 48)]}, tmp_path / "c", InfluenceArgs(progress=False))
    with pytest.raises(CompressError, match="no samples"):
        run_profile(model, {48: []}, tmp_path / "d", InfluenceArgs(progress=False))


def test_unsupported_model_refused(tmp_path):
    from transformers import AutoModelForCausalLM, BloomConfig

    model = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=64, n_head=4, n_layer=2, vocab_size=128))
    with pytest.raises(CompressError, match="'bloom'"):
        run_profile(model, {48: [make_sample(48, 20)]}, tmp_path / "f", InfluenceArgs(progress=False))


def test_gqa_window_model_runs_and_warns(tmp_path):
    model = tiny("mistral_window")
    with pytest.warns(UserWarning, match="native sliding window of 50"):
        prof = run_profile(model, {80: [make_sample(80, 30)]}, tmp_path / "m", InfluenceArgs(block=16, progress=False))
    assert prof.meta.extra["native_window"]["sliding_window"] == 50
    assert prof.dist(80, "kv").shape == (2, 1, 5)
    assert prof.dist(80, "q")[:, :, 4:].abs().max() == 0  # distances >= 64 are outside the window


def test_registered_function_is_plain_sdpa_without_collector():
    from compressor.hf.influence_attention import INFLUENCE_ATTN  # registers it at import

    model = tiny("llama")
    ids = make_sample(40, 10).input_ids[None]
    ref = model(ids).logits
    model.set_attn_implementation(INFLUENCE_ATTN)
    assert torch.equal(model(ids).logits, ref)
    model.set_attn_implementation("sdpa")


def test_bfloat16_model(tmp_path):
    """bf16 weights: the recompute runs in float32, gradients flow back in bf16, sums stay float64."""
    ref = run_profile(tiny("llama"), {48: [make_sample(48, 20)]}, tmp_path / "f32", InfluenceArgs(block=16, progress=False))
    prof = run_profile(tiny("llama", torch.bfloat16), {48: [make_sample(48, 20)]}, tmp_path / "bf16", InfluenceArgs(block=16, progress=False))
    d, r = prof.dist(48, "q"), ref.dist(48, "q")
    assert d.dtype == torch.float64 and torch.isfinite(d).all()
    assert ((d - r).abs().max() / r.abs().max()).item() < 0.1  # bf16 activations: close, not equal


def test_merge_profiles_equals_profiling_all_samples(tmp_path):
    from profilers.profile_format import merge_profiles

    model = tiny("llama")
    s = samples()
    full = run_profile(model, s, tmp_path / "all", InfluenceArgs(block=16, sink_sizes=(16,), progress=False))
    halves = [run_profile(model, {48: s[48][:2], 80: s[80][:1]}, tmp_path / "a", InfluenceArgs(block=16, sink_sizes=(16,), progress=False)),
              run_profile(model, {48: s[48][2:]}, tmp_path / "b", InfluenceArgs(block=16, sink_sizes=(16,), progress=False))]
    merged = merge_profiles(halves)
    assert merged.meta.lengths == [48, 80] and merged.meta.samples == {48: 3, 80: 1}
    assert torch.allclose(merged.dist(48, "q"), full.dist(48, "q"), rtol=1e-12, atol=0)
    assert torch.allclose(merged.sinkdist(48, "kv"), full.sinkdist(48, "kv"), rtol=1e-12, atol=0)
    assert torch.equal(merged.dist(80, "q"), halves[0].dist(80, "q"))  # only the first half has N = 80
    other = run_profile(model, {48: s[48][:1]}, tmp_path / "c", InfluenceArgs(block=32, progress=False))
    with pytest.raises(CompressError, match="block"):
        merge_profiles([halves[0], other])
