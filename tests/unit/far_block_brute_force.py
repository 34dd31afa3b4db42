"""The far-block choice by brute force, shared by the retrieval choice tests
(test_retrieve_score_block.py, test_retrieve_candidates.py): every (query head, query, far block)
scored in plain Python loops, so the vectorised ``retrieve.far_block_index`` has something
independent to agree with. Sizes: far blocks of m slots, a causal window of 2n, batch row 0."""

from __future__ import annotations

import math

import torch

from ctxext.attention.retrieve import retrievable_keys

# Four query heads over two key heads (GQA), blocks of 32 with a window, 2 far blocks of 16 read.
OPTS = dict(block_sizes=(32,), sinks=3, local="window", long_range=False, retrieve=2, retrieve_block=16)


def case(length: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``qs (1, 4, L, 8)``, ``ks (1, 2, L, 8)`` and ``key_ok (1, L)`` (3 sinks); the last far block partial."""
    torch.manual_seed(seed)
    qs, ks = torch.randn(1, 4, length, 8), torch.randn(1, 2, length, 8)
    return qs, ks, retrievable_keys(torch.ones(1, length, dtype=torch.bool), sinks=3)


def as_sets(index: torch.Tensor) -> list[list[list[int]]]:
    """``(1, Hq, Q, k)`` block numbers (``-1`` padding) as sorted lists per head and query."""
    return [[sorted(int(i) for i in row if i >= 0) for row in head] for head in index[0]]


def block_scores(qs, ks, key_ok, n: int, m: int, s: int) -> list[list[tuple[dict, dict]]]:
    """Per (query head, query): ``(bound, exact)`` dicts over its eligible far blocks of m slots.

    bound: the largest ``sum_d max(q_d kmin_d, q_d kmax_d)`` over the block's sub-blocks of s slots
    that hold a retrievable key; exact: ``max q . k`` over the block's retrievable keys. A far block
    ends before the query's window (its block of n and the previous one) starts.
    """
    hq, length = qs.shape[1], qs.shape[2]
    keys = ks[0].repeat_interleave(hq // ks.shape[1], dim=0)  # (Hq, L, D)
    out = []
    for h in range(hq):
        rows = []
        for q in range(length):
            bound, exact = {}, {}
            for blk in range(max(q // n * n - n, 0) // m):
                for sub in range(blk * m, blk * m + m, s):
                    real = [t for t in range(sub, min(sub + s, length)) if key_ok[0, t]]
                    if real:
                        kk, qq = keys[h, real], qs[0, h, q]
                        score = float(torch.maximum(qq * kk.amin(0), qq * kk.amax(0)).sum())
                        bound[blk] = max(bound.get(blk, float("-inf")), score)
                        exact[blk] = max(exact.get(blk, float("-inf")), float((kk @ qq).max()))
            rows.append((bound, exact))
        out.append(rows)
    return out


def best(scores: dict, among, top: int) -> list[int]:
    """The ``top`` blocks of ``among`` with the highest ``scores``, sorted by block number."""
    return sorted(sorted(among, key=scores.get, reverse=True)[:top])


def brute_force_top(qs, ks, key_ok, top: int, n: int, m: int, s: int) -> list[list[list[int]]]:
    """One stage: the ``top`` far blocks by the bound over sub-blocks of s (s = m: the shipped score)."""
    return [[best(bound, bound, top) for bound, _ in head] for head in block_scores(qs, ks, key_ok, n, m, s)]


def brute_force_two_stage(
    qs, ks, key_ok, top: int, proposed: int, n: int, m: int, share: float = 0.0
) -> list[list[list[int]]]:
    """Two stages: the ``proposed`` best far blocks by the whole-block bound (with ``share``: at least
    ``ceil(share x`` the query's far blocks holding a retrievable key``)``), then the ``top`` of those
    with the largest exact ``max q . k``."""
    return [
        [
            best(exact, sorted(bound, key=bound.get, reverse=True)[: max(proposed, math.ceil(share * len(bound)))], top)
            for bound, exact in head
        ]
        for head in block_scores(qs, ks, key_ok, n, m, m)
    ]
