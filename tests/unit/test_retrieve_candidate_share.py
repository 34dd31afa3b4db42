"""``retrieve_candidate_share = s``: each query's bound proposes ``max(C, ceil(s x its far blocks))``
candidates, so they grow with the length (quality study, round 22). Checked against the brute-force
choice (chunks of queries with different counts), against the exact score at ``s = 1``, for
causality (a prefix and a decode step choose as the whole pass), the count itself, and the convert
flag with the decode cache (the torch backend against the reference and the errors:
tests/unit/test_retrieve_score_block.py; the fused choice declines it: tests/unit/test_fused_choice.py)."""

from __future__ import annotations

import pytest
import torch

from ctxext.attention import retrieve
from ctxext.attention.options import TensorizedOptions
from ctxext.attention.retrieve import candidate_count, far_block_index, length_advice

from .convert_flag_check import check_convert_flag
from .far_block_brute_force import OPTS, as_sets, brute_force_two_stage, case
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(params=["over-union", "by-block"])
def exact_path(request, monkeypatch):
    """Each choice runs with the exact stage on either path (``retrieve.UNION_MAX_RATIO``)."""
    monkeypatch.setattr(retrieve, "UNION_MAX_RATIO", 10**9 if request.param == "over-union" else 0)
    return request.param


@pytest.mark.parametrize("fixed", [0, 3])
def test_a_share_chooses_as_the_brute_force_in_chunks_of_mixed_counts(monkeypatch, exact_path, fixed):
    """Queries 64..199 have 2..10 far blocks of 16: with s = 0.5 they propose 2..5 (at least 3 with
    C = 3), and chunks of 7 queries mix counts, so a chunk's widest query must not widen the others."""
    qs, ks, key_ok = case()
    monkeypatch.setattr(retrieve, "SELECT_SCORE_BUDGET", 4 * 13 * 7)  # 7 queries per chunk of bounds
    monkeypatch.setattr(retrieve, "EXACT_SCORE_BUDGET", 3000)
    opts = TensorizedOptions(**OPTS, retrieve_candidates=fixed, retrieve_candidate_share=0.5).validate()
    got = as_sets(far_block_index(qs, ks, key_ok, opts, 32))
    assert got == brute_force_two_stage(qs, ks, key_ok, 2, max(fixed, 2), 32, 16, share=0.5)
    widest = brute_force_two_stage(qs, ks, key_ok, 2, 5, 32, 16)
    assert got != widest, "every query proposing the widest count must choose differently somewhere"
    narrow = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=fixed), 32))
    assert got != narrow, "the share must change the choice somewhere, or this shows nothing"


def test_a_small_share_is_the_fixed_count(exact_path):
    """(The whole share is the exact score: tests/unit/test_retrieve_candidates.py.)"""
    qs, ks, key_ok = case(seed=1)
    fixed = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=4), 32)
    small = TensorizedOptions(**OPTS, retrieve_candidates=4, retrieve_candidate_share=0.1)  # ceil(0.1 x 10) = 1 < 4
    assert torch.equal(far_block_index(qs, ks, key_ok, small, 32), fixed)


def test_the_choice_stays_causal_a_prefix_and_a_decode_step_choose_as_the_whole_pass(exact_path):
    """The count is of each query's own past: a shorter pass, or one query with the cache's keys, chooses
    what the whole pass chose for it (a share of all the pass's blocks would not). The same blocks, not
    always in the same order: a query re-ranked beside wider ones lists its blocks by exact score."""
    qs, ks, key_ok = case(seed=2)
    opts = TensorizedOptions(**OPTS, retrieve_candidate_share=0.4).validate()
    whole = far_block_index(qs, ks, key_ok, opts, 32)
    prefix = far_block_index(qs[:, :, :130], ks[:, :, :130], key_ok[:, :130], opts, 32)
    assert as_sets(prefix) == as_sets(whole[:, :, :130])
    for slot in (70, 150, 199):  # 2, 7 and 10 far blocks: 2, 3 and 4 candidates
        step = far_block_index(qs[:, :, slot : slot + 1], ks[:, :, : slot + 1], key_ok[:, : slot + 1], opts, 32,
                               q_slots=torch.tensor([slot]))  # fmt: skip
        assert as_sets(step) == as_sets(whole[:, :, slot : slot + 1]), f"slot {slot}"


def test_the_count_is_the_largest_of_the_read_blocks_the_fixed_count_and_the_share():
    far = torch.tensor([0, 1, 100, 128, 129, 320, 512])
    shared = TensorizedOptions(retrieve=8, retrieve_candidates=32, retrieve_candidate_share=0.25)
    assert candidate_count(shared, far, 8).tolist() == [32, 32, 32, 32, 33, 80, 128]
    tenth = TensorizedOptions(retrieve=8, retrieve_candidate_share=0.1)  # 0.1 x 320 is 32.000000000000004 in floats
    assert candidate_count(tenth, far, 8).tolist() == [8, 8, 10, 13, 13, 32, 52]
    off = TensorizedOptions(retrieve=8, retrieve_candidates=32)
    assert candidate_count(off, far, 8).tolist() == [32] * 7
    assert candidate_count(TensorizedOptions(retrieve=8), far, 3).tolist() == [3] * 7, "top caps at nb"


def test_convert_flag_reaches_the_model_and_the_decode_cache_matches_one_forward(tmp_path):
    """Blocks of 4 read 2 at a time, 2 fixed candidates: with half the far blocks as candidates a query
    proposes more than 2 from slot 32 on (5 far blocks holding keys; before it at most 3)."""
    flags = ["--retrieve", "2", "--retrieve-block", "4", "--retrieve-candidates", "2"]
    flags += ["--retrieve-candidate-share", "0.5"]
    check_convert_flag(tmp_path, flags, "retrieve_candidate_share", 0.5, off=0.0, same_before=32, bad_value="2")


def test_the_length_advice_for_the_shipped_choice_starts_past_16k_and_a_quarter_share_silences_it():
    shipped = TensorizedOptions(sinks=4, local="window", long_range=False, retrieve=8, retrieve_block=64,
                                retrieve_candidates=32)  # fmt: skip
    assert length_advice(shipped, 16_384) is None, "252 far blocks for 32 candidates: 4 / 6 needles measured"
    note = length_advice(shipped, 32_768)
    assert note and "32 candidates of up to 508 far blocks" in note and "retrieve_candidate_share=0.5" in note
    shared = TensorizedOptions(**{**shipped.to_dict(), "block_sizes": (128,), "retrieve_candidate_share": 0.25})
    assert length_advice(shared, 131_072) is None
    assert length_advice(TensorizedOptions(sinks=4), 131_072) is None, "no retrieval, nothing to advise"
