"""``retrieve_score_block = s``: a far block is scored by the largest bound on ``q . k`` over its
sub-blocks of s slots. Checked against a brute-force choice; s = the retrieved block is the
shipped score, s = 1 the exact ``max q . k``; the torch backend against the reference; the convert
flag, the decode cache and the errors."""

from __future__ import annotations

import pytest
import torch

from ctxext.attention import retrieve
from ctxext.attention.options import TensorizedConfigError, TensorizedOptions
from ctxext.attention.retrieve import far_block_index, retrievable_keys

from . import operator_cases as oc
from .convert_flag_check import check_convert_flag
from .far_block_brute_force import OPTS, as_sets, brute_force_top, case
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)


def test_each_score_block_chooses_as_the_brute_force_and_one_is_the_exact_max(monkeypatch):
    qs, ks, key_ok = case()
    shipped = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS), 32)
    assert torch.equal(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=16), 32), shipped)
    monkeypatch.setattr(retrieve, "SELECT_SCORE_BUDGET", 1000)  # several chunks of queries
    exact = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32))
    scores = torch.einsum("hqd,hkd->hqk", qs[0], ks[0].repeat_interleave(2, dim=0))
    scores[:, :, ~key_ok[0]] = float("-inf")
    for h, q in ((0, 199), (3, 150), (1, 96)):  # s = 1 by the plain max of q . k
        best = {b: float(scores[h, q, b * 16 : b * 16 + 16].max()) for b in range((q // 32 * 32 - 32) // 16)}
        assert exact[h][q] == sorted(sorted(best, key=best.get, reverse=True)[:2])
    brute = {s: brute_force_top(qs, ks, key_ok, 2, 32, 16, s) for s in (1, 4, 16)}
    assert exact == brute[1] and as_sets(shipped) == brute[16]
    finer = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=4), 32))
    assert finer == brute[4]
    assert brute[16] != brute[1], "the bound must choose differently somewhere, or this test shows nothing"
    agree = [sum(a == w for h in range(4) for a, w in zip(x[h], brute[1][h])) for x in (brute[16], finer)]
    assert agree[1] > agree[0], f"a finer score agrees with the exact choice more often: {agree}"


def test_a_sub_block_without_keys_never_scores():
    """With every real bound negative, an empty sub-block scored 0 would win every choice."""
    qs, ks, _ = case(120)
    qs, ks = -qs.abs(), ks.abs()
    valid = torch.ones(1, 120, dtype=torch.bool)
    valid[0, 36:40] = False  # the last sub-block of 4 of far block 2 (slots 32..47) has no key
    key_ok = retrievable_keys(valid, 3)
    opts = TensorizedOptions(**OPTS, retrieve_score_block=4)
    got = as_sets(far_block_index(qs, ks, key_ok, opts, 32))
    assert got == brute_force_top(qs, ks, key_ok, 2, 32, 16, 4)
    eligible = [(h, q) for h in range(4) for q in range(120) if (q // 32 * 32 - 32) // 16 > 3]
    assert any(2 not in got[h][q] for h, q in eligible), "block 2 must not win merely for its empty sub-block"


def test_every_eligible_block_is_chosen_whatever_the_score():
    qs, ks, key_ok = case()
    every = {**OPTS, "retrieve": 16}
    sets = [as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**every, retrieve_score_block=s), 32))
            for s in (0, 4, 1)]  # fmt: skip
    assert sets[0] == sets[1] == sets[2]


@pytest.mark.parametrize(
    "choice",
    [{"retrieve_score_block": 1}, {"retrieve_candidates": 4}, {"retrieve_candidate_share": 0.75}],
    ids=["exact-score", "two-stage", "candidate-share"],
)
@pytest.mark.parametrize(("rope", "frame"), [("absolute", "stacked"), ("axis", "stacked"), ("axis", "ordered")])
def test_torch_matches_reference(rope, frame, choice):
    """Also for the two-stage choice (``retrieve_candidates``, tests/unit/test_retrieve_candidates.py) and
    candidates as a share of the far blocks (tests/unit/test_retrieve_candidate_share.py)."""
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=45, seed=5)
    opts = {"rope": rope, "sinks": 2, "local": "window", "merge": "lse", "long_range": False, "retrieve": 2,
            "retrieve_frame": frame, "retrieve_block": 4, **choice}  # fmt: skip
    got = oc.run_slots("torch", q, k, v, (8,), opts)
    oc.assert_close(got, oc.run_slots("reference", q, k, v, (8,), opts), 1e-12, "torch vs reference")
    whole = oc.run_slots("torch", q, k, v, (8,), {**opts, **dict.fromkeys(choice, 0)})
    assert (got - whole).abs().max() > 1e-6, "the finer choice must choose differently from the bound here"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("retrieve_score_block", 3, "3 does not divide the retrieved block of 4 slots"),
     ("retrieve_score_block", -1, "expected 0"), ("retrieve_score_block", True, "expected 0"),
     ("retrieve_score_block", "2", "expected 0"),
     ("retrieve_candidates", 1, "1 candidates cannot hold the 2 blocks retrieved"),
     ("retrieve_candidates", -1, "expected 0"), ("retrieve_candidates", True, "expected 0"),
     ("retrieve_candidates", "8", "expected 0"),
     ("retrieve_candidate_share", 1.5, "expected a share"), ("retrieve_candidate_share", -0.25, "expected a share"),
     ("retrieve_candidate_share", True, "expected a share"), ("retrieve_candidate_share", "0.25", "expected a share"),
     ("retrieve_candidate_share", float("nan"), "expected a share")],
)  # fmt: skip
def test_a_bad_choice_setting_is_named(key, value, message):
    """Also ``retrieve_candidates`` and ``retrieve_candidate_share`` (tests/unit/test_retrieve_candidates.py,
    tests/unit/test_retrieve_candidate_share.py)."""
    with pytest.raises(TensorizedConfigError, match=rf"tensorized_attention\.{key}: {message}"):
        TensorizedOptions.from_dict({"block_sizes": [8], "retrieve": 2, "retrieve_block": 4, key: value})


def test_convert_flag_reaches_the_model_and_the_decode_cache_matches_one_forward(tmp_path):
    """The bound alone (``--retrieve-candidates 0``): the default two-stage choice re-ranks by the exact
    score anyway, so a finer bound changes nothing here."""
    flags = ["--retrieve", "2", "--retrieve-block", "4", "--retrieve-candidates", "0", "--retrieve-score-block", "1"]
    check_convert_flag(tmp_path, flags, "retrieve_score_block", 1, off=0, same_before=24, bad_value="3")
