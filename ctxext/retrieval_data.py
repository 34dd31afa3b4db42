"""Retrieval-style training sequences: key-value records spread through real text, recalled at the end.

A long-range path only learns to carry information when the loss needs information from far
away. Ordinary text rarely does (a window predicts it almost as well), so a recipe can turn a
fraction of its training blocks into retrieval blocks (``data.retrieval``): ``records`` short
statements ``" Record QXJV holds 48213."`` are spliced into the block's own text at random
places, and the block ends with every record recalled in a new order
(``"\\nRecord QXJV holds 48213."``). Predicting the digits of a recall needs the statement,
which mostly lies beyond any local window. The loss stays on every token: the recalls are the
only unpredictable tokens of the tail, and ordinary text keeps the language model honest.

The wording differs from the evaluation's passkey and needle tasks (``pass key``, ``special
magic number``), so evaluation measures transfer, not memorised phrasing.
"""

from __future__ import annotations

import numpy as np

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _record(rng: np.random.Generator) -> tuple[str, str]:
    name = "".join(rng.choice(list(LETTERS), 4))
    code = "".join(str(d) for d in rng.integers(0, 10, 5))
    return name, code


def retrieval_block(text: np.ndarray, tokenizer, records: int, rng: np.random.Generator) -> np.ndarray:
    """One retrieval block of ``len(text)`` tokens built on the token ids ``text``.

    text: ``(L,)`` int64 token ids of ordinary text. Returns ``(L,)`` int64: the text (cut to
    make room) with ``records`` statements inserted at random token offsets in its first 90%
    and their recalls, shuffled, at the end.
    """
    length = len(text)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < records:
        pair = _record(rng)
        if pair[0] not in {p[0] for p in pairs}:
            pairs.append(pair)
    statements = [tokenizer(f" Record {n} holds {c}.", add_special_tokens=False).input_ids for n, c in pairs]
    order = rng.permutation(records)
    recalls = [tokenizer(f"\nRecord {pairs[i][0]} holds {pairs[i][1]}.", add_special_tokens=False).input_ids for i in order]
    tail = [t for r in recalls for t in r]
    room = length - len(tail) - sum(len(s) for s in statements)
    if room < length // 4:
        raise ValueError(
            f"data.retrieval_records={records} leaves too little text in a block of {length} tokens; "
            "lower data.retrieval_records or raise data.seq_len"
        )
    filler = list(text[:room])
    cuts = np.sort(rng.integers(0, int(room * 0.9) + 1, records))
    out: list[int] = []
    last = 0
    for cut, statement in zip(cuts, statements):
        out += filler[last:cut] + statement
        last = cut
    out += filler[last:] + tail
    assert len(out) == length
    return np.asarray(out, dtype=np.int64)


def mix_retrieval(blocks: np.ndarray, tokenizer, fraction: float, records: int, seed: int) -> np.ndarray:
    """Turn ``round(fraction * n)`` of the ``(n, L)`` blocks (chosen by ``seed``) into retrieval blocks."""
    if fraction <= 0:
        return blocks
    rng = np.random.default_rng([seed, 7919])
    n = len(blocks)
    chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
    out = blocks.copy()
    for i in chosen:
        out[i] = retrieval_block(blocks[i], tokenizer, records, rng)
    return out
