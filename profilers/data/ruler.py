"""RULER-style synthetic long-context tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), generated offline from a seed.

Tasks (``TASKS``; one ``make_<task>`` function each, all returning an :class:`EvalItem`):

- ``niah_single``: one needle "One of the special magic numbers for <key> is: <value>." at ``depth``.
- ``niah_multikey``: the same, among ``n_distractors`` (>= 3) needles of the same form with other keys.
- ``niah_multivalue``: one key with ``n_values`` (4) needles; every value must be returned.
- ``niah_multiquery``: ``n_queries`` (2-4) keys asked at once; every value must be returned.
- ``variable_tracking``: chains ``VAR ABCDE = 48213.``, ``VAR FGHIJ = VAR ABCDE.``, ... in the haystack; the answer
  is every variable bound to the value (the queried chain; ``n_chains - 1`` distractor chains hold other values).
- ``common_words`` (RULER's CWE): a numbered list of words in which ``n_common`` words occur ``common_repeats``
  times and the others ``uncommon_repeats`` times (or fewer); the answer is the ``n_common`` common words.
- ``frequent_words`` (RULER's FWE): coded words drawn from a Zipf(``alpha``) distribution, the top one being
  ``....`` (noise the question says to ignore); the answer is the next ``n_top`` (3) most frequent words.

Keys are ``adjective-noun`` words; ``value_kind`` picks values: ``"number"`` (7 digits), ``"word"``
(``adjective-noun``) or ``"uuid"``. No key or value is a substring of another key or value of the same item.

**Prompt-length rule.** ``len(item.prompt_ids) == n_tokens`` exactly, for every task and style. The prompt is
everything the model reads before answering (template, instruction, context, question and the answer prefix);
the answer is *not* part of it (as in RULER, where the context length counts the input). A teacher-forced
sequence (:func:`to_sample`) is therefore ``n_tokens + len(answer_ids(item, tokenizer))`` tokens long. The
pieces are tokenized separately and concatenated (as in :mod:`profilers.data.synthetic`), so the count is exact by
construction: the needle tasks size the haystack window to the remaining budget; the words tasks fill the list
until no further entry fits and pad the rest (fewer tokens than one more entry, ``meta["n_pad"]``) with
single-token newlines after the list.

**Depth.** The needle tasks splice their needles in at sentence boundaries of the haystack. ``depth`` (0..1) is
where the *anchor* needle goes: the queried needle (``niah_single`` / ``niah_multikey``), the first value of the
first queried key (``niah_multivalue`` / ``niah_multiquery``), the first assignment of the queried chain
(``variable_tracking``; the rest of that chain follows it at seeded random positions between ``depth`` and the
end). Every other needle goes to a seeded random position. ``depth`` is measured on the haystack alone, without
the needles: ``at / len(haystack)``, snapped to the nearest boundary (:attr:`EvalItem.actual_depth`). The words
tasks have no depth: it is recorded as given and changes nothing but the item seed of :func:`item_seed`.

**Haystacks.** :data:`NOISE` is RULER's repetitive "The grass is green. The sky is blue. ..."; real text comes
only from the *held-out* side of :func:`profilers.data.corpora.split_corpus` (:meth:`Haystack.from_corpus` /
:meth:`Haystack.heldout`, the same split arguments calibration uses), so no evaluation item contains
calibration text.

**Seeds.** Everything is drawn from ``random.Random(seed)``: the content (keys, values, words, the haystack
window) first, then positions, so one seed at several depths gives the same needles in the same haystack.
Item ``i`` of a grid cell ``(task, n_tokens, depth, base_seed)`` uses :func:`item_seed` (a hash of all five).

**Styles.** ``"plain"``: plain-text completion (the tokenizer's BOS, the instruction, the context, the question,
then the answer prefix); ``"chat"``: one user turn through the tokenizer's chat template, the assistant turn
prefilled with the answer prefix (:func:`profilers.data.synthetic.build_frame`). The caller picks per model.

**Scoring.** :func:`score` is RULER's ``string_match_all``: correct iff every expected string occurs in the
generated text (case-insensitive). For the single-value tasks (``niah_single``, ``niah_multikey``) that is "the
value appears"; for the others all values / variables / words must appear, in any order.

**Teacher-forced exact match.** :func:`answer_ids` gives the token ids of the canonical answer (" " + the
expected strings joined by ", ", in :attr:`EvalItem.answers` order). Feed ``prompt_ids + answer_ids`` once and
compare, for every answer token j, the argmax of the logits at position ``len(prompt_ids) + j - 1`` with
``answer_ids[j]``. All equal ⇔ greedy decoding of ``len(answer_ids)`` tokens from the prompt yields exactly
``answer_ids``: greedy step k is the argmax given the prompt and greedy tokens 0..k-1, which (by induction, while
they match) are the answer's own first k tokens, i.e. exactly the teacher-forced input at that position. More generally the number of leading positions that match is
the length of the common prefix of the greedy tokens and the answer. This is token-level (the same text reached
through a different tokenization counts as a miss) and holds up to floating-point differences between one full
forward and cached decoding at near-ties. It is stricter than :func:`score`: it implies the string match of
a ``len(answer_ids)``-token generation, not conversely (another order or extra words fail it).
"""

from __future__ import annotations

import hashlib
import os
import random
import string
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.special import zeta

from plans.errors import CompressError
from profilers.data import corpora
from profilers.data.samples import Sample
from profilers.data.synthetic import (
    ADJECTIVES,
    NOUNS,
    PASSKEY_FILLER,
    check_depth,
    check_room,
    filler_token,
    build_frame,
    encode,
    nearest,
    text_window,
)

STYLES = ("plain", "chat")
VALUE_KINDS = ("number", "word", "uuid")
_PLURAL = {"number": "numbers", "word": "words", "uuid": "uuids"}

NIAH_INSTRUCTION = ("Some special magic {plural} are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the {plural} afterwards.\n")
NIAH_NEEDLE = "One of the special magic {plural} for {key} is: {value}."
NIAH_QUESTION = "What are all the special magic {plural} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic {plural} for {query} mentioned in the provided text are:"

VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
                    "are assigned the value {value}, they are:")

CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.\n")
CWE_QUESTION = "What are the {k} most common words in the above list?"
CWE_ANSWER_PREFIX = "Answer: The top {k} words that appear most often in the list are:"

FWE_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. "
                   "Find the {k} most frequently appeared coded words.")
FWE_QUESTION = ("Do not provide any explanation. Please ignore the dots '....'. "
                "What are the {k} most frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = "Answer: According to the coded text above, the {k} most frequently appeared words are:"
FWE_NOISE_WORD = "...."

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _count_word(k: int) -> str:
    return _NUMBER_WORDS[k] if 0 <= k < len(_NUMBER_WORDS) else str(k)


# ----------------------------------------------------------------------------------------------------------
# types


@dataclass(frozen=True)
class Haystack:
    """What the needles are hidden in: ``kind="noise"`` (RULER's repeated filler sentences) or ``kind="text"``
    (held-out real text). Build real-text haystacks with :meth:`from_corpus` / :meth:`heldout` only: they keep
    the held-out side of the calibration split."""

    kind: str
    text: str
    name: str

    @classmethod
    def noise(cls) -> Haystack:
        return cls("noise", PASSKEY_FILLER, "noise")

    @classmethod
    def heldout(cls, docs: Sequence[str], heldout_fraction: float = 0.2, by: str = "auto", split_seed: int = 0,
                name: str = "text") -> Haystack:
        """The held-out documents of ``split_corpus(docs, heldout_fraction, by, split_seed)``, joined by blank
        lines. The defaults are the ones calibration uses (:class:`profilers.data.calibration.CalibrationRecipe`)."""
        split = corpora.split_corpus(list(docs), heldout_fraction, by, split_seed)
        return cls("text", "\n\n".join(split.heldout), f"heldout:{name}")

    @classmethod
    def calibration_side(cls, corpus, heldout_fraction: float = 0.2, data_dir=None, fetch: bool = True) -> Haystack:
        """The held-in (calibration) side of a corpus: for scoring heads on needles, never for evaluation."""
        name = str(corpus) if isinstance(corpus, (str, os.PathLike)) else ",".join(map(str, corpus))
        split = corpora.split_corpus(list(corpora.load_corpus(corpus, data_dir, fetch)), heldout_fraction, "auto", 0)
        return cls("text", "\n\n".join(split.calibration), f"heldin:{name}")

    @classmethod
    def from_corpus(cls, corpus, heldout_fraction: float = 0.2, data_dir=None, fetch: bool = True) -> Haystack:
        """The held-out side of a corpus name (``"austen"``, ``"wikipedia"``) or file path(s)."""
        name = str(corpus) if isinstance(corpus, (str, os.PathLike)) else ",".join(map(str, corpus))
        return cls.heldout(corpora.load_corpus(corpus, data_dir, fetch), heldout_fraction, name=name)

    def source_text(self, tokenizer, n_tokens: int) -> str:
        """Text with at least ``n_tokens`` tokens to cut a window from (the filler repeated, for noise)."""
        if self.kind == "noise":  # tokens one more repeat adds in running text (merges across repeats included)
            per = max(1, len(encode(tokenizer, self.text * 2)) - len(encode(tokenizer, self.text)))
            return (self.text * (int(1.1 * n_tokens / per) + 3)).rstrip()
        if self.kind != "text":
            raise CompressError(f"unknown haystack kind {self.kind!r}: 'noise' or 'text'")
        return self.text


NOISE = Haystack.noise()


@dataclass(frozen=True)
class Needle:
    """A piece spliced into the haystack: its text, [start, end) token span in ``prompt_ids``, role (``"anchor"``:
    the asked-about needle placed at ``depth``; ``"target"``: other asked-about needles; ``"distractor"``), and
    its key / value (for variable tracking: the variable and what it is assigned, a number or ``VAR NAME``)."""

    text: str
    span: tuple[int, int]
    role: str
    key: str = ""
    value: str = ""


@dataclass(frozen=True)
class EvalItem:
    """One evaluation prompt. ``prompt_ids`` has exactly ``n_tokens`` tokens and ends with ``answer_prefix``;
    ``answers`` are the expected strings (all must appear, see :func:`score`), in canonical order
    (:func:`answer_ids`). ``context_span`` is the [start, end) token span of the context (haystack + needles,
    or the word list)."""

    task: str
    prompt_ids: list[int]
    question: str
    answers: list[str]
    n_tokens: int
    depth: float | None
    seed: int
    style: str
    answer_prefix: str
    context_span: tuple[int, int]
    needles: list[Needle] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def canonical_answer(self) -> str:
        return " " + ", ".join(self.answers)

    @property
    def anchor(self) -> Needle | None:
        return next((nd for nd in self.needles if nd.role == "anchor"), None)

    @property
    def actual_depth(self) -> float | None:
        """Where the anchor needle landed in the haystack without the needles (0 = start, 1 = end)."""
        a = self.anchor
        if a is None:
            return None
        c0, c1 = self.context_span
        hay = (c1 - c0) - sum(nd.span[1] - nd.span[0] for nd in self.needles)
        before = a.span[0] - c0 - sum(nd.span[1] - nd.span[0] for nd in self.needles if nd.span[0] < a.span[0])
        return before / hay if hay > 0 else 0.0


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def item_seed(task: str, n_tokens: int, depth: float | None, base_seed: int, index: int) -> int:
    """The seed of item ``index`` of the cell (task, n_tokens, depth, base_seed): a 63-bit hash of all five."""
    d = None if depth is None else float(depth)
    key = f"ruler\0{task}\0{int(n_tokens)}\0{d!r}\0{int(base_seed)}\0{int(index)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def _check_style(style: str) -> bool:
    if style not in STYLES:
        raise CompressError(f"style must be one of {STYLES}, got {style!r}")
    return style == "chat"


def _unique(rng: random.Random, draw: Callable[[], str], taken: list[str]) -> str:
    """A fresh string that is not a substring of (and does not contain) any string in ``taken``."""
    for _ in range(10000):
        s = draw()
        if not any(s in t or t in s for t in taken):
            taken.append(s)
            return s
    raise CompressError("could not draw enough distinct keys / values")


def _draw_value(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "word":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass
class _Piece:
    text: str
    role: str
    frac: float
    key: str = ""
    value: str = ""


@dataclass
class _Frame:
    task: str
    n_tokens: int
    depth: float | None
    seed: int
    question: str
    answer_prefix: str
    head: list[int]
    tail: list[int]
    style: str


@dataclass(frozen=True)
class _FrameText:
    """The fixed text around an item's context: ``before`` (the instruction, ahead of the context), ``question``
    (as recorded in the item), ``after`` (the text after the context, usually the question) and ``prefix`` (the
    answer prefix the prompt ends with)."""

    before: str
    question: str
    after: str
    prefix: str


def _frame(tokenizer, task, n_tokens, depth, seed, style, text: _FrameText) -> _Frame:
    head, tail, chat = build_frame(tokenizer, text.before, text.after, text.prefix, _check_style(style))
    return _Frame(task, int(n_tokens), depth, int(seed), text.question, text.prefix, head, tail,
                  "chat" if chat else "plain")


def _splice(tokenizer, fr: _Frame, pieces: list[_Piece], haystack: Haystack, rng: random.Random
            ) -> tuple[list[int], tuple[int, int], list[Needle]]:
    """Prompt ids of exactly ``fr.n_tokens``: head + haystack window with the pieces spliced in at the sentence
    boundaries nearest to ``frac * len(window)`` (list order at equal positions) + tail."""
    ids = [encode(tokenizer, " " + p.text) for p in pieces]
    fixed = len(fr.head) + len(fr.tail) + sum(map(len, ids))
    check_room(fr.n_tokens, fixed, fr.task)
    n_hay = fr.n_tokens - fixed
    hay, bounds = text_window(tokenizer, haystack.source_text(tokenizer, n_hay), n_hay, rng,
                              what=f"the {haystack.name} haystack")
    at = [nearest(bounds, p.frac * len(hay)) for p in pieces]
    order = sorted(range(len(pieces)), key=lambda j: (at[j], j))
    prompt, needles, pos = list(fr.head), [None] * len(pieces), 0
    for j in order:
        prompt += hay[pos:at[j]]
        pos = at[j]
        p = pieces[j]
        needles[j] = Needle(p.text, (len(prompt), len(prompt) + len(ids[j])), p.role, p.key, p.value)
        prompt += ids[j]
    prompt += hay[pos:]
    context = (len(fr.head), len(prompt))
    prompt += fr.tail
    return prompt, context, sorted(needles, key=lambda nd: nd.span)


def _item(fr: _Frame, prompt: list[int], context: tuple[int, int], answers: list[str], needles: list[Needle],
          meta: dict) -> EvalItem:
    if len(prompt) != fr.n_tokens:  # the construction guarantees it; a tokenizer surprise must not pass silently
        raise CompressError(f"{fr.task}: built {len(prompt)} prompt tokens instead of {fr.n_tokens}")
    return EvalItem(task=fr.task, prompt_ids=prompt, question=fr.question, answers=answers, n_tokens=fr.n_tokens,
                    depth=fr.depth, seed=fr.seed, style=fr.style, answer_prefix=fr.answer_prefix,
                    context_span=context, needles=needles, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# needle in a haystack


@dataclass(frozen=True)
class _NiahShape:
    """One needle-in-a-haystack variant: the ``task`` name, ``n_keys`` keys (the queried ones first) with
    ``n_values`` values each, and the first ``n_queries`` keys asked."""

    task: str
    n_keys: int
    n_values: int
    n_queries: int


def _niah(tokenizer, n_tokens, depth, seed, haystack, style, value_kind, shape: _NiahShape) -> EvalItem:
    task, n_keys, n_values, n_queries = shape.task, shape.n_keys, shape.n_values, shape.n_queries
    depth = check_depth(depth)
    if value_kind not in VALUE_KINDS:
        raise CompressError(f"value_kind must be one of {VALUE_KINDS}, got {value_kind!r}")
    rng = random.Random(seed)
    taken: list[str] = []
    keys = [_unique(rng, lambda: f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}", taken) for _ in range(n_keys)]
    values = [[_unique(rng, lambda: _draw_value(rng, value_kind), taken) for _ in range(n_values)] for _ in keys]
    plural = _PLURAL[value_kind]
    pieces = []
    for i, key in enumerate(keys):
        for j, value in enumerate(values[i]):
            role = "anchor" if i == j == 0 else ("target" if i < n_queries else "distractor")
            frac = depth if role == "anchor" else rng.random()
            pieces.append(_Piece(NIAH_NEEDLE.format(plural=plural, key=key, value=value), role, frac, key, value))
    queries = keys[:n_queries]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    question = NIAH_QUESTION.format(plural=plural, query=query)
    fr = _frame(tokenizer, task, n_tokens, depth, seed, style, _FrameText(
        NIAH_INSTRUCTION.format(plural=plural), question, "\n" + question,
        NIAH_ANSWER_PREFIX.format(plural=plural, query=query)))
    prompt, context, needles = _splice(tokenizer, fr, pieces, haystack, rng)
    # canonical order: the keys as asked; one key's values in the order they appear in the prompt
    answers = [nd.value for key in queries for nd in needles if nd.key == key]
    meta = {"haystack": haystack.name, "value_kind": value_kind, "keys": keys, "queries": queries}
    return _item(fr, prompt, context, answers, needles, meta)


def make_niah_single(tokenizer, n_tokens: int, depth: float, seed: int, *, haystack: Haystack = NOISE,
                     style: str = "plain", value_kind: str = "number") -> EvalItem:
    """One key-value needle at ``depth``; answer: its value."""
    return _niah(tokenizer, n_tokens, depth, seed, haystack, style, value_kind, _NiahShape("niah_single", n_keys=1,
                 n_values=1, n_queries=1))


def make_niah_multikey(tokenizer, n_tokens: int, depth: float, seed: int, *, haystack: Haystack = NOISE,
                       style: str = "plain", value_kind: str = "number", n_distractors: int = 3) -> EvalItem:
    """The queried needle at ``depth`` among ``n_distractors`` (>= 3) needles with other keys; answer: its value."""
    if n_distractors < 3:
        raise CompressError(f"niah_multikey needs at least 3 distractors, got {n_distractors}")
    return _niah(tokenizer, n_tokens, depth, seed, haystack, style, value_kind, _NiahShape("niah_multikey",
                 n_keys=1 + n_distractors, n_values=1, n_queries=1))


def make_niah_multivalue(tokenizer, n_tokens: int, depth: float, seed: int, *, haystack: Haystack = NOISE,
                         style: str = "plain", value_kind: str = "number", n_values: int = 4) -> EvalItem:
    """One key with ``n_values`` needles (the first at ``depth``); answer: all its values."""
    if n_values < 2:
        raise CompressError(f"niah_multivalue needs at least 2 values, got {n_values}")
    return _niah(tokenizer, n_tokens, depth, seed, haystack, style, value_kind, _NiahShape("niah_multivalue", n_keys=1,
                 n_values=n_values, n_queries=1))


def make_niah_multiquery(tokenizer, n_tokens: int, depth: float, seed: int, *, haystack: Haystack = NOISE,
                         style: str = "plain", value_kind: str = "number", n_queries: int = 4) -> EvalItem:
    """``n_queries`` (2-4) keys asked at once (the first one's needle at ``depth``); answer: all their values."""
    if not 2 <= n_queries <= 4:
        raise CompressError(f"niah_multiquery asks 2 to 4 keys, got {n_queries}")
    return _niah(tokenizer, n_tokens, depth, seed, haystack, style, value_kind, _NiahShape("niah_multiquery",
                 n_keys=n_queries, n_values=1, n_queries=n_queries))


# ----------------------------------------------------------------------------------------------------------
# variable tracking


def make_variable_tracking(tokenizer, n_tokens: int, depth: float, seed: int, *, haystack: Haystack = NOISE,
                           style: str = "plain", n_chains: int = 1, n_hops: int = 4) -> EvalItem:
    """``n_chains`` chains ``VAR X0 = <5 digits>.``, ``VAR X1 = VAR X0.``, ... ``VAR Xh = VAR Xh-1.`` (each in
    reading order, distinct values); the queried chain starts at ``depth``. Answer: its ``n_hops + 1`` variables,
    in chain order. Variable names are 5 distinct upper-case letters."""
    depth = check_depth(depth)
    if n_chains < 1 or n_hops < 1:
        raise CompressError(f"variable_tracking needs n_chains >= 1 and n_hops >= 1, got {n_chains}, {n_hops}")
    rng = random.Random(seed)
    taken: list[str] = []
    chains = [[_unique(rng, lambda: "".join(rng.choices(string.ascii_uppercase, k=5)), taken)
               for _ in range(n_hops + 1)] for _ in range(n_chains)]
    values = [_unique(rng, lambda: str(rng.randint(10000, 99999)), taken) for _ in range(n_chains)]
    pieces = []
    for c, (names, value) in enumerate(zip(chains, values)):
        u = sorted(rng.random() for _ in range(n_hops + 1))
        fracs = [depth] + [depth + x * (1.0 - depth) for x in u[1:]] if c == 0 else u
        for h, name in enumerate(names):
            rhs = value if h == 0 else f"VAR {names[h - 1]}"
            role = "distractor" if c else ("anchor" if h == 0 else "target")
            pieces.append(_Piece(f"VAR {name} = {rhs}.", role, fracs[h], name, rhs))
    question = VT_QUESTION.format(value=values[0])
    fr = _frame(tokenizer, "variable_tracking", n_tokens, depth, seed, style, _FrameText(
        VT_INSTRUCTION, question, "\nQuestion: " + question,
        VT_ANSWER_PREFIX.format(count=n_hops + 1, value=values[0])))
    prompt, context, needles = _splice(tokenizer, fr, pieces, haystack, rng)
    meta = {"haystack": haystack.name, "value": values[0], "n_chains": n_chains, "n_hops": n_hops}
    return _item(fr, prompt, context, list(chains[0]), needles, meta)


# ----------------------------------------------------------------------------------------------------------
# word-frequency tasks


class _Pieces:
    """Token ids of separately tokenized pieces, batched and cached (the list is their concatenation)."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def ids(self, texts: Sequence[str]) -> list[list[int]]:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            for t, ids in zip(new, self.tok(new, add_special_tokens=False)["input_ids"]):
                self.cache[t] = list(ids)
        return [self.cache[t] for t in texts]

    def lens(self, texts: Sequence[str]) -> list[int]:
        return [len(i) for i in self.ids(texts)]


def _word_pool() -> list[str]:
    """Distinct simple words, none a substring of another (so string matching cannot confuse them)."""
    pool = sorted(set(ADJECTIVES) | set(NOUNS))
    return [w for w in pool if not any(w != v and w in v for v in pool)]


def _cwe_fill(pieces: _Pieces, budget: int, common: list[str], uncommon: list[str], rc: int, ru: int
              ) -> tuple[Counter, int, int]:
    """Counts (common words ``rc`` times, then uncommon words round-robin up to ``ru`` times, one entry at a
    time while an entry fits), the number of entries, and the tokens left over (negative: overflow)."""
    wc = dict(zip(common + uncommon, pieces.lens([" " + w for w in common + uncommon])))
    counts: Counter = Counter({w: rc for w in common})
    n_entries = rc * len(common)
    left = budget - rc * sum(wc[w] for w in common) - sum(pieces.lens([f" {i}." for i in range(1, n_entries + 1)]))
    if left < 0:
        return counts, n_entries, left
    for _ in range(ru):
        for w in uncommon:
            c = wc[w] + pieces.lens([f" {n_entries + 1}."])[0]
            if c <= left:
                left -= c
                n_entries += 1
                counts[w] += 1
    return counts, n_entries, left


def make_common_words(tokenizer, n_tokens: int, depth: float | None, seed: int, *, style: str = "plain",
                      n_common: int = 10, common_repeats: int = 30, uncommon_repeats: int = 3) -> EvalItem:
    """RULER's common-words extraction: a numbered list " 1. word 2. word ..." where ``n_common`` words occur
    ``common_repeats`` times each and every other word at most ``uncommon_repeats`` times. Long prompts scale
    both repeat counts up by the same factor (the word pool is finite); short ones lower ``common_repeats``
    (to at least ``uncommon_repeats + 2``) so the common words take at most about half the list. Answer: the
    common words, in order of first appearance. ``depth`` has no meaning here (recorded as given)."""
    depth = None if depth is None else check_depth(depth)
    rng = random.Random(seed)
    pool = _word_pool()
    rng.shuffle(pool)
    common, uncommon = pool[:n_common], pool[n_common:]
    question = CWE_QUESTION.format(k=n_common)
    fr = _frame(tokenizer, "common_words", n_tokens, depth, seed, style, _FrameText(
        CWE_INSTRUCTION, question, "\nQuestion: " + question, CWE_ANSWER_PREFIX.format(k=n_common)))
    check_room(fr.n_tokens, len(fr.head) + len(fr.tail) + 1, fr.task)
    budget = fr.n_tokens - len(fr.head) - len(fr.tail)
    pieces = _Pieces(tokenizer)
    per_entry = float(np.mean(pieces.lens([" " + w for w in pool]))) + pieces.lens([" 100."])[0]
    capacity = budget / per_entry  # about how many entries fit
    scale = max(1, int(np.ceil(capacity / (n_common * common_repeats + len(uncommon) * uncommon_repeats))))
    rc, ru = common_repeats * scale, uncommon_repeats * scale
    rc = max(ru + 2, min(rc, int(capacity / (2 * n_common))))
    while True:
        counts, n_entries, left = _cwe_fill(pieces, budget, common, uncommon, rc, ru)
        if left < 0:
            raise CompressError(f"n_tokens={n_tokens} is too small for the common_words task: {n_common} words "
                                f"x {rc} repeats do not fit in {budget} tokens")
        if any(counts[w] < ru for w in uncommon):
            break
        rc, ru = rc + common_repeats, ru + uncommon_repeats  # every word used up: repeat them all more
    words = [w for w, c in counts.items() for _ in range(c)]
    rng.shuffle(words)
    texts = [t for i, w in enumerate(words) for t in (f" {i + 1}.", " " + w)]
    return _words_item(tokenizer, fr, pieces, texts, left, [w for w in dict.fromkeys(words) if w in common],
                       {"common_repeats": rc, "uncommon_repeats": ru, "n_entries": n_entries})


def _words_item(tokenizer, fr: _Frame, pieces: _Pieces, texts: list[str], left: int, answers: list[str],
                meta: dict) -> EvalItem:
    body = [i for ids in pieces.ids(texts) for i in ids]
    prompt = fr.head + body + filler_token(tokenizer) * left + fr.tail
    context = (len(fr.head), len(fr.head) + len(body))
    return _item(fr, prompt, context, answers, [], {**meta, "n_pad": left})


def _coded_vocab(rng: random.Random, size: int, word_len: int) -> list[str]:
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=word_len)))
    out = sorted(vocab)
    rng.shuffle(out)
    out[0] = FWE_NOISE_WORD  # the most frequent "word" is noise, as in RULER
    return out


@dataclass(frozen=True)
class CodedVocab:
    """The coded-word vocabulary of :func:`make_frequent_words`: ``vocab_size`` words of ``word_len`` random
    lower-case letters, the word of rank k occurring in proportion to ``k^-alpha`` (Zipf exponent)."""

    alpha: float = 2.0
    vocab_size: int = 2000
    word_len: int = 6


def make_frequent_words(tokenizer, n_tokens: int, depth: float | None, seed: int, *, style: str = "plain",
                        n_top: int = 3, coded: CodedVocab = CodedVocab()) -> EvalItem:
    """RULER's frequent-words extraction: coded words (``coded.word_len`` random letters) where the word of rank k
    occurs ``floor(W * k^-alpha / zeta(alpha))`` times (W as large as fits), rank 1 being ``....``; unused words
    fill the rest once each. Answer: ranks 2 .. n_top + 1, most frequent first. ``depth`` has no meaning here."""
    alpha, vocab_size, word_len = coded.alpha, coded.vocab_size, coded.word_len
    depth = None if depth is None else check_depth(depth)
    if n_top < 1 or vocab_size < n_top + 3:
        raise CompressError(f"frequent_words needs n_top >= 1 and vocab_size >= n_top + 3, got {n_top}, {vocab_size}")
    rng = random.Random(seed)
    vocab = _coded_vocab(rng, vocab_size, word_len)
    k = _count_word(n_top)
    question = FWE_QUESTION.format(k=k)
    fr = _frame(tokenizer, "frequent_words", n_tokens, depth, seed, style, _FrameText(
        FWE_INSTRUCTION.format(k=k), question, "\nQuestion: " + question, FWE_ANSWER_PREFIX.format(k=k)))
    check_room(fr.n_tokens, len(fr.head) + len(fr.tail) + 1, fr.task)
    budget = fr.n_tokens - len(fr.head) - len(fr.tail)
    pieces = _Pieces(tokenizer)
    wc = np.array(pieces.lens([" " + w for w in vocab]), dtype=np.int64)
    share = np.arange(1, len(vocab) + 1, dtype=np.float64) ** -alpha / float(zeta(alpha))

    def counts_for(w: int) -> np.ndarray:
        return np.floor(w * share).astype(np.int64)

    lo, hi = 0, int((budget + 1) / share[0]) + 2  # hi: the noise word alone overflows the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int(counts_for(mid) @ wc) <= budget else (lo, mid - 1)
    counts = counts_for(lo)
    left = budget - int(counts @ wc)
    for r in np.flatnonzero(counts == 0):  # fill the rest with words used once
        if wc[r] <= left:
            counts[r], left = 1, left - int(wc[r])
    top = counts[1:n_top + 2]
    if len(top) < n_top + 1 or not all(top[i] > top[i + 1] for i in range(n_top)) or top[n_top - 1] <= 1:
        raise CompressError(f"n_tokens={n_tokens} is too small for the frequent_words task: the top {n_top} words "
                            f"are not strictly more frequent than the rest (counts {counts[:n_top + 2].tolist()})")
    words = [vocab[r] for r in np.flatnonzero(counts) for _ in range(int(counts[r]))]
    rng.shuffle(words)
    return _words_item(tokenizer, fr, pieces, [" " + w for w in words], left, vocab[1:n_top + 1],
                       {"W": lo, "alpha": alpha, "top_counts": counts[1:n_top + 1].tolist()})


# ----------------------------------------------------------------------------------------------------------
# registry, seeds, scoring, teacher forcing


TASKS: dict[str, Callable[..., EvalItem]] = {
    "niah_single": make_niah_single,
    "niah_multikey": make_niah_multikey,
    "niah_multivalue": make_niah_multivalue,
    "niah_multiquery": make_niah_multiquery,
    "variable_tracking": make_variable_tracking,
    "common_words": make_common_words,
    "frequent_words": make_frequent_words,
}
SINGLE_VALUE_TASKS = frozenset({"niah_single", "niah_multikey"})


def make_item(task: str, tokenizer, n_tokens: int, depth: float | None, seed: int, **options) -> EvalItem:
    """``TASKS[task](tokenizer, n_tokens, depth, seed, **options)``."""
    if task not in TASKS:
        raise CompressError(f"unknown RULER task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task](tokenizer, n_tokens, depth, seed, **options)


def haystack_options(task: str, haystack) -> dict:
    """``{"haystack": haystack}`` for the tasks that hide their needles in one (``niah_*``, ``variable_tracking``),
    ``{}`` for the word tasks, which build their own list: the keyword arguments :func:`make_item` takes."""
    return {"haystack": haystack} if task.startswith(("niah", "variable")) else {}


def make_items(task: str, tokenizer, n_tokens: int, depth: float | None, n_items: int, base_seed: int = 0,
               **options) -> list[EvalItem]:
    """The ``n_items`` items of one grid cell; item i uses ``item_seed(task, n_tokens, depth, base_seed, i)``."""
    return [make_item(task, tokenizer, n_tokens, depth, item_seed(task, n_tokens, depth, base_seed, i), **options)
            for i in range(n_items)]


def score(task: str, generated_text: str, expected: Sequence[str]) -> bool:
    """RULER's string match: True iff every expected string occurs in ``generated_text`` (case-insensitive).
    Single-value tasks: the value appears; the others: all values / variables / words appear, in any order."""
    if task not in TASKS:
        raise CompressError(f"unknown RULER task {task!r}; choose one of {', '.join(TASKS)}")
    if task in SINGLE_VALUE_TASKS and len(expected) != 1:
        raise CompressError(f"{task} expects one value, got {len(expected)}")
    text = generated_text.lower()
    return bool(expected) and all(e.lower() in text for e in expected)


def score_item(item: EvalItem, generated_text: str) -> bool:
    return score(item.task, generated_text, item.answers)


def answer_ids(item: EvalItem, tokenizer) -> list[int]:
    """Token ids of the canonical answer (``item.canonical_answer``) that follow ``item.prompt_ids``; see the
    module docstring for the teacher-forced check and why it equals greedy exact match."""
    return encode(tokenizer, item.canonical_answer)


def to_sample(item: EvalItem, tokenizer) -> Sample:
    """prompt + canonical answer as a :class:`Sample` whose ``loss_mask`` covers the answer tokens, for the
    one-forward teacher-forced check."""
    ans = answer_ids(item, tokenizer)
    ids = torch.tensor(item.prompt_ids + ans, dtype=torch.long)
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    mask[len(item.prompt_ids):] = True
    meta = {"task": item.task, "n_tokens": item.n_tokens, "depth": item.depth, "seed": item.seed,
            "style": item.style, "prompt_len": len(item.prompt_ids), "answers": list(item.answers)}
    return Sample(input_ids=ids, loss_mask=mask, answer=item.canonical_answer.strip(), meta=meta)
