"""Retrieval-style training blocks (``data.retrieval``): layout, mixing, determinism, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ctxext.config import RecipeError, load
from ctxext.data import DataError, batch_indices, block_order, build_blocks, describe_reads
from ctxext.retrieval_data import mix_retrieval, retrieval_blocks, retrieval_layout, retrieval_reads
from ctxext.tiny import byte_tokenizer

TINY = Path(__file__).parents[2] / "recipes" / "tiny-debug.yaml"


def _text(n: int) -> np.ndarray:
    tok = byte_tokenizer()
    text = "def f(x):\n    return x + 1\n" * (n // 10)
    return np.asarray(tok(text, add_special_tokens=False).input_ids[:n], dtype=np.int64)


def test_layout_states_and_recalls_every_record_at_the_recorded_offsets():
    tok = byte_tokenizer()
    block = retrieval_layout(_text(1024), tok, 5, np.random.default_rng(0))
    assert block.ids.shape == (1024,) and block.ids.dtype == np.int64
    text = tok.decode(block.ids)
    stated = re.findall(r" Record ([A-Z]{4}) holds (\d{5})\.", text)
    recalled = re.findall(r"\nRecord ([A-Z]{4}) holds (\d{5})\.", text)
    assert len(stated) == 5 and sorted(stated) == sorted(recalled), "every statement is recalled once"
    assert [p for p in recalled] != [p for p in stated], "recalls come in a new order"
    assert text.endswith("."), "the block ends with the last recall"
    for start, size, (a0, a1) in zip(block.statements, block.statement_lengths, block.answers):
        statement = tok.decode(block.ids[start : start + size])
        code = tok.decode(block.ids[a0:a1]).strip()
        assert re.fullmatch(r" Record [A-Z]{4} holds \d{5}\.", statement) and code in statement, (statement, code)
        assert a0 > start and tok.decode(block.ids[a0 - 6 : a0]).endswith("holds")
    assert max(block.statements) < 0.9 * 1024, "statements lie in the text part"


def test_mix_is_deterministic_and_touches_the_requested_fraction():
    tok = byte_tokenizer()
    blocks = np.stack([_text(512) + i for i in range(10)])
    a = mix_retrieval(blocks, tok, 0.3, 2, seed=1)
    b = mix_retrieval(blocks, tok, 0.3, 2, seed=1)
    c = mix_retrieval(blocks, tok, 0.3, 2, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    changed = (a != blocks).any(axis=1)
    assert changed.sum() == 3
    assert np.array_equal(mix_retrieval(blocks, tok, 0.0, 2, seed=1), blocks)


def test_recipe_builds_mixed_blocks_and_reports_bad_settings(tmp_path):
    base = [f"data.cache_dir={tmp_path}", "data.max_tokens=8192", "data.seq_len=512"]
    recipe = load(TINY, [*base, "data.retrieval=0.5", "data.retrieval_records=3"])
    blocks = build_blocks(recipe.data, byte_tokenizer(), tmp_path).blocks
    tok = byte_tokenizer()
    with_records = [i for i, b in enumerate(blocks) if "\nRecord " in tok.decode(b[-80:])]
    assert len(with_records) == round(0.5 * len(blocks))
    with pytest.raises(DataError, match="retrieval_records=40 leaves too little text"):
        build_blocks(load(TINY, [*base, "data.retrieval=0.5", "data.retrieval_records=40"]).data, tok, None)
    with pytest.raises(RecipeError, match=r"data.retrieval: a fraction of blocks in \[0, 1\], got 1.5"):
        load(TINY, [*base, "data.retrieval=1.5"])
    with pytest.raises(RecipeError, match="data.retrieval_records: must be > 0"):
        load(TINY, [*base, "data.retrieval=0.5", "data.retrieval_records=0"])


@pytest.mark.parametrize("spread", ["random", "even"])
def test_retrieval_blocks_names_the_blocks_the_mix_turns(spread):
    tok = byte_tokenizer()
    blocks = np.stack([_text(512) + i for i in range(13)])
    mixed = mix_retrieval(blocks, tok, 0.4, 2, seed=3, spread=spread)
    changed = np.flatnonzero((mixed != blocks).any(axis=1))
    assert np.array_equal(changed, retrieval_blocks(13, 0.4, 3, spread)) and len(changed) == 5


def test_random_spread_is_the_draw_earlier_rounds_trained_on():
    # the data of every recipe before retrieval_spread existed must not change
    tok = byte_tokenizer()
    blocks = np.stack([_text(512) + i for i in range(10)])
    assert np.array_equal(mix_retrieval(blocks, tok, 0.3, 2, seed=1), mix_retrieval(blocks, tok, 0.3, 2, 1, "random"))
    rng = np.random.default_rng([1, 7919])
    assert np.array_equal(retrieval_blocks(10, 0.3, 1), np.sort(rng.choice(10, size=3, replace=False)))


@pytest.mark.parametrize("n,fraction", [(60, 0.5), (597, 0.5), (149, 0.21), (7, 1.0), (10, 0.04)])
def test_even_spread_gives_every_run_the_fraction(n, fraction):
    chosen = set(retrieval_blocks(n, fraction, 5, "even").tolist())
    count = round(fraction * n)
    assert len(chosen) == count
    first_pass = block_order(n, 5, 0)
    held = np.cumsum([int(b) in chosen for b in first_pass])  # retrieval blocks among the first P reads
    assert np.array_equal(held, np.arange(1, n + 1) * count // n)


def _brute_force_reads(n, data, steps, grad_accum, batch_size):
    chosen = set(retrieval_blocks(n, data.retrieval, data.seed, data.retrieval_spread).tolist())
    read = [int(i) for s in range(steps * grad_accum) for i in batch_indices(n, data.seed, s, batch_size)]
    return sum(i in chosen for i in read)


@pytest.mark.parametrize("spread", ["random", "even"])
@pytest.mark.parametrize("steps,grad_accum,batch_size", [(3, 1, 1), (15, 4, 1), (7, 2, 3), (40, 1, 2)])
def test_retrieval_reads_counts_what_the_training_loop_reads(steps, grad_accum, batch_size, spread):
    data = load(TINY, ["data.retrieval=0.5", "data.retrieval_records=16", f"data.retrieval_spread={spread}"]).data
    n = 23  # 40 x 2 reads pass over it more than three times
    reads = retrieval_reads(n, data, steps * grad_accum * batch_size)
    expected = _brute_force_reads(n, data, steps, grad_accum, batch_size)
    assert reads.retrieval_sequences == expected and reads.records == 16 * expected
    assert (reads.sequences, reads.corpus_blocks, reads.corpus_retrieval) == (steps * grad_accum * batch_size, n, 12)
    if spread == "even" and reads.sequences <= n:
        assert expected == reads.sequences * 12 // n


def test_describe_reads_logs_the_records_a_run_reads(tmp_path):
    overrides = [f"data.cache_dir={tmp_path}", "data.max_tokens=8192", "data.seq_len=512", "data.retrieval=0.5"]
    recipe = load(TINY, [*overrides, "data.retrieval_records=3", "data.retrieval_spread=even"])
    blocks = build_blocks(recipe.data, byte_tokenizer(), tmp_path)
    n = len(blocks)
    record, lines = describe_reads(blocks, recipe.data, 2 * n)  # two passes: every retrieval block twice
    read = 2 * round(0.5 * n)
    assert record["retrieval"]["retrieval_sequences"] == read and record["retrieval"]["records"] == 3 * read
    assert lines[1].startswith(f"retrieval: {read} of the {2 * n} sequences this run reads carry records")
    assert lines[0].endswith("(2.00 passes)")
    plain = load(TINY, [*overrides[:3]])
    record, lines = describe_reads(build_blocks(plain.data, byte_tokenizer(), tmp_path), plain.data, 6)
    assert "retrieval" not in record and len(lines) == 1 and "the run reads 6 sequences" in lines[0]


def test_a_bad_retrieval_spread_is_named():
    with pytest.raises(RecipeError, match="data.retrieval_spread: random or even, got 'evenly'"):
        load(TINY, ["data.retrieval=0.5", "data.retrieval_spread=evenly"])


def test_the_default_spread_keeps_the_data_caches_of_earlier_runs():
    from ctxext.data import _fingerprint

    data = load(TINY, ["data.retrieval=0.5"]).data
    # the key this data section had before data.retrieval_spread existed (computed on commit 748936b)
    assert _fingerprint(data, byte_tokenizer(), None) == "825aebae22d555aced6e"
    even = load(TINY, ["data.retrieval=0.5", "data.retrieval_spread=even"]).data
    assert _fingerprint(even, byte_tokenizer(), None) != "825aebae22d555aced6e", "other blocks, another cache"
    interleaved = load(TINY, ["data.retrieval=0.5", "data.retrieval_recalls=interleaved"]).data
    assert _fingerprint(interleaved, byte_tokenizer(), None) != "825aebae22d555aced6e", "other blocks, another cache"


def test_tail_recalls_are_the_layout_earlier_rounds_trained_on():
    import hashlib

    block = retrieval_layout(_text(1024), byte_tokenizer(), 5, np.random.default_rng(0))
    # the digest of this layout before data.retrieval_recalls existed (computed on commit 637f0dc)
    assert hashlib.sha256(block.ids.tobytes()).hexdigest()[:16] == "6a08a8a0332bf56d"
    explicit = retrieval_layout(_text(1024), byte_tokenizer(), 5, np.random.default_rng(0), "tail")
    assert np.array_equal(explicit.ids, block.ids)


@pytest.mark.parametrize("seed", range(4))
def test_interleaved_recalls_each_sit_amid_the_text_after_every_statement(seed):
    tok = byte_tokenizer()
    block = retrieval_layout(_text(2048), tok, 6, np.random.default_rng(seed), "interleaved")
    assert block.ids.shape == (2048,)
    text = tok.decode(block.ids)
    stated = re.findall(r" Record ([A-Z]{4}) holds (\d{5})\.", text)
    recalled = re.findall(r"\nRecord ([A-Z]{4}) holds (\d{5})\.", text)
    assert len(stated) == 6 and sorted(stated) == sorted(recalled)
    assert max(block.statements) < 2048 // 2, "statements lie in the first half"
    recall_starts = [a0 for a0, _ in block.answers]
    assert min(recall_starts) > max(block.statements), "every recall comes after every statement"
    for start, size, (a0, a1) in zip(block.statements, block.statement_lengths, block.answers):
        statement = tok.decode(block.ids[start : start + size])
        assert tok.decode(block.ids[a0:a1]).strip() in statement, "each recall's answer is its own record's code"
    after_a_recall = sum(_follows_a_recall(block, tok, a0) for a0, _ in block.answers)
    tail = retrieval_layout(_text(2048), tok, 6, np.random.default_rng(seed))
    assert after_a_recall == 0 and sum(_follows_a_recall(tail, tok, a0) for a0, _ in tail.answers) == 5, (
        "interleaved: every recall follows ordinary text; tail: all but the first follow another recall"
    )


def _follows_a_recall(block, tok, answer_start: int) -> bool:
    """Whether the recall whose code starts at ``answer_start`` comes right after another recall's full stop."""
    prefix = len(tok("\nRecord ABCD holds", add_special_tokens=False).input_ids)
    before = tok.decode(block.ids[answer_start - prefix - 7 : answer_start - prefix])
    return re.fullmatch(r" \d{5}\.", before) is not None


def test_a_bad_recall_place_is_named():
    with pytest.raises(RecipeError, match="data.retrieval_recalls: tail or interleaved, got 'end'"):
        load(TINY, ["data.retrieval=0.5", "data.retrieval_recalls=end"])
    with pytest.raises(ValueError, match="data.retrieval_recalls: one of tail, interleaved, got 'end'"):
        retrieval_layout(_text(1024), byte_tokenizer(), 2, np.random.default_rng(0), "end")
