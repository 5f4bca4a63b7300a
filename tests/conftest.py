"""Tiny random models built from configs (no hub), saved as real HF folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from transformers import (  # noqa: E402
    GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

VOCAB = 97


def tiny_config(arch: str, **over):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=4096, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    elif arch == "mistral":
        cfg = MistralConfig(num_attention_heads=4, num_key_value_heads=1, sliding_window=24, **common)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(num_attention_heads=4, **common)
    else:
        raise ValueError(arch)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM,
            "gpt_neox": GPTNeoXForCausalLM}


def tiny_model(arch: str = "llama", seed: int = 0, **over):
    torch.manual_seed(seed)
    m = _CLASSES[arch](tiny_config(arch, **over)).eval()
    m.set_attn_implementation("sdpa")
    return m


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def tiny_model_with_tokenizer(arch: str = "llama", seed: int = 0, **over):
    """A tiny random model whose vocabulary matches the shipped-text BPE tokenizer (with a chat template)."""
    from tests.test_synthetic import make_tokenizer

    tok = make_tokenizer(chat=True)
    over.setdefault("vocab_size", len(tok))
    m = tiny_model(arch, seed=seed, **over)
    m.config.pad_token_id = tok.pad_token_id
    m.generation_config.pad_token_id = tok.pad_token_id
    return m, tok


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Llama folder with a tokenizer: the `from_pretrained` path end to end."""
    m, tok = tiny_model_with_tokenizer("llama", max_position_embeddings=8192)
    d = tmp_path / "tiny-llama-tok"
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def pg_server():
    """A throw-away PostgreSQL server on loopback for the session (tests/pg_server.py); skipped where none can
    run, unless COMPRESS_REQUIRE_POSTGRES=1 (CI), where that is a failure."""
    from tests import pg_server as pg

    why = pg.unavailable()
    if why:
        if os.environ.get("COMPRESS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"COMPRESS_REQUIRE_POSTGRES=1 but {why}")
        pytest.skip(why)
    server = pg.start()
    try:
        yield server
    finally:
        server.stop()
