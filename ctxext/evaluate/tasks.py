"""Synthetic long-context retrieval tasks, generated locally and deterministically.

Each task builds, for a requested length ``L`` in tokens of a given tokenizer and a depth ``d``
in ``[0, 1]``, one token sequence: an instruction, a filler whose key information sits at
relative position ``d``, a question, and the answer tokens. Scoring is teacher-forced on
``input_ids`` (see :mod:`ctxext.evaluate.retrieval`), so the answer is part of the sequence.

Tasks:

- ``passkey``: the classic (Mohtashami & Jaggi, 2023): "The grass is green. ..." repeated, a
  5-digit pass key stated at the depth, asked at the end.
- ``needle``: needle in a haystack: real text (the ``haystack`` argument, or by default the
  Python standard library's sources, available offline) with "The special magic number for
  {city} is {7 digits}." at the depth.
- ``multikey``: RULER's multi-key needle: four such sentences with different cities and
  numbers, the asked one at the depth and the three distractors at the other quarters.
- ``vartrack``: RULER's variable tracking, simplified to one question: "VAR ABCDE = 12345."
  at the depth and a chain of 2-3 "VAR FGHIJ = VAR ABCDE." hops spread from there towards the
  end, in the repeated passkey noise; asks the value of the last variable.

Lengths are exact: ``len(sample.input_ids) == length``. The fixed parts (instruction, needles,
question, answer) are tokenized once each, the filler is tokenized once and sliced to the
remaining budget, and the needles are inserted at token boundaries of the filler (at whole
noise sentences for the noise filler). The same ``(task, tokenizer, length, depth, seed,
haystack)`` always gives the same sample; the keys depend on ``(task, seed)`` only, so one seed
asks the same key at every length and depth.
"""

from __future__ import annotations

import functools
import math
import operator
import random
import weakref
from dataclasses import dataclass

TASKS = ("passkey", "needle", "multikey", "vartrack")

MIN_FILLER = 16  # tokens of filler that min_length reserves beyond the longest fixed text
_PROBES = 16  # seeds min_length tries (besides the worst-case keys) to bound the fixed text

LOCAL_CHARS = 2_000_000  # characters of the default haystack the seed picks a start in

NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

CITIES = (
    "Amsterdam", "Athens", "Bangkok", "Beijing", "Berlin", "Bogota", "Boston", "Brussels", "Budapest",
    "Cairo", "Chicago", "Dakar", "Delhi", "Denver", "Dublin", "Geneva", "Havana", "Helsinki", "Istanbul",
    "Jakarta", "Kyoto", "Lagos", "Lima", "Lisbon", "London", "Madrid", "Manila", "Melbourne", "Mexico",
    "Montreal", "Moscow", "Mumbai", "Nairobi", "Oslo", "Paris", "Prague", "Rome", "Santiago", "Seattle",
    "Seoul", "Shanghai", "Singapore", "Stockholm", "Sydney", "Tokyo", "Toronto", "Vienna", "Warsaw",
    "Zurich",
)  # fmt: skip

_PREFIX = {
    "passkey": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.",
    "needle": "A special magic number is hidden in the following text. Memorize it.\n",
    "multikey": "Some special magic numbers are hidden in the following text. Memorize them.\n",
    "vartrack": "Memorize the chain of variable assignments hidden in the following text.",
}
_MULTIKEY_SLOTS = (0.125, 0.375, 0.625, 0.875)  # the asked needle replaces the slot nearest its depth


@dataclass
class Sample:
    """One teacher-forced retrieval example: the prompt followed by the answer tokens."""

    input_ids: list[int]  # prompt tokens followed by the answer tokens
    answer_start: int  # index in input_ids where the answer tokens begin
    task: str
    length: int  # the requested length (== len(input_ids))
    depth: float  # the requested depth
    needle_position: int  # index in input_ids where the key information starts
    answer: str  # the answer text, e.g. "68413"
    filler_start: int = 0  # index in input_ids where the filler starts (after the BOS and the instruction)
    question_start: int = 0  # index in input_ids where the question starts (after the filler)


@dataclass
class _Texts:
    """The fixed texts of one sample, before tokenization."""

    prefix: str
    inserts: list[tuple[float, str]]  # (depth, text), in the order they must appear at equal depths
    key: int  # index in inserts of the key information (needle_position points at it)
    question: str
    answer: str  # with its leading space
    noise: bool  # filler is the repeated passkey noise (else real text)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def _rng(task: str, seed: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
    return random.Random(f"ctxext.evaluate.tasks:{task}:{seed}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _continue(tokenizer, text: str, context: str = ".") -> list[int]:
    """Tokens of ``text`` as it tokenizes after ``context`` (no SentencePiece dummy prefix)."""
    head = _encode(tokenizer, context)
    full = _encode(tokenizer, context + text)
    if len(full) > len(head) and full[: len(head)] == head:
        return full[len(head) :]
    return _encode(tokenizer, text)


def _bos(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer has a BOS token and adds it by default, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if len(ids) and ids[0] == bos else []


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _distinct_numbers(rng: random.Random, count: int, digits: int) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        n = _number(rng, digits)
        if n not in out:
            out.append(n)
    return out


def _longest_cities(tokenizer, count: int) -> list[str]:
    """The ``count`` cities with the most tokens (ties: most characters) — the worst case for length."""
    return sorted(CITIES, key=lambda c: (len(_continue(tokenizer, " " + c)), len(c)), reverse=True)[:count]


def _needle_sentence(city: str, number: str) -> str:
    return f"\nThe special magic number for {city} is {number}.\n"


def _needle_question(city: str) -> str:
    return f"\nWhat is the special magic number for {city}? The special magic number for {city} is"


def _texts(task: str, rng: random.Random, depth: float, worst_cities: list[str] | None = None) -> _Texts:
    """Draw the keys of one sample and lay out its fixed texts. ``worst_cities`` replaces the drawn cities."""
    prefix = _PREFIX[task]
    if task == "passkey":
        key = _number(rng, 5)
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        return _Texts(prefix, [(depth, needle)], 0, "\nWhat is the pass key? The pass key is", f" {key}", True)
    if task == "needle":
        city = rng.choice(CITIES)
        number = _number(rng, 7)
        if worst_cities:
            city = worst_cities[0]
        return _Texts(prefix, [(depth, _needle_sentence(city, number))], 0, _needle_question(city), f" {number}", False)
    if task == "multikey":
        cities = rng.sample(CITIES, len(_MULTIKEY_SLOTS))
        numbers = _distinct_numbers(rng, len(_MULTIKEY_SLOTS), 7)
        if worst_cities:
            cities = list(worst_cities[: len(_MULTIKEY_SLOTS)])
        slots = list(_MULTIKEY_SLOTS)
        del slots[min(range(len(slots)), key=lambda i: abs(slots[i] - depth))]
        depths = [depth, *slots]
        inserts = [(d, _needle_sentence(c, n)) for d, c, n in zip(depths, cities, numbers)]
        return _Texts(prefix, inserts, 0, _needle_question(cities[0]), f" {numbers[0]}", False)
    # vartrack
    hops = 3 if worst_cities is not None else rng.choice((2, 3))
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5)
    statements = [f" VAR {names[0]} = {value}."]
    statements += [f" VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    # The chain starts at the depth and spreads evenly over the rest of the filler, in order.
    inserts = [(depth + (1.0 - depth) * i / len(statements), s) for i, s in enumerate(statements)]
    question = f"\nWhat is the value of VAR {names[-1]}? The value is"
    return _Texts(prefix, inserts, 0, question, f" {value}", True)


@dataclass
class _Tokens:
    prefix: list[int]
    inserts: list[tuple[float, list[int]]]
    question: list[int]
    answer: list[int]

    def fixed(self, bos: list[int]) -> int:
        inserted = sum(len(t) for _, t in self.inserts)
        return len(bos) + len(self.prefix) + inserted + len(self.question) + len(self.answer)


def _tokenize(tokenizer, texts: _Texts) -> _Tokens:
    return _Tokens(
        prefix=_encode(tokenizer, texts.prefix),
        inserts=[(d, _continue(tokenizer, t)) for d, t in texts.inserts],
        question=_continue(tokenizer, texts.question),
        # The answer as it tokenizes right after the question: the same tokens a model would read.
        answer=_continue(tokenizer, texts.answer, context=texts.question),
    )


_MIN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def min_length(task: str, tokenizer) -> int:
    """The smallest length (tokens) that fits the task's fixed text plus ``MIN_FILLER`` filler tokens.

    The fixed text depends slightly on the drawn keys (city names, digit tokenization), so this is
    the maximum over the worst-case cities and ``_PROBES`` seeds, plus the filler reserve.
    """
    _check_task(task)
    try:
        cache = _MIN_CACHE.setdefault(tokenizer, {})
    except TypeError:  # tokenizer not weak-referenceable or not hashable: no cache
        cache = {}
    if task not in cache:
        bos = _bos(tokenizer)
        worst = _longest_cities(tokenizer, len(_MULTIKEY_SLOTS)) if task in ("needle", "multikey") else []
        fixed = [_tokenize(tokenizer, _texts(task, _rng(task, -1), 0.5, worst)).fixed(bos)]
        fixed += [_tokenize(tokenizer, _texts(task, _rng(task, s), 0.5)).fixed(bos) for s in range(_PROBES)]
        cache[task] = max(fixed) + MIN_FILLER
    return cache[task]


@functools.lru_cache(maxsize=4)
def _local_text(min_chars: int) -> str:
    """At least ``min_chars`` characters of the local corpus, or all of it when it holds fewer."""
    from ..data import local_text, local_text_files

    try:
        return local_text(min_chars)
    except ValueError:
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in local_text_files())


def _haystack_ids(tokenizer, haystack: str | None, n: int, rng: random.Random) -> list[int]:
    """``n`` filler tokens of real text, from a seed-chosen line start of the haystack."""
    if n <= 0:
        return []
    if haystack is not None and not haystack.strip():
        raise ValueError("haystack is empty; pass long natural text, or None for the built-in local text")
    fraction = rng.random()
    window = 4 * n + 1024  # characters: enough for n tokens of any usual tokenizer (retried if not)
    while True:
        # The default corpus offers at least LOCAL_CHARS characters, so different seeds read different files.
        text = haystack if haystack is not None else _local_text(max(2 * window, LOCAL_CHARS))
        start = 0
        if len(text) > window:
            start = int(fraction * (len(text) - window))
            newline = text.find("\n", start, start + 4096)
            if newline >= 0:
                start = newline + 1
        chunk = text[start : start + window]
        ids = _continue(tokenizer, chunk, context="\n")
        if len(ids) >= n:
            return ids[:n]
        if start == 0 and len(chunk) >= len(text):  # the whole text is too short: repeat it
            ids = _continue(tokenizer, text + "\n\n", context="\n")
            return (ids * math.ceil(n / len(ids)))[:n]
        window *= 2


def _noise_position(k: float, n: int, unit: int) -> int:
    """Filler index for depth ``k`` of ``n`` noise tokens: the nearest whole-sentence-group boundary."""
    pos = min(n, max(0, round(k * n)))
    lo = (pos // unit) * unit
    hi = min(lo + unit, n)
    return lo if pos - lo <= hi - pos else hi


def _text_position(k: float, filler: list[int], tokenizer) -> int:
    """Filler index for depth ``k`` of real text: the nearest line start (else sentence end, else token
    boundary) within a few dozen tokens, so a needle rarely splits a word."""
    n = len(filler)
    pos = min(n, max(0, round(k * n)))
    reach = max(4, min(64, n // 32))
    lo, hi = max(0, pos - reach), min(n, pos + reach)
    pieces = {i: tokenizer.decode([filler[i]]) for i in range(max(0, lo - 1), min(n, hi + 1))}
    line, sentence = [], []
    for b in range(lo, hi + 1):  # boundary b sits after filler[b - 1]
        if b in (0, n):  # the instruction before the filler ends a line, the question starts one
            line.append(b)
            continue
        before, after = pieces[b - 1], pieces[b]
        if before.endswith("\n"):
            line.append(b)
        elif before.rstrip().endswith((".", "!", "?")) and (before[-1:].isspace() or after[:1].isspace()):
            sentence.append(b)
    for candidates in (line, sentence):
        if candidates:
            return min(candidates, key=lambda b: (abs(b - pos), b))
    return pos


def make_sample(task: str, tokenizer, length: int, depth: float, seed: int, haystack: str | None = None) -> Sample:
    """Build one sample of ``task`` with exactly ``length`` tokens and its key information at ``depth``.

    ``haystack`` is the filler text of ``needle`` and ``multikey`` (default: the Python standard
    library's sources, via :func:`ctxext.data.local_text`); ``passkey`` and ``vartrack`` always use
    the repeated "The grass is green. ..." noise and ignore it.
    """
    _check_task(task)
    try:
        depth = float(depth)
    except (TypeError, ValueError):
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}") from None
    if not 0.0 <= depth <= 1.0:  # also rejects NaN
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    seed = operator.index(seed)
    length = operator.index(length)
    need = min_length(task, tokenizer)
    if length < need:
        raise ValueError(
            f"length {length} is too short for task {task!r} with this tokenizer: it needs at least {need} tokens"
        )

    rng = _rng(task, seed)
    texts = _texts(task, rng, depth)
    toks = _tokenize(tokenizer, texts)
    bos = _bos(tokenizer)
    n = length - toks.fixed(bos)
    if n < 0:  # min_length bounds the fixed text with a margin; this needs an extraordinary key draw
        raise ValueError(f"length {length} is too short for task {task!r} with seed {seed}; use a longer length")

    if texts.noise:
        unit_ids = _continue(tokenizer, NOISE)
        filler = (unit_ids * math.ceil(n / len(unit_ids)))[:n] if n else []
        unit = len(unit_ids)
    else:
        filler = _haystack_ids(tokenizer, haystack, n, rng)
        unit = None

    positions = [_noise_position(d, n, unit) if unit else _text_position(d, filler, tokenizer) for d, _ in toks.inserts]
    placed = sorted(zip(positions, range(len(positions)), (ids for _, ids in toks.inserts)))
    input_ids = bos + toks.prefix
    filler_start = len(input_ids)
    needle_position = -1
    cursor = 0
    for pos, i, ids in placed:
        input_ids += filler[cursor:pos]
        cursor = pos
        if i == texts.key:
            needle_position = len(input_ids)
        input_ids += ids
    input_ids += filler[cursor:]
    question_start = len(input_ids)
    input_ids += toks.question
    answer_start = len(input_ids)
    input_ids += toks.answer
    assert len(input_ids) == length, (len(input_ids), length)
    return Sample(
        input_ids=input_ids,
        answer_start=answer_start,
        task=task,
        length=length,
        depth=depth,
        needle_position=needle_position,
        answer=texts.answer.strip(),
        filler_start=filler_start,
        question_start=question_start,
    )
