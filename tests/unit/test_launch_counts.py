"""``ctxext.bench.launches`` and ``benchmarks/launch_counts.py``: what one call of the shipped attention asks
of a GPU, counted on a CPU with the kernels not run."""

from __future__ import annotations

import json

import pytest
import torch

from ctxext.bench.launches import KERNELS, OpCounter, counted_launches

from ..benchmark_script import load_benchmark

pytest.importorskip("triton")


def test_op_counter_counts_each_aten_call():
    x = torch.ones(3)
    with OpCounter() as ops:
        (x + 1).mul_(2).sum()
    assert ops.calls == 3


def test_counted_launches_restore_the_kernels_and_fill_the_choice_with_no_block():
    import importlib

    from ctxext._kernels import choose

    real = {(m, n): getattr(importlib.import_module(m), n) for m, names in KERNELS.items() for n in names}
    seen = []
    with counted_launches(run=False, on_launch=lambda fn, args, kwargs: seen.append(fn)) as counts:
        index = torch.zeros(2, 3, dtype=torch.int32)
        choose.choose_bound_kernel[(1, 1)](None, None, None, None, index)
    assert counts == {"choose_bound_kernel": 1} and seen == [real[("ctxext._kernels.choose", "choose_bound_kernel")]]
    assert (index == -1).all()
    assert all(getattr(importlib.import_module(m), n) is k for (m, n), k in real.items())


def test_the_fused_choice_makes_the_forward_a_constant_count(tmp_path, capsys):
    module = load_benchmark("launch_counts")
    out = tmp_path / "counts.json"
    rows = module.main(["--lengths", "1k,2k", "--threads", "1", "--out", str(out)])
    by = {(r["n"], r["choice"]): r for r in rows}
    fused = [by[(n, "fused")] for n in (1024, 2048)]
    chunked = [by[(n, "pytorch")] for n in (1024, 2048)]
    assert fused[0]["op_calls"] == fused[1]["op_calls"] and fused[0]["launches"] == fused[1]["launches"] == 5
    assert fused[0]["by_kernel"] == {"choose_bound_kernel": 1, "choose_exact_kernel": 1, "choose_top_kernel": 1,
                                     "hop_fwd_kernel": 1, "retrieve_fwd_kernel": 1}  # fmt: skip
    assert chunked[0]["launches"] == 2 and chunked[0]["op_calls"] < chunked[1]["op_calls"]
    assert fused[1]["op_calls"] < chunked[1]["op_calls"]
    assert json.loads(out.read_text())["rows"] == rows
    assert "| 2048 | forward | fused |" in capsys.readouterr().out


def test_op_counter_sees_inside_the_projects_custom_ops():
    from ctxext.attention.triton_retrieve import ta_choose

    def body():
        return torch.ones(2).add(1).mul(2).int()

    with OpCounter() as alone:
        body()
    calls = []
    real = ta_choose._init_fn
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ta_choose, "_init_fn", lambda *a: calls.append(len(a)) or body())
        args = (*[torch.zeros(1)] * 6, 1, 1, True, 1, 1, "ieee")
        with OpCounter() as ops:
            ta_choose(*args)
    assert calls == [12] and alone.calls >= 4 and ops.calls == 1 + alone.calls  # the op, then what it runs
    assert ta_choose._init_fn is real
