"""``retrieve_candidates = C``: a two-stage far-block choice. The bound proposes each query's C best
far blocks, the exact ``max q . k`` over their keys picks the ``retrieve`` best of them. Checked
against a brute-force choice, against the exact score when every block is a candidate, against the
bound alone when C = retrieve; the convert flag and the decode cache (the torch backend against the
reference and the errors: tests/unit/test_retrieve_score_block.py)."""

from __future__ import annotations

import torch

from ctxext.attention import retrieve
from ctxext.attention.options import TensorizedOptions
from ctxext.attention.retrieve import far_block_index, retrievable_keys

from .convert_flag_check import check_convert_flag
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)

OPTS = dict(block_sizes=(32,), sinks=3, local="window", long_range=False, retrieve=2, retrieve_block=16)


def _case(length=200, seed=0):
    torch.manual_seed(seed)
    qs, ks = torch.randn(1, 4, length, 8), torch.randn(1, 2, length, 8)  # GQA; far blocks of 16, the last partial
    return qs, ks, retrievable_keys(torch.ones(1, length, dtype=torch.bool), sinks=3)


def _brute_force_two_stage(qs, ks, key_ok, top: int, proposed: int, n: int, m: int) -> list[list[list[int]]]:
    """Batch row 0, per (query head, query): rank the far blocks of m (window of 2n) by the whole-block
    bound ``sum_d max(q_d kmin_d, q_d kmax_d)``, keep the ``proposed`` best, then keep the ``top`` of
    those with the largest exact ``max q . k`` over their retrievable keys."""
    hq, length = qs.shape[1], qs.shape[2]
    keys = ks[0].repeat_interleave(hq // ks.shape[1], dim=0)  # (Hq, L, D)
    out = []
    for h in range(hq):
        rows = []
        for q in range(length):
            bound, exact = {}, {}
            for blk in range(max(q // n * n - n, 0) // m):
                real = [t for t in range(blk * m, min(blk * m + m, length)) if key_ok[0, t]]
                if real:
                    kk = keys[h, real]
                    bound[blk] = float(torch.maximum(qs[0, h, q] * kk.amin(0), qs[0, h, q] * kk.amax(0)).sum())
                    exact[blk] = float((kk @ qs[0, h, q]).max())
            candidates = sorted(bound, key=bound.get, reverse=True)[:proposed]
            rows.append(sorted(sorted(candidates, key=exact.get, reverse=True)[:top]))
        out.append(rows)
    return out


def _as_sets(index: torch.Tensor) -> list[list[list[int]]]:
    return [[sorted(int(i) for i in row if i >= 0) for row in head] for head in index[0]]


def test_two_stages_choose_as_the_brute_force(monkeypatch):
    qs, ks, key_ok = _case()
    monkeypatch.setattr(retrieve, "EXACT_SCORE_BUDGET", 3000)  # the exact stage in several chunks of queries
    got = _as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=4), 32))
    assert got == _brute_force_two_stage(qs, ks, key_ok, 2, 4, 32, 16)
    bound = _as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS), 32))
    exact = _as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32))
    agree = [sum(a == w for h in range(4) for a, w in zip(x[h], exact[h])) for x in (bound, got)]
    assert agree[1] > agree[0], f"re-ranking 4 candidates agrees with the exact choice more often: {agree}"
    assert got != exact, "4 of up to 10 far blocks as candidates must miss the exact choice somewhere"


def test_every_block_a_candidate_is_the_exact_score_and_retrieve_many_is_the_bound():
    qs, ks, key_ok = _case(seed=1)
    exact = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32)
    every = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=100), 32)
    assert _as_sets(every) == _as_sets(exact)
    bound = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS), 32)
    assert torch.equal(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=2), 32), bound)
    assert _as_sets(bound) != _as_sets(exact), "the bound must choose differently somewhere, or this shows nothing"


def test_candidates_compose_with_sub_block_scores():
    """The first stage ranks by the score ``retrieve_score_block`` sets; with every block a candidate the
    second stage makes any first stage exact."""
    qs, ks, key_ok = _case(seed=2)
    exact = _as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32))
    for s in (4, 16):
        opts = TensorizedOptions(**OPTS, retrieve_score_block=s, retrieve_candidates=100)
        assert _as_sets(far_block_index(qs, ks, key_ok, opts, 32)) == exact


def test_a_query_with_fewer_eligible_blocks_than_candidates_keeps_minus_one():
    qs, ks, key_ok = _case(100)
    index = far_block_index(qs, ks, key_ok, TensorizedOptions(**{**OPTS, "retrieve": 3}, retrieve_candidates=6), 32)
    assert index.shape == (1, 4, 100, 3)
    assert (index[:, :, :64] == -1).all(), "before slot 64 the window covers every earlier block"
    assert (index[:, :, 64:96, :2] >= 0).all() and (index[:, :, 64:96, 2] == -1).all(), "two far blocks of 16"
    assert (index[:, :, 96:] >= 0).all()


def test_convert_flag_reaches_the_model_and_the_decode_cache_matches_one_forward(tmp_path):
    """Before slot 24 at most 2 far blocks of 4 exist: all are chosen, the re-rank changes nothing."""
    flags = ["--retrieve", "2", "--retrieve-block", "4", "--retrieve-candidates", "4"]
    check_convert_flag(tmp_path, flags, "retrieve_candidates", 4, off=0, same_before=24, bad_value="1")
