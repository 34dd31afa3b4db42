"""Retrieval-style training sequences: key-value records spread through real text, recalled at the end.

A long-range path only learns to carry information when the loss needs information from far
away. Ordinary text rarely does (a window predicts it almost as well), so a recipe can turn a
fraction of its training blocks into retrieval blocks (``data.retrieval``): ``records`` short
statements ``" Record QXJV holds 48213."`` are spliced into the block's own text at random
places, and the block ends with every record recalled in a new order
(``"\\nRecord QXJV holds 48213."``). Predicting the digits of a recall needs the statement,
which mostly lies beyond any local window. The loss stays on every token: the recalls are the
only unpredictable tokens of the tail, and ordinary text keeps the language model honest.
``data.retrieval_recalls: interleaved`` puts each recall amid the text instead (after code, as a
question sits in a document); quality study round 26 found it no help (0 / 6 needles at 32k against
3 / 6), so the default stays ``tail``.

The wording differs from the evaluation's passkey and needle tasks (``pass key``, ``special
magic number``), so evaluation measures transfer, not memorised phrasing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _record(rng: np.random.Generator) -> tuple[str, str]:
    name = "".join(rng.choice(list(LETTERS), 4))
    code = "".join(str(d) for d in rng.integers(0, 10, 5))
    return name, code


@dataclass
class RetrievalBlock:
    """A retrieval block: ``ids`` ``(L,)`` and, per record, where it is stated and recalled.

    statements[r]: token offset where record r's statement starts; answers[r]: ``(start, end)``
    token offsets of the code in its recall (the tokens a model must retrieve); statement_lengths[r]:
    tokens in record r's statement.
    """

    ids: np.ndarray
    statements: list[int]
    answers: list[tuple[int, int]]
    statement_lengths: list[int]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


RECALL_PLACES = ("tail", "interleaved")


def retrieval_layout(
    text: np.ndarray, tokenizer, records: int, rng: np.random.Generator, recalls: str = "tail"
) -> RetrievalBlock:
    """One retrieval block of ``len(text)`` tokens built on the token ids ``text``.

    text: ``(L,)`` int64 token ids of ordinary text. The result keeps the text (cut to make
    room) with ``records`` statements inserted at random token offsets and their recalls in a
    new order. Recalls are tokenised in pieces (prefix, code, full stop) so the code's tokens
    are known exactly.

    recalls: ``"tail"`` puts the statements in the first 90% of the text and the recalls one
    after another at the end (the block ends with the last recall); only the first recall
    follows ordinary text, the others follow a recall. ``"interleaved"`` puts the statements in
    the first half of the text and each recall at its own random offset in the second half,
    so every recall follows ordinary text and is followed by it, the way a question sits in a
    document (quality study, round 26). ``"tail"`` draws exactly what every recipe before the
    option drew.
    """
    if recalls not in RECALL_PLACES:
        raise ValueError(f"data.retrieval_recalls: one of {', '.join(RECALL_PLACES)}, got {recalls!r}")
    length = len(text)
    pairs: list[tuple[str, str]] = []
    while len(pairs) < records:
        pair = _record(rng)
        if pair[0] not in {p[0] for p in pairs}:
            pairs.append(pair)
    statements = [_ids(tokenizer, f" Record {n} holds {c}.") for n, c in pairs]
    order = rng.permutation(records)
    recall_pieces = [
        (_ids(tokenizer, f"\nRecord {pairs[i][0]} holds"), _ids(tokenizer, f" {pairs[i][1]}"), _ids(tokenizer, "."))
        for i in order
    ]
    tail_len = sum(len(a) + len(b) + len(c) for a, b, c in recall_pieces)
    room = length - tail_len - sum(len(s) for s in statements)
    if room < length // 4:
        raise ValueError(
            f"data.retrieval_records={records} leaves too little text in a block of {length} tokens; "
            "lower data.retrieval_records or raise data.seq_len"
        )
    filler = [int(t) for t in text[:room]]
    if recalls == "tail":
        statement_cuts = np.sort(rng.integers(0, int(room * 0.9) + 1, records))
        recall_cuts = np.full(records, room)
    else:
        half = room // 2
        statement_cuts = np.sort(rng.integers(0, half + 1, records))
        recall_cuts = np.sort(rng.integers(half + 1, room + 1, records))
    # (cut, kind, index) in text order; at equal cuts statements come first, then recalls in their order
    inserts = sorted(
        [(int(c), 0, r) for r, c in enumerate(statement_cuts)] + [(int(c), 1, j) for j, c in enumerate(recall_cuts)]
    )
    out: list[int] = []
    starts: list[int] = []
    answers: list[tuple[int, int]] = [(0, 0)] * records
    last = 0
    for cut, kind, index in inserts:
        out += filler[last:cut]
        last = cut
        if kind == 0:
            starts.append(len(out))
            out += statements[index]
            continue
        prefix, code, stop = recall_pieces[index]
        out += prefix
        answers[order[index]] = (len(out), len(out) + len(code))
        out += code + stop
    out += filler[last:]
    assert len(out) == length
    return RetrievalBlock(np.asarray(out, dtype=np.int64), starts, answers, [len(s) for s in statements])


SPREADS = ("random", "even")


def _draw(n_blocks: int, fraction: float, seed: int, spread: str) -> tuple[np.ndarray, np.random.Generator]:
    """The retrieval blocks in the order their layouts are drawn, and the generator that draws them next."""
    if spread not in SPREADS:
        raise ValueError(f"data.retrieval_spread: one of {', '.join(SPREADS)}, got {spread!r}")
    rng = np.random.default_rng([seed, 7919])
    count = int(round(fraction * n_blocks))
    if spread == "random":
        return rng.choice(n_blocks, size=count, replace=False), rng
    from .data import block_order

    place = np.arange(n_blocks)
    first_pass = (place + 1) * count // n_blocks - place * count // n_blocks == 1  # Bresenham: P -> floor(P c / n)
    return np.sort(block_order(n_blocks, seed, 0)[first_pass]), rng


def retrieval_blocks(n_blocks: int, fraction: float, seed: int, spread: str = "random") -> np.ndarray:
    """Which of ``n_blocks`` training blocks become retrieval blocks: sorted block numbers.

    ``round(fraction * n_blocks)`` of them. ``spread="random"`` draws them at random (the draw
    every recipe before ``data.retrieval_spread`` trained on); a short run that reads only part
    of the corpus then reads a chance number of them. ``spread="even"`` spaces them evenly along
    the order the training loop reads the blocks in its first pass
    (:func:`ctxext.data.block_order`, ``seed`` = ``data.seed``), so that every run reading
    ``P <= n_blocks`` sequences reads ``floor(P * count / n_blocks)`` of them: the fraction of
    the corpus is the fraction of what any run reads.
    """
    return np.sort(_draw(n_blocks, fraction, seed, spread)[0])


def mix_retrieval(
    blocks: np.ndarray,
    tokenizer,
    fraction: float,
    records: int,
    seed: int,
    spread: str = "random",
    recalls: str = "tail",
) -> np.ndarray:
    """Turn the :func:`retrieval_blocks` of the ``(n, L)`` blocks into retrieval blocks.

    recalls: where the recalls go (:func:`retrieval_layout`).
    """
    if fraction <= 0:
        return blocks
    chosen, rng = _draw(len(blocks), fraction, seed, spread)
    out = blocks.copy()
    for i in chosen:
        out[i] = retrieval_layout(blocks[i], tokenizer, records, rng, recalls).ids
    return out


@dataclass
class RetrievalReads:
    """What a run of ``sequences`` reads: ``retrieval_sequences`` of them retrieval blocks.

    ``records`` = ``retrieval_sequences`` x ``data.retrieval_records``; a block read twice
    counts twice. ``corpus_blocks`` / ``corpus_retrieval``: the blocks there are, and how many
    of them are retrieval blocks.
    """

    sequences: int
    retrieval_sequences: int
    records: int
    corpus_blocks: int
    corpus_retrieval: int

    def describe(self) -> str:
        share = self.retrieval_sequences / max(1, self.sequences)
        return (
            f"retrieval: {self.retrieval_sequences:,} of the {self.sequences:,} sequences this run reads carry records "
            f"({share:.0%}, {self.records:,} records); the corpus holds {self.corpus_retrieval:,} retrieval blocks "
            f"of {self.corpus_blocks:,}"
        )


def retrieval_reads(n_blocks: int, data, sequences: int) -> RetrievalReads:
    """Count the retrieval sequences among the first ``sequences`` a run reads.

    n_blocks: the corpus's blocks; data: the recipe's data section (``retrieval``,
    ``retrieval_records``, ``retrieval_spread``, ``seed``); sequences: steps x grad_accum x
    batch_size x data-parallel processes, the reads of :func:`ctxext.data.batch_indices`.
    """
    from .data import read_counts

    chosen = retrieval_blocks(n_blocks, data.retrieval, data.seed, data.retrieval_spread)
    read = int(read_counts(n_blocks, data.seed, sequences)[chosen].sum())
    return RetrievalReads(sequences, read, read * data.retrieval_records, n_blocks, len(chosen))
