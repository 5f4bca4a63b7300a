"""Synthetic long-dependency tasks at an exact token length: passkey retrieval and LongEval-style "lines".

Every generator works on token ids, not on text, so the length is exact by construction:

    input_ids = head + context + tail + answer          len(input_ids) == n_tokens  (always exactly)

- ``head``: BOS / chat-template prefix + instruction; ``tail``: question + assistant header + answer prefix.
  With a chat template (``tokenizer.chat_template`` set and ``use_chat_template`` not False) both come from
  ``apply_chat_template(..., add_generation_prompt=True)`` split around a placeholder, and the answer prefix
  is appended to the assistant turn; without one, the head starts with what ``tokenizer(text)`` adds (BOS).
  No chat markup is hard-coded here.
- ``context``: the haystack (real text, with the needle sentence spliced in at a sentence boundary) or the
  record of lines, sized so the total is exactly ``n_tokens``.
- ``answer``: the answer tokens (the Sample's loss_mask covers exactly these). For generation-based
  evaluation feed ``prompt_ids`` (= n_tokens - len(answer_ids) tokens) and score the continuation with
  :func:`score_exact_match`.

The pieces are tokenized separately and concatenated; the cuts sit at whitespace / newline / sentence
boundaries, so the ids are what the tokenizer produces on the joined text except, rarely, at a cut.
Same ``rng`` seed => identical task.
"""

from __future__ import annotations

import bisect
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from plans.errors import CompressError
from profilers.data.samples import Sample

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
"""The classic repetitive passkey haystack (Landmark Attention); repeat it as ``haystack_text``."""

PASSKEY_INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                       "Find it and memorize it. I will quiz you about the important information there.\n\n")
PASSKEY_QUESTION = "\n\nWhat is the pass key?"
PASSKEY_ANSWER_PREFIX = "The pass key is"

LINES_INSTRUCTION = (
    "Below is a record of lines I want you to remember. Each line begins with 'line <line index>' and contains "
    "a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, memorize its "
    "corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the corresponding "
    "<REGISTER_CONTENT> of a certain line index. Now the record start:\n\n")
LINES_QUESTION = ("\nNow the record is over. Tell me what is the <REGISTER_CONTENT> in line {key}? "
                  "I need the number.")
LINES_ANSWER_PREFIX = "The <REGISTER_CONTENT> in line {key} is <"

ADJECTIVES = (
    "able acid agile airy amber ample angry arctic ashen awake azure bald balmy bent big bitter black bland "
    "blue bold brave brief brisk broad brown busy calm candid cheap chief civil clean clear clever cold cool "
    "coral cosy crisp curly cute damp dark dear deep dense dizzy dry dull eager early easy empty equal even "
    "exact faint fair false fancy fast fierce firm flat fond free fresh frosty full fuzzy giant glad gold "
    "grand gray great green grim happy hard harsh hasty heavy high hollow honest huge humble icy idle jolly "
    "keen kind large late lazy lean light little live lively lone long loud low loyal lucky lush mad major "
    "merry mild minor misty modern moist murky narrow neat new nice noble odd old open pale plain plump polite "
    "poor proud pure quick quiet rapid rare raw ready red rich rigid ripe rough round royal rude rusty sad "
    "safe salty sandy sharp shiny short shy silent silly simple slim slow small smart smooth snowy soft solid "
    "sour spare stark steep stiff still stormy strict strong sunny super sweet swift tall tame tender thick "
    "thin tidy tiny tough true ugly vast violet vivid warm weak wet white wide wild windy wise witty young"
).split()
NOUNS = (
    "acorn actor anchor angle apple arch arrow atlas badge bakery ball banana band barn basket beach bean bear "
    "bell bench berry bird blade blanket boat bone book boot bottle bowl box branch bread brick bridge brush "
    "bucket cabin cable cake camel camera candle canoe canyon car carpet castle cat cave chair chalk cherry "
    "circle cliff clock cloud coat coin comet cookie copper corn cotton crab crane crown cup curtain desk "
    "diamond dog door dragon drum duck eagle engine falcon feather fence field fig flag flame flute forest "
    "fork fox frog garden gate ghost glass glove goat grape guitar hammer harbor hat hill horse house island "
    "jacket jar jewel kettle key kite ladder lake lamp leaf lemon lion lizard lock map maple marble meadow "
    "mirror moon motor mountain mouse needle nest ocean olive onion orange otter owl paddle palace panda paper "
    "parrot peach pearl pebble pencil pepper piano pillow pine planet plate pond pony pot puzzle quilt rabbit "
    "radio rain ribbon river robot rocket rope rose saddle sail salmon shell ship shoe silver sky sled snail "
    "sock spoon star stone storm sugar table tiger tower train tree tulip turtle valley violin wagon wall "
    "whale wheel willow window wolf yarn zebra"
).split()

_ABBREVIATIONS = frozenset(
    "Mr Mrs Ms Dr St Jr Sr Col Capt Gen Lt Rev Prof Mt No vs etc e.g i.e Fig Vol Jan Feb Mar Apr Jun Jul Aug "
    "Sep Sept Oct Nov Dec Inc Ltd Co".split())

_SENTINEL = "\u2063@@CONTEXT@@\u2063"


# ----------------------------------------------------------------------------------------------------------
# the task object


@dataclass
class RetrievalTask:
    """A prompt of exactly ``n_tokens`` tokens (with the answer) and where its answer comes from.

    ``needle_span`` / ``key_span`` / ``context_span`` are [start, end) token indices into ``prompt_ids``
    (= into ``input_ids``): the passkey sentence or key line, the answer value inside it (its first
    occurrence), and the whole haystack / record."""

    kind: str
    prompt_ids: list[int]
    answer: str
    answer_ids: list[int]
    needle_span: tuple[int, int]
    key_span: tuple[int, int]
    context_span: tuple[int, int]
    depth: float
    chat_template: bool
    meta: dict = field(default_factory=dict)

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.answer_ids

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)

    @property
    def actual_depth(self) -> float:
        """Where the needle landed: 0 = first thing in the context, 1 = last."""
        c0, c1 = self.context_span
        room = (c1 - c0) - (self.needle_span[1] - self.needle_span[0])
        return 0.0 if room <= 0 else (self.needle_span[0] - c0) / room

    def to_sample(self) -> Sample:
        ids = torch.tensor(self.input_ids, dtype=torch.long)
        mask = torch.zeros(ids.numel(), dtype=torch.bool)
        mask[len(self.prompt_ids):] = True
        meta = {"task": self.kind, "depth": self.depth, "actual_depth": self.actual_depth,
                "needle_span": list(self.needle_span), "key_span": list(self.key_span),
                "context_span": list(self.context_span), "prompt_len": len(self.prompt_ids),
                "chat_template": self.chat_template, **self.meta}
        return Sample(input_ids=ids, loss_mask=mask, answer=self.answer, meta=meta)


# ----------------------------------------------------------------------------------------------------------
# helpers


def as_rng(rng: random.Random | int | str | None) -> random.Random:
    """A random.Random from a seed (int/str), an existing generator (used as is), or None (seed 0)."""
    if isinstance(rng, random.Random):
        return rng
    return random.Random(0 if rng is None else rng)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens added (special-token text in ``text`` is still parsed)."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The ids ``tokenizer(text)`` puts before the text by default (typically [BOS] or [])."""
    with_sp = list(tokenizer("a b", add_special_tokens=True)["input_ids"])
    without = encode(tokenizer, "a b")
    for i in range(len(with_sp) - len(without) + 1):
        if with_sp[i:i + len(without)] == without:
            return with_sp[:i]
    return []


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_chat(tokenizer, use_chat_template: bool | None) -> bool:
    """Whether prompts go through the chat template: ``use_chat_template``, or (None) whether there is one."""
    if use_chat_template is None:
        return has_chat_template(tokenizer)
    if use_chat_template and not has_chat_template(tokenizer):
        raise CompressError("use_chat_template=True, but the tokenizer has no chat_template")
    return bool(use_chat_template)


def build_frame(tokenizer, before: str, after: str, answer_prefix: str = "",
                use_chat_template: bool | None = None) -> tuple[list[int], list[int], bool]:
    """(head_ids, tail_ids, chat) around a context: one user turn ``before + <context> + after``, then the
    assistant turn opened by the chat template and prefilled with ``answer_prefix``. Plain text (with the
    tokenizer's own BOS) when there is no chat template or ``use_chat_template`` is False."""
    chat = resolve_chat(tokenizer, use_chat_template)
    if chat:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": before + _SENTINEL + after}],
                                                 tokenize=False, add_generation_prompt=True)
        if rendered.count(_SENTINEL) == 1:
            head, tail = rendered.split(_SENTINEL)
            return encode(tokenizer, head), encode(tokenizer, tail + answer_prefix), True
        warnings.warn("the chat template changed the user message; using a plain-text prompt instead")
    sep = " " if answer_prefix and not after.endswith((" ", "\n")) else ""
    return (special_prefix(tokenizer) + encode(tokenizer, before),
            encode(tokenizer, after + sep + answer_prefix), False)


def _is_sentence_start(text: str, start: int) -> bool:
    """May a sentence (with a leading space) be spliced in right before char ``start`` of ``text`` (a token
    start)? Yes where a sentence ends just before and whitespace follows: ``end.| She`` / ``end."|\n\n``."""
    if start <= 0 or start >= len(text):
        return True
    if not text[start].isspace():
        return False
    core = text[max(0, start - 12):start].rstrip(" \t")
    if core[-1:] == ".":
        word = re.split(r"[\s(\"']", core[:-1])[-1]
        return not (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()))  # "Mr." / "J."
    return core[-1:] in ("!", "?") or core[-2:] in ('."', '!"', '?"', ".'", "!'", "?'", ".)")


def text_window(tokenizer, text: str, n: int, rng: random.Random, *, what: str = "the text"
                ) -> tuple[list[int], list[int]]:
    """Exactly ``n`` consecutive tokens of ``text`` ending at a random paragraph (else sentence) end, and the
    window indices where a sentence may be spliced in (token starts that follow a sentence end; 0 and n
    included). Raises a CompressError when ``text`` has fewer than ``n`` tokens."""
    if n <= 0:
        return [], [0]
    probe = text[:20000]
    cpt = max(1.0, len(probe) / max(1, len(encode(tokenizer, probe))))  # chars per token
    need = int(n * cpt * 1.25) + 256
    if need >= len(text):
        start, end = 0, len(text)
    else:
        end = rng.randint(need, len(text))
        para = text.rfind("\n\n", need, end)
        if para >= 0 and end - para < 4000:
            end = para
        else:
            dot = text.rfind(". ", need, end)
            if dot >= 0 and end - dot < 1000:
                end = dot + 1
        start = end - need
    while True:
        chunk = text[start:end]
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        ids = list(enc["input_ids"])
        if len(ids) >= n or (start == 0 and end == len(text)):
            break
        if start > 0:  # too few tokens (a dense stretch): widen to the left, then to the right
            start = max(0, start - need)
        else:
            end = min(len(text), end + need)
    if len(ids) < n:
        raise CompressError(f"{what} is too short: {len(ids)} tokens ({len(text)} characters), "
                            f"but {n} tokens are needed")
    cut = len(ids) - n
    ids = ids[cut:]
    if tokenizer.is_fast:
        offsets = enc["offset_mapping"][cut:]
        bounds = [j for j in range(1, n) if _is_sentence_start(chunk, offsets[j][0])]
    else:
        bounds = []
    return ids, [0] + bounds + [n]


def nearest(sorted_values: Sequence[int], target: float) -> int:
    """The value nearest to target (the smaller one on ties): monotone in target."""
    i = bisect.bisect_left(sorted_values, target)
    if i == 0:
        return sorted_values[0]
    if i == len(sorted_values):
        return sorted_values[-1]
    lo, hi = sorted_values[i - 1], sorted_values[i]
    return lo if target - lo <= hi - target else hi


def _token_span_of(tokenizer, ids: list[int], text: str, value: str) -> tuple[int, int]:
    """[start, end) indices of the tokens of ``ids`` (which decode to ``text``) covering the first ``value``."""
    c0 = text.find(value)
    if c0 < 0:
        return 0, len(ids)
    c1 = c0 + len(value)
    start, end = 0, len(ids)
    for j in range(1, len(ids) + 1):
        n = len(tokenizer.decode(ids[:j]))
        if n <= c0:
            start = j
        if n >= c1:
            end = j
            break
    return start, end


def check_room(n_tokens: int, fixed: int, what: str) -> None:
    """Raise CompressError when ``n_tokens`` cannot hold a task's ``fixed`` tokens (template, question, needle,
    answer)."""
    if n_tokens < fixed:
        raise CompressError(f"n_tokens={n_tokens} is too small for the {what} task: its template, question, "
                            f"needle and answer alone take {fixed} tokens")


def check_depth(depth: float) -> float:
    """``depth`` as a float in [0, 1] (a needle's relative position in the haystack); CompressError otherwise."""
    depth = float(depth)
    if not 0.0 <= depth <= 1.0:
        raise CompressError(f"depth must be in [0, 1], got {depth}")
    return depth


# ----------------------------------------------------------------------------------------------------------
# passkey


def passkey(tokenizer, haystack_text: str | Sequence[str], n_tokens: int, depth: float,
            rng: random.Random | int | None = None, *, use_chat_template: bool | None = None,
            key: str | None = None) -> RetrievalTask:
    """A 5-digit pass key sentence ("The pass key is 12345. Remember it. 12345 is the pass key.") spliced into
    real text at relative ``depth`` (0 = start of the haystack, 1 = end; snapped to the nearest sentence
    boundary), then "What is the pass key?" and the answer prefix "The pass key is". Exactly ``n_tokens``
    tokens including the answer " 12345"."""
    rng = as_rng(rng)
    depth = check_depth(depth)
    if not isinstance(haystack_text, str):
        haystack_text = "\n\n".join(haystack_text)
    key = key if key is not None else str(rng.randint(10000, 99999))
    sentence = f"The pass key is {key}. Remember it. {key} is the pass key."
    needle_ids = encode(tokenizer, " " + sentence)
    answer_ids = encode(tokenizer, " " + key)
    head, tail, chat = build_frame(tokenizer, PASSKEY_INSTRUCTION, PASSKEY_QUESTION, PASSKEY_ANSWER_PREFIX,
                                   use_chat_template)
    fixed = len(head) + len(tail) + len(needle_ids) + len(answer_ids)
    check_room(n_tokens, fixed, "passkey")
    hay, bounds = text_window(tokenizer, haystack_text, n_tokens - fixed, rng, what="the passkey haystack")
    at = nearest(bounds, depth * len(hay))
    prompt = head + hay[:at] + needle_ids + hay[at:] + tail
    n0 = len(head) + at
    k0, k1 = _token_span_of(tokenizer, needle_ids, tokenizer.decode(needle_ids), key)
    return RetrievalTask(
        kind="passkey", prompt_ids=prompt, answer=key, answer_ids=answer_ids,
        needle_span=(n0, n0 + len(needle_ids)), key_span=(n0 + k0, n0 + k1),
        context_span=(len(head), len(head) + len(hay) + len(needle_ids)), depth=depth, chat_template=chat,
        meta={"needle": sentence})


# ----------------------------------------------------------------------------------------------------------
# LongEval lines


def _line_text(line_id: str, number: int) -> str:
    return f"line {line_id}: REGISTER_CONTENT is <{number}>\n"


class _LineSource:
    """Fresh lines with unique ids and numbers, tokenized in batches."""

    def __init__(self, tokenizer, rng: random.Random):
        self.tok, self.rng = tokenizer, rng
        self.ids: set[str] = set()
        self.numbers: set[int] = set()

    def _new_id(self) -> str:
        for attempt in range(1000):
            i = f"{self.rng.choice(ADJECTIVES)}-{self.rng.choice(NOUNS)}"
            if attempt > 50:
                i += f"-{self.rng.randint(2, 999)}"
            if i not in self.ids:
                self.ids.add(i)
                return i
        raise RuntimeError("could not draw a new line id")

    def _new_number(self) -> int:
        while True:
            v = self.rng.randint(10000, 99999)
            if v not in self.numbers:
                self.numbers.add(v)
                return v

    def take(self, k: int) -> list[tuple[str, int, list[int]]]:
        rows = [(self._new_id(), self._new_number()) for _ in range(k)]
        toks = self.tok([_line_text(i, v) for i, v in rows], add_special_tokens=False)["input_ids"]
        return [(i, v, list(t)) for (i, v), t in zip(rows, toks)]


def filler_token(tokenizer) -> list[int]:
    """A one-token filler (newline, space or full stop, whichever the tokenizer encodes as one token)."""
    for s in ("\n", " \n", " ", "."):
        ids = encode(tokenizer, s)
        if len(ids) == 1:
            return ids
    raise CompressError("the tokenizer has no single-token newline, space or period to pad the lines task with")


def lines_retrieval(tokenizer, n_tokens: int, depth: float, rng: random.Random | int | None = None, *,
                    use_chat_template: bool | None = None) -> RetrievalTask:
    """LongEval "lines": a record of lines ``line <word-id>: REGISTER_CONTENT is <ddddd>``, the question about
    the line at relative ``depth`` (0 = first line, 1 = last), and the answer prefix
    "The <REGISTER_CONTENT> in line <word-id> is <" (the answer is the bare number). Exactly ``n_tokens`` tokens:
    random lines fill the budget until a few hundred tokens are left, then a subset of candidate lines whose
    token counts sum to the rest exactly is added. When no subset fits (tokenizers where every line has the same
    length, or a budget smaller than one line) the rest is single newline tokens after the record
    (``meta["n_pad"]``, usually 0)."""
    rng = as_rng(rng)
    depth = check_depth(depth)
    src = _LineSource(tokenizer, rng)
    key_id, key_num, key_line = src.take(1)[0]
    answer = str(key_num)
    answer_ids = encode(tokenizer, answer)
    head, tail, chat = build_frame(tokenizer, LINES_INSTRUCTION, LINES_QUESTION.format(key=key_id),
                                   LINES_ANSWER_PREFIX.format(key=key_id), use_chat_template)
    fixed = len(head) + len(tail) + len(answer_ids) + len(key_line)
    check_room(n_tokens, fixed, "lines")
    remaining = n_tokens - fixed
    others: list[tuple[str, int, list[int]]] = []
    pool = src.take(256)
    counts = Counter(len(t) for _, _, t in pool)
    lmin, lmax = min(counts), max(counts)
    # greedy random lines until `threshold` tokens are left: enough that sums of line lengths cover it
    threshold = 8 * lmax if lmax == lmin else max(8 * lmax, (lmin // (lmax - lmin) + 3) * lmax)
    while remaining > threshold:
        if not pool:
            pool = src.take(256)
        row = pool.pop()
        others.append(row)
        remaining -= len(row[2])
    # the rest exactly: line lengths summing to `remaining` (unbounded knapsack over the lengths seen,
    # most common first), then lines of those lengths
    ok = [True] + [False] * remaining
    last = [0] * (remaining + 1)
    classes = [length for length, _ in counts.most_common()]
    for total in range(1, remaining + 1):
        for length in classes:
            if length <= total and ok[total - length]:
                ok[total], last[total] = True, length
                break
    best = max(t for t in range(remaining + 1) if ok[t])
    need: Counter = Counter()
    t = best
    while t:
        need[last[t]] += 1
        t -= last[t]
    for _ in range(200):  # draw lines until every needed length is served (rare lengths may take a few draws)
        for row in pool:
            if need[len(row[2])] > 0:
                need[len(row[2])] -= 1
                others.append(row)
                remaining -= len(row[2])
        if sum(need.values()) == 0:
            break
        pool = src.take(64)
    rng.shuffle(others)
    n_pad = remaining
    pad = filler_token(tokenizer) * n_pad
    k = int(round(depth * len(others)))  # the key line's index among len(others) + 1 lines
    rows = others[:k] + [(key_id, key_num, key_line)] + others[k:]
    record: list[int] = []
    needle = (0, 0)
    for j, (_, _, t) in enumerate(rows):
        if j == k:
            needle = (len(head) + len(record), len(head) + len(record) + len(t))
        record += t
    prompt = head + record + pad + tail
    k0, k1 = _token_span_of(tokenizer, key_line, tokenizer.decode(key_line), answer)
    return RetrievalTask(
        kind="lines", prompt_ids=prompt, answer=answer, answer_ids=answer_ids, needle_span=needle,
        key_span=(needle[0] + k0, needle[0] + k1), context_span=(len(head), len(head) + len(record)),
        depth=depth, chat_template=chat,
        meta={"line_id": key_id, "n_lines": len(rows), "line_index": k, "n_pad": n_pad})


# ----------------------------------------------------------------------------------------------------------
# scoring


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def score_exact_match(generated_text: str, answer: str) -> bool:
    """True when the generation starts with the answer (whitespace normalised; a leading ``<``, quote or
    ``:`` is skipped). A numeric answer must match exactly: no further digit may follow it."""
    gen, ans = _norm(generated_text), _norm(answer)
    if not ans:
        return False
    gen = gen.lstrip("<\"':*` ")
    if not gen.startswith(ans):
        return False
    rest = gen[len(ans):]
    if ans[-1].isdigit() and rest[:1].isdigit():
        return False
    if ans[-1].isalnum() and rest[:1].isalnum():
        return False
    return True
