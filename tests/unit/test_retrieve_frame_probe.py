"""``benchmarks/retrieve_frame_probe.py``: the blocks are chosen and read in the frames it is told.

The probe's numbers in docs/RESULTS.md (round 5) rest on it patching the torch backend by name;
these tests fail if those names move or the probe wires the wrong tensors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ctxext.attention.torch_backend as tb
from ctxext.attention.options import TensorizedOptions
from ctxext.attention.retrieve import far_block_index, retrievable_keys, selection_frame
from ctxext.attention.rope import rerotate

from ..benchmark_script import load_benchmark
from . import operator_cases as oc

L, N = 64, 8  # 8 blocks of 8: far blocks exist for most queries


@pytest.fixture
def probe(monkeypatch):
    """The probe's ``split_frames``, with the backend's names restored after the test; records
    what the attention over retrieved blocks receives."""
    for name in ("selection_frame", "far_block_index"):
        monkeypatch.setattr(tb, name, getattr(tb, name))
    seen: dict = {}
    attend = tb.read_chosen_blocks

    def spy(qs, ks, v, index, *rest):
        seen.update(qs=qs, ks=ks, chosen=index)
        return attend(qs, ks, v, index, *rest)

    monkeypatch.setattr(tb, "read_chosen_blocks", spy)
    module = load_benchmark("retrieve_frame_probe")
    return module.split_frames, seen


def _run(seen: dict) -> tuple[TensorizedOptions, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    opts = TensorizedOptions(block_sizes=[N], sinks=2, local="window", rope="axis", long_range=False, retrieve=2)
    q, k, v = torch.randn(1, 4, L, 16), torch.randn(1, 2, L, 16), torch.randn(1, 2, L, 16)
    inv = oc.rope_inv_freq(16)
    seen["out"] = tb.torch_tensorized_attention(q, k, v, opts, inv_freq=inv)
    return opts, q, k, inv


def _expected(opts, q, k, inv, choose: str, attend: str):
    positions = torch.arange(L, dtype=torch.float32)[None]
    frames = {
        f: selection_frame(q, k, positions, dataclasses.replace(opts, rope=f), inv, N) for f in ("absolute", "axis")
    }
    key_ok = retrievable_keys(torch.ones(1, L, dtype=torch.bool), opts.sinks)
    return frames[attend][1], far_block_index(*frames[choose], key_ok, opts, N)


@pytest.mark.parametrize("choose,attend", [("absolute", "axis"), ("axis", "absolute"), ("absolute", "absolute")])
def test_blocks_are_chosen_and_read_in_the_frames_asked_for(probe, choose, attend):
    split_frames, seen = probe
    split_frames(choose, attend)
    opts, q, k, inv = _run(seen)
    keys, chosen = _expected(opts, q, k, inv, choose, attend)
    other_keys, other_chosen = _expected(opts, q, k, inv, attend, choose)
    assert torch.allclose(seen["ks"], keys, atol=1e-5) and torch.equal(seen["chosen"], chosen)
    if choose != attend:  # the two frames really differ here, so the checks above can fail
        assert not torch.allclose(seen["ks"], other_keys, atol=1e-3)
        assert not torch.equal(seen["chosen"], other_chosen)


def test_axis_in_both_halves_is_the_backend_unchanged(probe):
    split_frames, seen = probe
    plain: dict = {}
    _run(plain)  # not yet patched by the probe: the backend as shipped
    split_frames("axis", "axis")
    _run(seen)
    assert torch.equal(seen["out"], plain["out"])


def test_gap_moves_the_retrieved_keys_further_back(probe):
    split_frames, seen = probe
    split_frames("axis", "axis", gap=24)
    opts, q, k, inv = _run(seen)
    keys, _ = _expected(opts, q, k, inv, "axis", "axis")
    assert torch.allclose(seen["ks"], rerotate(keys, torch.tensor(-24.0), inv), atol=1e-5)
    assert not torch.allclose(seen["ks"], keys, atol=1e-3)
