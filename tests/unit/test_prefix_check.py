"""``benchmarks/prefix_check.py``: a prefix's per-token NLL from a short pass against a longer pass."""

from __future__ import annotations

import json

import pytest
import torch

from ..benchmark_script import load_benchmark


def test_compare_counts_the_tokens_that_differ_and_where_the_first_is():
    compare = load_benchmark("prefix_check").compare
    short = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = compare(short, torch.tensor([1.0, 2.0, 3.02, 4.00005, 9.0]))  # the 5th is past the prefix: ignored
    assert got["tokens"] == 4
    assert got["max_abs_diff"] == pytest.approx(0.02, abs=1e-6)
    assert got["tokens_over"] == {"1e-05": 2, "0.0001": 1, "0.001": 1, "0.01": 1}
    assert got["first_position_over_1e-05"] == 3  # the third token scored
    assert got["nll_sum_long_prefix"] - got["nll_sum_short"] == pytest.approx(0.02005, abs=1e-5)
    same = compare(short, short)
    assert same["max_abs_diff"] == 0 and same["first_position_over_1e-05"] is None
    with pytest.raises(ValueError, match="fewer than the short pass's 4"):
        compare(short, short[:3])


def test_a_causal_model_scores_the_prefix_alike_in_a_longer_pass(tmp_path, capsys):
    """The tiny tensorized model with the shipped kind of settings (a window, sinks, far blocks chosen in two
    stages, the axis frame): 200 tokens score their first 96 as 96 do, to float rounding."""
    from ctxext.attention.options import TensorizedOptions
    from ctxext.models import apply_tensorized, save_model_dir
    from ctxext.tiny import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    opts = TensorizedOptions(block_sizes=(16,), local="window", long_range=False, retrieve=2, retrieve_block=8,
                             retrieve_candidates=4, sinks=2, merge="lse", rope="axis")  # fmt: skip
    apply_tensorized(model, opts)
    model_dir = save_model_dir(model, byte_tokenizer(), tmp_path / "tiny-ta")
    text = tmp_path / "doc.txt"
    text.write_text("def tensorized(x):\n    return x  # the quick brown fox jumps over the lazy dog\n" * 6)
    out = tmp_path / "prefix.json"
    args = [str(model_dir), "--short", "96", "--long", "200", "--text", str(text), "--threads", "1", "--out", str(out)]
    result = load_benchmark("prefix_check").main(args)
    assert result["tokens"] == 95 and result["long"] == 200
    assert result["max_abs_diff"] < 1e-4, result
    assert result["nll_sum_short"] > 0
    assert json.loads(out.read_text()) == result
    assert '"tokens": 95' in capsys.readouterr().out
    assert result["dtype"] == "float32"
    wide = load_benchmark("prefix_check").main(args[:-2] + ["--float64"])
    assert wide["dtype"] == "float64"
    assert wide["max_abs_diff"] < 1e-10, wide  # no float32 rounding left to differ by
    assert wide["nll_sum_short"] == pytest.approx(result["nll_sum_short"], rel=1e-4)


def test_bad_lengths_and_a_short_document_are_named(tmp_path, capsys):
    module = load_benchmark("prefix_check")
    with pytest.raises(SystemExit):
        module.main(["m", "--short", "8k", "--long", "4k"])
    assert "need 1 < --short < --long" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["m", "--text", str(tmp_path / "missing.txt")])
    assert "missing.txt is not a file" in capsys.readouterr().err
