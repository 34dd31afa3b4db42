"""``score_budget.SCALE``: the far-block choice in fewer, larger chunks of queries gives the same choice
(both stages; each exact-stage path's chunk invariance: test_retrieve_candidates.py); ``ctxext bench
--score-budget-scale`` applies it and records it."""

from __future__ import annotations

import json

import pytest
import torch

from ctxext.attention import retrieve, score_budget
from ctxext.attention.options import TensorizedOptions

from .far_block_brute_force import OPTS, case
from .test_bench import invoke, invoke_retrieval_attention


def _chunks_and_choice(monkeypatch, scale: int) -> tuple[int, int, torch.Tensor]:
    """Chunks of the bound stage and of the exact stage, and the choice, with small base budgets times scale."""
    calls = {"bound": 0, "exact": 0}
    exact = retrieve.exact_scores_by_block

    def counting_exact(*args):
        calls["bound"] += 1  # the bound stage calls the exact stage once per chunk of its queries
        return exact(*args)

    monkeypatch.setattr(retrieve, "exact_scores_by_block", counting_exact)
    monkeypatch.setattr(retrieve, "UNION_MAX_RATIO", 0)  # the per-block exact path (long lengths)
    monkeypatch.setattr(retrieve, "SELECT_SCORE_BUDGET", 4 * 13 * 10)  # 10 queries a chunk at scale 1
    monkeypatch.setattr(retrieve, "EXACT_SCORE_BUDGET", 4 * 4 * 16 * 5)  # 5 queries a chunk at scale 1
    sort = torch.sort

    def counting_sort(*args, **kwargs):
        calls["exact"] += 1  # one sort of (query, candidate) pairs per chunk of the exact stage
        return sort(*args, **kwargs)

    monkeypatch.setattr(retrieve.torch, "sort", counting_sort)
    qs, ks, key_ok = case()
    with score_budget.scaled(scale):
        index = retrieve.far_block_index(qs, ks, key_ok, TensorizedOptions(**OPTS, retrieve_candidates=4), 32)
    monkeypatch.undo()
    return calls["bound"], calls["exact"], index


def test_a_larger_scale_means_fewer_chunks_and_the_same_choice(monkeypatch):
    bound_1, exact_1, index_1 = _chunks_and_choice(monkeypatch, 1)
    bound_8, exact_8, index_8 = _chunks_and_choice(monkeypatch, 8)
    assert (bound_1, bound_8) == (20, 3), "200 queries: 10 a chunk, then 80 a chunk"
    assert (exact_1, exact_8) == (40, 5), "5 queries an exact chunk (2 per bound chunk), then 40 (2 + 2 + 1)"
    assert torch.equal(index_1, index_8) and (index_1 >= 0).any()
    assert score_budget.SCALE == 1, "the scale is restored"


def test_a_bad_scale_is_refused():
    with pytest.raises(ValueError, match="must be >= 1, got 0"), score_budget.scaled(0):
        pass


def test_bench_applies_and_records_the_scale(tmp_path, monkeypatch):
    seen = []
    budget = score_budget.budget
    monkeypatch.setattr(score_budget, "budget", lambda base: seen.append(score_budget.SCALE) or budget(base))
    result, text = invoke_retrieval_attention(tmp_path, "--score-budget-scale", "16")
    assert result.exit_code == 0, text
    assert seen and set(seen) == {16}, "every chunked choice in the timed calls ran at the scale asked for"
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["score_budget_scale"] == 16 and "--score-budget-scale 16" in data["command"]
    assert "Score chunks 16x the default" in (tmp_path / "bench.md").read_text()
    assert score_budget.SCALE == 1
    bad, text = invoke("--model", "tiny-random:llama", "--score-budget-scale", "0", "--out", tmp_path / "b")
    assert bad.exit_code == 2 and "--score-budget-scale must be at least 1, got 0" in text
