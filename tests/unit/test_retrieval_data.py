"""Retrieval-style training blocks (``data.retrieval``): layout, mixing, determinism, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from ctxext.config import RecipeError, load
from ctxext.data import DataError, build_blocks
from ctxext.retrieval_data import mix_retrieval, retrieval_layout
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
