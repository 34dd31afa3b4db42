"""``ctxext.attention.fused_choice``: which settings the fused far-block choice serves, the PyTorch
choice for the rest, and ``ctxext bench --no-fused-choice``. The kernels themselves are checked
against the PyTorch choice in ``tests/kernels`` (interpreter) and compiled for sm_90 there."""

from __future__ import annotations

import json

import pytest
import torch

from ctxext.attention import fused_choice, retrieve, score_budget
from ctxext.attention.options import TensorizedOptions

from .far_block_brute_force import OPTS, case
from .test_bench import invoke_retrieval_attention

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object only: nothing is allocated there


@pytest.mark.parametrize(
    ("change", "dtype", "reason"),
    [
        ({}, torch.float64, "scores in float32, got torch.float64"),
        ({"retrieve_candidates": 65}, torch.float32, "more than 64 candidates"),
        ({"retrieve_candidate_share": 0.25}, torch.float32, "one candidate count for every query"),
    ],
)
def test_settings_the_fused_choice_does_not_serve_say_why(change, dtype, reason):
    opts = TensorizedOptions(**OPTS, **change).validate()
    assert reason in fused_choice.unsupported_reason(opts, dtype, CUDA)
    assert fused_choice.unsupported_reason(TensorizedOptions(**OPTS).validate(), torch.float32, CUDA) is None


@pytest.mark.parametrize("change", [{"retrieve_score_block": 4}, {"retrieve_score_block": 1, "retrieve_candidates": 8}])
def test_sub_block_scores_are_served_by_the_fused_choice(change):
    opts = TensorizedOptions(**OPTS, **change).validate()
    assert fused_choice.unsupported_reason(opts, torch.float32, CUDA) is None


def test_on_the_cpu_only_the_interpreter_runs_it(monkeypatch):
    opts = TensorizedOptions(**OPTS).validate()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "run on CUDA or in Triton's interpreter" in fused_choice.unsupported_reason(opts, torch.float32, CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_choice.unsupported_reason(opts, torch.float32, CPU) is None


def test_switched_off_it_says_so_and_is_restored():
    opts = TensorizedOptions(**OPTS).validate()
    with fused_choice.switched(False):
        assert "switched off" in fused_choice.unsupported_reason(opts, torch.float32, CUDA)
    assert fused_choice.ENABLED and fused_choice.unsupported_reason(opts, torch.float32, CUDA) is None


def test_unsupported_settings_get_the_pytorch_choice_as_int32():
    qs, ks, key_ok = case()
    qs, ks = qs.double(), ks.double()  # float64: the fused kernels do not run
    opts = TensorizedOptions(**OPTS, retrieve_candidates=4).validate()
    got = fused_choice.choose(qs, ks, key_ok, opts, 32, "ieee")
    want = retrieve.far_block_index(qs, ks, key_ok, opts, 32)
    assert got.dtype == torch.int32 and torch.equal(got.long(), want) and (want >= 0).any()


def test_bench_applies_and_records_no_fused_choice(tmp_path, monkeypatch):
    seen = []
    budget = score_budget.budget
    monkeypatch.setattr(score_budget, "budget", lambda base: seen.append(fused_choice.ENABLED) or budget(base))
    result, text = invoke_retrieval_attention(tmp_path, "--no-fused-choice")
    assert result.exit_code == 0, text
    assert seen and set(seen) == {False}, "every choice in the timed calls ran with the fused choice off"
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["fused_choice"] is False and "--no-fused-choice" in data["command"]
    assert "in PyTorch chunks (`--no-fused-choice`)" in (tmp_path / "bench.md").read_text()
    assert fused_choice.ENABLED
