"""``retrieve_candidates = C``: a two-stage far-block choice. The bound proposes each query's C best
far blocks, the exact ``max q . k`` over their keys picks the ``retrieve`` best of them. Checked
against a brute-force choice, against the exact score when every block is a candidate, against the
bound alone when C = retrieve; the convert flag and the decode cache (the torch backend against the
reference and the errors: tests/unit/test_retrieve_score_block.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctxext.attention import retrieve
from ctxext.attention.options import TensorizedOptions
from ctxext.attention.retrieve import far_block_index

from .convert_flag_check import check_convert_flag, converted_settings
from .far_block_brute_force import OPTS, as_sets, brute_force_two_stage, case
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(params=["over-union", "by-block"])
def exact_path(request, monkeypatch):
    """Each test of the choice runs with the exact stage on either path (``retrieve.UNION_MAX_RATIO``)."""
    monkeypatch.setattr(retrieve, "UNION_MAX_RATIO", 10**9 if request.param == "over-union" else 0)
    return request.param


def test_two_stages_choose_as_the_brute_force(monkeypatch, exact_path):
    qs, ks, key_ok = case()
    monkeypatch.setattr(retrieve, "EXACT_SCORE_BUDGET", 3000)  # the exact stage in several chunks of queries
    got = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=4), 32))
    assert got == brute_force_two_stage(qs, ks, key_ok, 2, 4, 32, 16)
    bound = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS), 32))
    exact = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32))
    agree = [sum(a == w for h in range(4) for a, w in zip(x[h], exact[h])) for x in (bound, got)]
    assert agree[1] > agree[0], f"re-ranking 4 candidates agrees with the exact choice more often: {agree}"
    assert got != exact, "4 of up to 10 far blocks as candidates must miss the exact choice somewhere"


def test_every_block_a_candidate_is_the_exact_score_and_retrieve_many_is_the_bound(exact_path):
    qs, ks, key_ok = case(seed=1)
    exact = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32)
    for every in (
        {"retrieve_candidates": 100},
        {"retrieve_candidate_share": 1.0},
    ):  # the share: test_retrieve_candidate_share.py
        assert as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, **every), 32)) == as_sets(exact), every
    bound = far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS), 32)
    assert torch.equal(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=2), 32), bound)
    assert as_sets(bound) != as_sets(exact), "the bound must choose differently somewhere, or this shows nothing"


def test_candidates_compose_with_sub_block_scores(exact_path):
    """The first stage ranks by the score ``retrieve_score_block`` sets; with every block a candidate the
    second stage makes any first stage exact."""
    qs, ks, key_ok = case(seed=2)
    exact = as_sets(far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_score_block=1), 32))
    for s in (4, 16):
        opts = TensorizedOptions(**OPTS, retrieve_score_block=s, retrieve_candidates=100)
        assert as_sets(far_block_index(qs, ks, key_ok, opts, 32)) == exact


@pytest.mark.parametrize("budget", [1 << 24, 700], ids=["one-chunk", "chunks"])
def test_both_exact_paths_score_every_pair_as_the_plain_product(monkeypatch, budget):
    """Batch of 2, GQA, unretrievable keys (a whole block of them), a partial last block, and one block
    proposed by every query (many tiles of queries for it) beside blocks proposed by few."""
    monkeypatch.setattr(retrieve, "EXACT_SCORE_BUDGET", budget)
    torch.manual_seed(3)
    b, hq, hkv, length, d, m, c = 2, 6, 2, 150, 8, 8, 5
    qs, ks = torch.randn(b, hq, length, d), torch.randn(b, hkv, length, d)
    key_ok = torch.rand(b, length) > 0.2
    key_ok[1, 40:48] = False  # block 5 of row 1 holds no retrievable key
    nb = -(-length // m)
    index = torch.randint(0, nb, (b, hq, length, c))
    index[..., 0] = 5
    k_pad, ok_pad = F.pad(ks, (0, 0, 0, nb * m - length)), F.pad(key_ok, (0, nb * m - length))
    qk = torch.einsum("bhqd,bhkd->bhqk", qs, k_pad.repeat_interleave(hq // hkv, dim=1))  # (B, Hq, Q, nb * m)
    qk = qk.masked_fill(~ok_pad[:, None, None], float("-inf")).view(b, hq, length, nb, m).amax(-1)
    want = qk.gather(-1, index)  # (B, Hq, Q, C)
    union = retrieve.exact_scores_over_union(qs, k_pad, ok_pad, index, m)
    by_block = retrieve.exact_scores_by_block(qs, k_pad, ok_pad, index, m)
    for name, got in (("over the union", union), ("by block", by_block)):
        assert got.shape == want.shape
        assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{name}: -inf where a block has no key"
        assert torch.allclose(got[torch.isfinite(want)], want[torch.isfinite(want)], atol=1e-5), name
    assert torch.isinf(want[1, :, :, 0]).all(), "the case must hold a candidate block without a retrievable key"


def test_the_exact_path_follows_the_share_of_candidates_in_the_far_blocks(monkeypatch):
    calls = []
    for name in ("exact_scores_over_union", "exact_scores_by_block"):
        monkeypatch.setattr(retrieve, name, lambda *a, name=name: calls.append(name))
    k_pad, ok_pad = torch.zeros(1, 1, 64 * 4, 2), torch.ones(1, 64 * 4, dtype=torch.bool)  # 64 blocks of 4
    for c in (32, 31):
        retrieve.exact_block_scores(
            torch.zeros(1, 1, 3, 2), k_pad, ok_pad, torch.zeros(1, 1, 3, c, dtype=torch.long), 4
        )
    assert calls == ["exact_scores_over_union", "exact_scores_by_block"], "union up to 2x the candidates"


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


@pytest.mark.parametrize(
    ("args", "want"),
    [([], 32), (["--retrieve", "2"], 8), (["--retrieve", "0"], 0), (["--retrieve-candidates", "0"], 0),
     (["--retrieve-candidates", "12"], 12)],
)  # fmt: skip
def test_convert_defaults_to_four_candidates_per_retrieved_block(tmp_path, args, want):
    """Rounds 13-15: 32 candidates for 8 retrieved blocks found 5 of 6 needles at 16k, the bound alone 1."""
    assert converted_settings(tmp_path, args)["retrieve_candidates"] == want
