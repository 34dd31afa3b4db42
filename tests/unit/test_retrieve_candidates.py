"""``retrieve_candidates = C``: a two-stage far-block choice. The bound proposes each query's C best
far blocks, the exact ``max q . k`` over their keys picks the ``retrieve`` best of them. Checked
against a brute-force choice, against the exact score when every block is a candidate, against the
bound alone when C = retrieve; the convert flag and the decode cache (the torch backend against the
reference and the errors: tests/unit/test_retrieve_score_block.py)."""

from __future__ import annotations

import torch

from ctxext.attention import retrieve
from ctxext.attention.options import TensorizedOptions
from ctxext.attention.retrieve import far_block_index

from .convert_flag_check import check_convert_flag
from .far_block_brute_force import OPTS, as_sets, brute_force_two_stage, case
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)


def test_two_stages_choose_as_the_brute_force(monkeypatch):
    qs, ks, key_ok = case()
    monkeypatch.setattr(retrieve, "EXACT_SCORE_BUDGET", 3000)  # the exact stage in several chunks of queries
    got = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=4), 32))
    assert got == brute_force_two_stage(qs, ks, key_ok, 2, 4, 32, 16)
    bound = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS), 32))
    exact = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32))
    agree = [sum(a == w for h in range(4) for a, w in zip(x[h], exact[h])) for x in (bound, got)]
    assert agree[1] > agree[0], f"re-ranking 4 candidates agrees with the exact choice more often: {agree}"
    assert got != exact, "4 of up to 10 far blocks as candidates must miss the exact choice somewhere"


def test_every_block_a_candidate_is_the_exact_score_and_retrieve_many_is_the_bound():
    qs, ks, key_ok = case(seed=1)
    exact = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32)
    every = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=100), 32)
    assert as_sets(every) == as_sets(exact)
    bound = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS), 32)
    assert torch.equal(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=2), 32), bound)
    assert as_sets(bound) != as_sets(exact), "the bound must choose differently somewhere, or this shows nothing"


def test_candidates_compose_with_sub_block_scores():
    """The first stage ranks by the score ``retrieve_score_block`` sets; with every block a candidate the
    second stage makes any first stage exact."""
    qs, ks, key_ok = case(seed=2)
    exact = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32))
    for s in (4, 16):
        opts = TensorizedOptions(**OPTS, retrieve_score_block=s, retrieve_candidates=100)
        assert as_sets(far_block_index(qs, ks, key_ok, opts, 32)) == exact


def test_a_query_with_fewer_eligible_blocks_than_candidates_keeps_minus_one():
    qs, ks, key_ok = case(100)
    index = far_block_index(qs, ks, key_ok, TensorizedOptions(**{**OPTS, "retrieve": 3}, retrieve_candidates=6), 32)
    assert index.shape == (1, 4, 100, 3)
    assert (index[:, :, :64] == -1).all(), "before slot 64 the window covers every earlier block"
    assert (index[:, :, 64:96, :2] >= 0).all() and (index[:, :, 64:96, 2] == -1).all(), "two far blocks of 16"
    assert (index[:, :, 96:] >= 0).all()


def test_convert_flag_reaches_the_model_and_the_decode_cache_matches_one_forward(tmp_path):
    """Before slot 24 at most 2 far blocks of 4 exist: all are chosen, the re-rank changes nothing."""
    flags = ["--retrieve", "2", "--retrieve-block", "4", "--retrieve-candidates", "4"]
    check_convert_flag(tmp_path, flags, "retrieve_candidates", 4, off=0, same_before=24, bad_value="1")
