"""RULER-style tasks on the shipped-text BPE tokenizer (offline, fast): where the answer is, the length rule,
seeds, held-out haystacks, scoring, and teacher-forced == greedy on a tiny random Llama."""

from __future__ import annotations

import re
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch

from plans.errors import CompressError
from profilers.data import ruler
from profilers.data.corpora import split_corpus
from profilers.data.ruler import (
    NOISE,
    TASKS,
    Haystack,
    answer_ids,
    item_seed,
    make_item,
    make_items,
    score,
)
from tests.test_synthetic import make_tokenizer

DATA = Path(__file__).parent / "data" / "pride_and_prejudice_ch1-12.txt"
NIAH = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
NEEDLE_RE = re.compile(r"One of the special magic (numbers|words|uuids) for ([a-z]+-[a-z]+) is: ([0-9a-z-]+)\.")
VAR_RE = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="module")
def text():
    return DATA.read_text()


@pytest.fixture(scope="module")
def heldout(text):
    return Haystack.heldout([text])


def _context(tok, item) -> str:
    return tok.decode(item.prompt_ids[slice(*item.context_span)])


def _depth_of(context: str, anchor: str, others: list[str]) -> float:
    """Relative char position of the anchor sentence in the context with every other needle removed."""
    for o in others:
        assert context.count(" " + o) == 1
        context = context.replace(" " + o, "", 1)
    assert context.count(" " + anchor) == 1
    room = len(context) - len(anchor) - 1
    return context.index(" " + anchor) / room if room > 0 else 0.0


# ---------------------------------------------------------------------------------------------- length, framing


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("style", ["plain", "chat"])
@pytest.mark.parametrize("n", [700, 1501])
def test_prompt_length_is_exact_and_ends_with_the_answer_prefix(tok, task, style, n):
    item = make_item(task, tok, n, 0.3, 5, style=style)
    assert len(item.prompt_ids) == item.n_tokens == n
    assert (item.task, item.style, item.depth, item.seed) == (task, style, 0.3, 5)
    text = tok.decode(item.prompt_ids)
    assert text.endswith(item.answer_prefix)
    assert item.question in text
    if style == "chat":
        assert text.startswith("<s><|user|>\n") and "<|end|>\n<|assistant|>\n" + item.answer_prefix in text
    else:
        assert item.prompt_ids[0] == tok.bos_token_id and "<|user|>" not in text
        assert text.endswith(item.question + " " + item.answer_prefix)
    c0, c1 = item.context_span
    assert 0 < c0 < c1 < n
    assert item.answers and all(isinstance(a, str) and a for a in item.answers)


def test_chat_style_needs_a_template():
    with pytest.raises(CompressError, match="chat_template"):
        make_item("niah_single", make_tokenizer(chat=False), 500, 0.5, 0, style="chat")
    with pytest.raises(CompressError, match="style"):
        make_item("niah_single", make_tokenizer(chat=False), 500, 0.5, 0, style="markdown")


def test_too_small_and_bad_arguments(tok):
    for task in TASKS:
        with pytest.raises(CompressError, match="too small"):
            make_item(task, tok, 60, 0.5, 0)
    with pytest.raises(CompressError, match="depth"):
        make_item("niah_single", tok, 600, 1.5, 0)
    with pytest.raises(CompressError, match="3 distractors"):
        make_item("niah_multikey", tok, 600, 0.5, 0, n_distractors=2)
    with pytest.raises(CompressError, match="2 to 4"):
        make_item("niah_multiquery", tok, 600, 0.5, 0, n_queries=1)
    with pytest.raises(CompressError, match="unknown RULER task"):
        make_item("qa", tok, 600, 0.5, 0)


# ---------------------------------------------------------------------------------------------- needles


@pytest.mark.parametrize("task", NIAH)
@pytest.mark.parametrize("depth", [0.0, 0.35, 0.8, 1.0])
@pytest.mark.parametrize("hay", ["noise", "text"])
def test_niah_answer_is_where_it_says(tok, heldout, task, depth, hay):
    item = make_item(task, tok, 1500, depth, 11, haystack=NOISE if hay == "noise" else heldout)
    ctx = _context(tok, item)
    found = NEEDLE_RE.findall(ctx)
    assert len(found) == len(item.needles) == {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4,
                                               "niah_multiquery": 4}[task]
    # the expected answers, computed from the prompt text: the values of every key the question asks about
    asked = re.search(r"for (.*) mentioned in the provided text\?", item.question).group(1)
    keys = [k for k in re.split(r", and |, ", asked)]
    expected = [v for k in keys for _, kk, v in found if kk == k]
    assert item.answers == expected
    for nd in item.needles:  # the recorded spans hold the needle sentences
        assert tok.decode(item.prompt_ids[slice(*nd.span)]) == " " + nd.text
    anchor = item.anchor
    assert anchor is not None and anchor.key == keys[0] and anchor.value in item.answers
    d = _depth_of(ctx, anchor.text, [nd.text for nd in item.needles if nd is not anchor])
    assert abs(d - depth) <= (0.03 if hay == "noise" else 0.06)
    assert abs(item.actual_depth - depth) <= 0.03


def test_multikey_distractors_have_distinct_keys_of_the_same_form(tok):
    for seed in range(5):
        item = make_item("niah_multikey", tok, 1200, 0.5, seed, n_distractors=5)
        found = NEEDLE_RE.findall(_context(tok, item))
        keys = [k for _, k, _ in found]
        values = [v for _, _, v in found]
        assert len(found) == 6 and len(set(keys)) == 6 and len(set(values)) == 6
        assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)
        assert all(re.fullmatch(r"\d{7}", v) for v in values)
        assert not any(a != b and a in b for a in keys + values for b in keys + values)  # no substring confusions
        asked = [k for k in keys if k in item.question]
        assert len(asked) == 1 and item.answers == [values[keys.index(asked[0])]]
        assert sum(nd.role == "distractor" for nd in item.needles) == 5


@pytest.mark.parametrize("kind,pattern", [("number", r"\d{7}"), ("word", r"[a-z]+-[a-z]+"),
                                          ("uuid", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")])
def test_value_kinds(tok, kind, pattern):
    item = make_item("niah_multivalue", tok, 1500, 0.5, 3, value_kind=kind)
    plural = {"number": "numbers", "word": "words", "uuid": "uuids"}[kind]
    assert f"special magic {plural}" in item.question
    assert len(item.answers) == 4 and len(set(item.answers)) == 4
    for v in item.answers:
        assert re.fullmatch(pattern, v)
        assert tok.decode(item.prompt_ids).count(v) == 1
        if kind == "uuid":
            assert str(uuid.UUID(v)) == v


def test_same_seed_same_needles_at_every_depth(tok):
    items = [make_item("niah_multiquery", tok, 1500, d, 9, n_queries=3) for d in (0.0, 0.2, 0.5, 0.7, 1.0)]
    assert all(it.meta["keys"] == items[0].meta["keys"] for it in items)
    assert all(sorted(it.answers) == sorted(items[0].answers) for it in items)
    starts = [it.anchor.span[0] for it in items]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


# ---------------------------------------------------------------------------------------------- variable tracking


def _bound_to(statements: list[tuple[str, str, str]], value: str) -> set[str]:
    bound: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, src, number in statements:
            if name not in bound and (number == value or src in bound):
                bound.add(name)
                changed = True
    return bound


@pytest.mark.parametrize("n_chains,n_hops", [(1, 4), (2, 3), (3, 5)])
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_variable_tracking_answer_is_every_variable_bound_to_the_value(tok, n_chains, n_hops, depth):
    item = make_item("variable_tracking", tok, 1500, depth, 21, n_chains=n_chains, n_hops=n_hops)
    ctx = _context(tok, item)
    statements = VAR_RE.findall(ctx)
    assert len(statements) == n_chains * (n_hops + 1)
    value = re.search(r"assigned the value (\d+) in the text above", item.question).group(1)
    assert f"{n_hops + 1} variables are assigned the value {value}" in item.answer_prefix
    assert set(item.answers) == _bound_to(statements, value) and len(item.answers) == n_hops + 1
    defined: set[str] = set()
    for name, src, _ in statements:  # every chain is in reading order: a variable is assigned before it is used
        assert not src or src in defined
        defined.add(name)
    assert item.answers == [name for name, _, _ in statements if name in item.answers]  # chain order
    first = f"VAR {item.answers[0]} = {value}."
    d = _depth_of(ctx, first, [nd.text for nd in item.needles if nd.text != first])
    assert abs(d - depth) <= 0.03


# ---------------------------------------------------------------------------------------------- word tasks


@pytest.mark.parametrize("n", [700, 3000])
@pytest.mark.parametrize("seed", [0, 1])
def test_common_words_are_the_most_frequent(tok, n, seed):
    item = make_item("common_words", tok, n, 0.5, seed)
    entries = re.findall(r" (\d+)\. ([a-z]+)", _context(tok, item))
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    common = set(item.answers)
    assert len(common) == len(item.answers) == 10
    least_common = min(counts[w] for w in common)
    most_other = max(c for w, c in counts.items() if w not in common)
    assert least_common >= most_other + 2
    if n >= 3000:
        assert least_common >= 3 * most_other
    assert item.meta["n_pad"] < 8  # fewer than one more entry's tokens


@pytest.mark.parametrize("n", [700, 3000])
@pytest.mark.parametrize("seed", [0, 1])
def test_frequent_words_are_the_most_frequent(tok, n, seed):
    item = make_item("frequent_words", tok, n, None, seed)
    counts = Counter(_context(tok, item).split())
    counts.pop("....")
    ranked = counts.most_common()
    assert [w for w, _ in ranked[:3]] == item.answers
    assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
    assert item.meta["n_pad"] < 8


# ---------------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_from_the_seed(tok, task):
    a = make_item(task, tok, 900, 0.5, 123)
    b = make_item(task, tok, 900, 0.5, 123)
    c = make_item(task, tok, 900, 0.5, 124)
    assert a.prompt_ids == b.prompt_ids and a.answers == b.answers
    assert c.prompt_ids != a.prompt_ids and c.answers != a.answers


def test_item_seeds_of_a_grid(tok):
    seeds = {item_seed(t, n, d, s, i) for t in ("niah_single", "common_words") for n in (1024, 2048)
             for d in (0.1, 0.5) for s in (0, 1) for i in range(3)}
    assert len(seeds) == 2 * 2 * 2 * 2 * 3
    assert item_seed("niah_single", 1024, 0.5, 0, 2) == item_seed("niah_single", 1024, 0.5, 0, 2)
    items = make_items("niah_single", tok, 800, 0.5, 3, base_seed=7)
    assert [it.seed for it in items] == [item_seed("niah_single", 800, 0.5, 7, i) for i in range(3)]
    assert len({tuple(it.prompt_ids) for it in items}) == 3
    assert [it.prompt_ids for it in make_items("niah_single", tok, 800, 0.5, 3, base_seed=7)] == \
        [it.prompt_ids for it in items]


# ---------------------------------------------------------------------------------------------- held-out text


def _haystack_segments(tok, item) -> list[str]:
    """The decoded haystack pieces between the needles."""
    c0, c1 = item.context_span
    cuts = [c0] + [p for nd in item.needles for p in nd.span] + [c1]
    return [tok.decode(item.prompt_ids[cuts[i]:cuts[i + 1]]) for i in range(0, len(cuts), 2)]


@pytest.mark.parametrize("by", ["tail", "document"])
def test_heldout_haystack_never_holds_calibration_text(tok, text, by):
    if by == "tail":
        docs = [text]
    else:
        docs = ["Chapter " + c for c in text.split("\n\nChapter ")[1:]]
    split = split_corpus(docs, 0.2, seed=0)  # what calibration uses (CalibrationRecipe.heldout_fraction, seed 0)
    assert split.by == by
    hay = Haystack.heldout(docs)
    assert hay.kind == "text" and hay.text == "\n\n".join(split.heldout)
    calibration = "\n\n".join(split.calibration)
    checked = 0
    for task in NIAH + ("variable_tracking",):
        for seed in range(3):
            item = make_item(task, tok, 1200, 0.5, seed, haystack=hay)
            for seg in _haystack_segments(tok, item):
                for piece in (seg[i:i + 120] for i in range(0, len(seg) - 120, 120)):
                    assert piece in hay.text and piece not in calibration
                    checked += 1
    assert checked > 100


def test_haystack_from_a_corpus_file_is_its_heldout_side(text):
    assert Haystack.from_corpus(str(DATA)) == Haystack.heldout([text], name=str(DATA))
    assert Haystack.from_corpus(DATA) == Haystack.from_corpus(str(DATA))
    assert NOISE.kind == "noise" and "The grass is green." in NOISE.text


# ---------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("task,gen,expected,ok", [
    ("niah_single", " 1234567.", ["1234567"], True),
    ("niah_single", "The number is 1234567 of course", ["1234567"], True),
    ("niah_single", " 123456", ["1234567"], False),
    ("niah_single", "", ["1234567"], False),
    ("niah_single", " Fuzzy-Otter", ["fuzzy-otter"], True),
    ("niah_multikey", " 7654321", ["1234567"], False),
    ("niah_multivalue", " 4, 3, 2 and 1", ["1", "2", "3", "4"], True),
    ("niah_multivalue", " 1111111, 2222222, 3333333", ["1111111", "2222222", "3333333", "4444444"], False),
    ("niah_multiquery", "a: 1111111; b: 2222222", ["2222222", "1111111"], True),
    ("niah_multiquery", "a: 1111111", ["1111111", "2222222"], False),
    ("variable_tracking", " ABCDE, FGHIJ, KLMNO", ["KLMNO", "ABCDE", "FGHIJ"], True),
    ("variable_tracking", " abcde fghij klmno", ["ABCDE", "FGHIJ", "KLMNO"], True),
    ("variable_tracking", " ABCDE, FGHIJ", ["ABCDE", "FGHIJ", "KLMNO"], False),
    ("common_words", " " + ", ".join("abcdefghij"), list("jihgfedcba"), True),
    ("common_words", " " + ", ".join("abcdefghi"), list("abcdefghij"), False),
    ("frequent_words", " qwerty, asdfgh, zxcvbn", ["zxcvbn", "qwerty", "asdfgh"], True),
    ("frequent_words", " qwerty, asdfgh", ["zxcvbn", "qwerty", "asdfgh"], False),
])
def test_score(task, gen, expected, ok):
    assert score(task, gen, expected) is ok


def test_score_rejects_bad_calls():
    with pytest.raises(CompressError, match="unknown"):
        score("passkey", "1", ["1"])
    with pytest.raises(CompressError, match="one value"):
        score("niah_single", "1 2", ["1", "2"])
    assert score("niah_multivalue", "anything", []) is False


def test_scoring_an_item_with_its_own_canonical_answer(tok):
    for task in TASKS:
        item = make_item(task, tok, 900, 0.5, 2)
        assert ruler.score_item(item, item.canonical_answer)
        assert not ruler.score_item(item, item.canonical_answer.replace(item.answers[-1], "", 1))
        ids = answer_ids(item, tok)
        assert tok.decode(ids) == item.canonical_answer
        s = ruler.to_sample(item, tok)
        assert s.length == len(item.prompt_ids) + len(ids)
        assert s.input_ids[s.loss_mask].tolist() == ids and not s.loss_mask[:len(item.prompt_ids)].any()


# ---------------------------------------------------------------------------------------------- teacher forcing


def _leading_matches(pred: list[int], target: list[int]) -> int:
    k = 0
    while k < min(len(pred), len(target)) and pred[k] == target[k]:
        k += 1
    return k


@torch.no_grad()
def _teacher_forced(model, prompt: list[int], answer: list[int]) -> list[int]:
    """The argmax at every answer position given the correct prefix (one forward)."""
    ids = torch.tensor([prompt + answer])
    logits = model(ids, use_cache=False).logits[0]
    return logits[len(prompt) - 1:len(prompt) + len(answer) - 1].argmax(-1).tolist()


def test_teacher_forced_check_equals_greedy_decoding():
    from tests.conftest import tiny_model_with_tokenizer

    model, tok = tiny_model_with_tokenizer("llama", seed=3)
    for task, n, style in [("niah_single", 300, "plain"), ("niah_multivalue", 450, "chat"),
                           ("variable_tracking", 300, "plain"), ("frequent_words", 600, "chat")]:
        item = make_item(task, tok, n, 0.5, 1, style=style)
        answer = answer_ids(item, tok)[:6]  # the equivalence holds for every prefix of the answer: keep it short
        x = torch.tensor([item.prompt_ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=len(answer), do_sample=False,
                                 num_beams=1, min_new_tokens=len(answer))
        greedy = out[0, x.shape[1]:].tolist()
        forced = _teacher_forced(model, item.prompt_ids, answer)
        # leading teacher-forced matches == common prefix of greedy decoding and the answer; all <=> equal
        assert _leading_matches(forced, answer) == _leading_matches(greedy, answer)
        assert (forced == answer) == (greedy == answer)
        # a real positive: teacher-forcing the greedy continuation itself matches at every position ...
        assert _teacher_forced(model, item.prompt_ids, greedy) == greedy
        # ... and breaking token k makes the check fail exactly from k on
        k = len(greedy) // 2
        broken = greedy[:k] + [(greedy[k] + 1) % len(tok)] + greedy[k + 1:]
        assert _leading_matches(_teacher_forced(model, item.prompt_ids, broken), broken) == k


# ---------------------------------------------------------------------------------------------- real tokenizer


@pytest.mark.real_model
def test_default_model_tokenizer_lengths_and_answers():
    from transformers import AutoTokenizer

    from compressor.models import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    for task in TASKS:
        for style in ("plain", "chat"):
            item = make_item(task, tok, 2048, 0.25, 1, style=style)
            assert len(item.prompt_ids) == 2048
            text = tok.decode(item.prompt_ids)
            assert text.endswith(item.answer_prefix) and ("<|im_start|>" in text) == (style == "chat")
            assert tok.decode(answer_ids(item, tok)) == item.canonical_answer
            # the separately tokenized pieces are (about) what the tokenizer makes of the whole text
            assert abs(len(tok(text, add_special_tokens=False)["input_ids"]) - 2048) <= 4
