"""Synthetic retrieval tasks on a tiny BPE tokenizer trained here (offline, fast)."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import torch

from plans.errors import CompressError
from profilers.data import synthetic
from profilers.data.samples import Sample
from profilers.data.synthetic import (
    PASSKEY_ANSWER_PREFIX,
    lines_retrieval,
    passkey,
    score_exact_match,
)

DATA = Path(__file__).parent / "data" / "pride_and_prejudice_ch1-12.txt"

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _trained_backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = DATA.read_text()
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok.to_str()


def make_tokenizer(chat: bool = True):
    """A ByteLevel BPE (600 tokens) trained on the shipped Austen excerpt, with BOS and optionally a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_backend()), bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="module")
def plain_tok():
    return make_tokenizer(chat=False)


@pytest.fixture(scope="module")
def hay():
    return DATA.read_text()


def _decode(tok, ids):
    return tok.decode(ids)


# ---------------------------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("n", [200, 333, 1000, 2048])
@pytest.mark.parametrize("chat", [True, False])
def test_passkey_exact_length_and_spans(tok, hay, n, chat):
    t = passkey(tok, hay, n, 0.4, random.Random(n), use_chat_template=chat)
    assert t.n_tokens == n and len(t.input_ids) == n
    assert t.chat_template is chat
    needle = _decode(tok, t.prompt_ids[slice(*t.needle_span)])
    assert f"The pass key is {t.answer}. Remember it. {t.answer} is the pass key." in needle
    assert _decode(tok, t.prompt_ids[slice(*t.key_span)]).strip() == t.answer
    assert len(t.answer) == 5 and t.answer.isdigit()
    assert _decode(tok, t.prompt_ids).endswith(PASSKEY_ANSWER_PREFIX)
    c0, c1 = t.context_span
    assert c0 <= t.needle_span[0] < t.needle_span[1] <= c1 < len(t.prompt_ids)
    s = t.to_sample()
    assert isinstance(s, Sample) and s.length == n
    assert not bool(s.loss_mask[0])
    assert _decode(tok, s.input_ids[s.loss_mask].tolist()).strip() == t.answer
    assert int(s.loss_mask.sum()) == len(t.answer_ids)
    assert s.loss_mask[-len(t.answer_ids):].all()


def test_passkey_chat_vs_plain_framing(tok, plain_tok, hay):
    chat = passkey(tok, hay, 300, 0.5, 1)
    assert chat.chat_template
    text = _decode(tok, chat.prompt_ids)
    assert text.startswith("<s><|user|>\nThere is an important")
    assert text.endswith("What is the pass key?<|end|>\n<|assistant|>\nThe pass key is")
    plain = passkey(plain_tok, hay, 300, 0.5, 1)  # no chat template: plain text after the tokenizer's BOS
    assert not plain.chat_template
    assert plain.prompt_ids[0] == plain_tok.bos_token_id
    assert _decode(plain_tok, plain.prompt_ids).endswith("What is the pass key? The pass key is")
    assert "<|user|>" not in _decode(plain_tok, plain.prompt_ids)


def test_passkey_depth_is_monotone(tok, hay):
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    tasks = [passkey(tok, hay, 1500, d, 7) for d in depths]
    starts = [t.needle_span[0] for t in tasks]
    assert starts == sorted(starts)
    assert starts[0] == tasks[0].context_span[0]  # depth 0: first thing in the context
    assert tasks[-1].needle_span[1] == tasks[-1].context_span[1]  # depth 1: last thing
    assert starts[3] > starts[1] and starts[5] > starts[3]
    for t in tasks:  # same seed: same haystack and key whatever the depth
        assert t.answer == tasks[0].answer
        assert abs(t.actual_depth - t.depth) < 0.1


def test_passkey_inserted_at_sentence_boundary(tok, hay):
    t = passkey(tok, hay, 1500, 0.5, 3)
    a, b = t.needle_span
    before = _decode(tok, t.prompt_ids[a - 5:a]).rstrip()
    after = _decode(tok, t.prompt_ids[b:b + 5])
    assert before[-1] in '.!?"\'' and after[:1].isspace()


def test_passkey_deterministic(tok, hay):
    a = passkey(tok, hay, 800, 0.3, 11)
    b = passkey(tok, hay, 800, 0.3, random.Random(11))
    c = passkey(tok, hay, 800, 0.3, 12)
    assert a.input_ids == b.input_ids and a.answer == b.answer
    assert c.input_ids != a.input_ids


def test_passkey_errors(tok, hay):
    with pytest.raises(CompressError, match="too small"):
        passkey(tok, hay, 40, 0.5, 0)
    with pytest.raises(CompressError, match="too short"):
        passkey(tok, hay[:2000], 4000, 0.5, 0)
    with pytest.raises(CompressError, match="depth"):
        passkey(tok, hay, 400, 1.5, 0)


def test_passkey_filler_haystack(tok):
    t = passkey(tok, synthetic.PASSKEY_FILLER * 200, 700, 0.5, 0, key="54321")
    assert t.n_tokens == 700 and t.answer == "54321"
    assert "54321" in _decode(tok, t.prompt_ids[slice(*t.needle_span)])


# ---------------------------------------------------------------------------------------------- lines


@pytest.mark.parametrize("n", [400, 777, 1500, 3000])
@pytest.mark.parametrize("chat", [True, False])
def test_lines_exact_length_and_spans(tok, n, chat):
    t = lines_retrieval(tok, n, 0.5, n, use_chat_template=chat)
    assert t.n_tokens == n
    if n >= 777:  # short records may need a few newline tokens (no subset of line lengths fits)
        assert t.meta["n_pad"] == 0
    line_id = t.meta["line_id"]
    key_line = _decode(tok, t.prompt_ids[slice(*t.needle_span)])
    assert key_line == f"line {line_id}: REGISTER_CONTENT is <{t.answer}>\n"
    assert _decode(tok, t.prompt_ids[slice(*t.key_span)]) == t.answer
    text = _decode(tok, t.prompt_ids)
    assert text.count(f"<{t.answer}>") == 1  # numbers are unique
    assert text.count(f"line {line_id}:") == 1  # ids are unique
    assert text.endswith(f"The <REGISTER_CONTENT> in line {line_id} is <")
    s = t.to_sample()
    assert s.length == n and _decode(tok, s.input_ids[s.loss_mask].tolist()) == t.answer


def test_lines_depth_is_monotone(tok):
    tasks = [lines_retrieval(tok, 2000, d, 5) for d in (0.0, 0.2, 0.5, 0.8, 1.0)]
    idx = [t.meta["line_index"] for t in tasks]
    assert idx == sorted(idx) and idx[0] == 0 and idx[-1] == tasks[-1].meta["n_lines"] - 1
    starts = [t.needle_span[0] for t in tasks]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


def test_lines_deterministic(tok):
    assert lines_retrieval(tok, 900, 0.3, 4).input_ids == lines_retrieval(tok, 900, 0.3, 4).input_ids
    assert lines_retrieval(tok, 900, 0.3, 4).input_ids != lines_retrieval(tok, 900, 0.3, 5).input_ids


def test_lines_too_small(tok):
    with pytest.raises(CompressError, match="too small"):
        lines_retrieval(tok, 60, 0.5, 0)


# ---------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("gen,answer,ok", [
    (" 12345", "12345", True),
    ("12345. Remember it.", "12345", True),
    ("  12345\n", "12345", True),
    ("12345>", "12345", True),
    ("<12345>", "12345", True),
    ("123456", "12345", False),
    ("1234", "12345", False),
    ("12354", "12345", False),
    ("The pass key is 12345", "12345", False),
    ("", "12345", False),
    ("Mr.  Darcy  said", "Mr. Darcy", True),
    ("Mr. Darcyson", "Mr. Darcy", False),
])
def test_score_exact_match(gen, answer, ok):
    assert score_exact_match(gen, answer) is ok


def test_sample_labels(tok, hay):
    s = passkey(tok, hay, 300, 0.5, 0).to_sample()
    labels = s.labels()
    assert (labels != -100).sum() == s.loss_mask.sum()
    assert torch.equal(labels[s.loss_mask], s.input_ids[s.loss_mask])
