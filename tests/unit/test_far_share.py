"""``benchmarks/far_share.py``: the question and answer scored from a decode cache of the haystack.

The bias-0 variant must give the log-probabilities of one forward pass over the whole needle
(``teacher_forced_logprobs``); lowering the far logits must lower the recorded far share, to 0 at
``inf``; fewer reads must change the result.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ..benchmark_script import load_benchmark
from .test_needle_choice import _tiny_dir

ARGS = ["--lengths", "1024", "--depths", "0.5", "--seeds", "0", "--threads", "1"]


def test_bias_zero_equals_one_forward_pass_and_the_bias_lowers_the_far_share(tmp_path):
    script = load_benchmark("far_share")
    import ctxext.attention.decode as decode
    from ctxext.evaluate.retrieval import teacher_forced_logprobs
    from ctxext.evaluate.runner import ModelEntry, load_entry
    from ctxext.evaluate.tasks import make_sample

    original = (decode.merge_far, decode.far_block_index)
    model_dir = str(_tiny_dir(tmp_path, 4))
    out = tmp_path / "fs.json"
    result = script.main([model_dir, *ARGS, "--shorten", "768", "--bias", "2,inf", "--reads", "1", "--out", str(out),
                          "--plot", str(tmp_path / "fs.png")])  # fmt: skip
    assert (decode.merge_far, decode.far_block_index) == original, "the probe is removed afterwards"
    assert [s.get("cut_from") for s in result["samples"]] == [None, 1024]
    full = result["samples"][0]
    assert [v["variant"] for v in full["variants"]] == ["bias 0", "bias 2", "no far read", "reads 1"]

    model, tok = load_entry(ModelEntry(model_dir, model_dir), torch.device("cpu"))
    sample = make_sample("needle", tok, 1024, 0.5, 0)
    with torch.inference_mode():
        logp = teacher_forced_logprobs(model, sample.input_ids, sample.answer_start)  # (A, V)
    answer = sample.input_ids[sample.answer_start :]
    base, biased, none, fewer = full["variants"]
    expected = [float(logp[i, t]) for i, t in enumerate(answer)]
    assert base["logp_right"] == pytest.approx(expected, abs=2e-4), "the cached path is one forward pass"
    assert base["predicted"] == logp.argmax(-1).tolist()

    layers = model.config.num_hidden_layers
    for v in full["variants"]:
        assert len(v["far_share_first"]) == len(v["far_share_question"]) == layers
        assert all(0.0 <= x <= 1.0 for x in v["far_share_first"] + v["far_share_question"])
    assert min(base["far_share_first"]) > 0.0, "a query past the window reads far blocks"
    # lowering every far logit by b multiplies the far odds by exp(-b), layer by layer, where the inputs
    # are the same; after the first layer they differ, so the check is on the first layer
    odds = [s / (1 - s) for s in (base["far_share_first"][0], biased["far_share_first"][0])]
    assert odds[1] == pytest.approx(odds[0] * math.exp(-2), rel=1e-3)
    assert none["far_share_first"] == [0.0] * layers and none["far_share_question"] == [0.0] * layers
    assert none["logp_right"] != base["logp_right"] and fewer["logp_right"] != base["logp_right"]

    saved = json.loads(out.read_text())
    assert saved["summary"]["1024"]["no far read"]["far_share_first"] == 0.0
    assert saved["summary"]["768 cut from 1024"]["bias 0"]["needles"] == 1
    assert (tmp_path / "fs.png").stat().st_size > 1000


def test_bad_variants_are_refused(tmp_path):
    script = load_benchmark("far_share")
    with pytest.raises(SystemExit, match="--bias"):
        script.parse_variants("-1", "")
    with pytest.raises(SystemExit, match="--reads"):
        script.parse_variants("1", "0")
    assert [v.name for v in script.parse_variants("0,1.5", "2")] == ["bias 0", "bias 1.5", "reads 2"]
    with pytest.raises(SystemExit, match="reads 4 far blocks; give fewer"):
        script.main([str(_tiny_dir(tmp_path, 4)), *ARGS, "--reads", "4", "--out", str(tmp_path / "x.json")])


def test_a_passkey_is_scored_like_a_needle(tmp_path):
    """``--task passkey``: the pass key's answer from the cache equals one forward pass over the passkey sample."""
    script = load_benchmark("far_share")
    from ctxext.evaluate.retrieval import teacher_forced_logprobs
    from ctxext.evaluate.runner import ModelEntry, load_entry
    from ctxext.evaluate.tasks import make_sample

    model_dir = str(_tiny_dir(tmp_path, 4))
    result = script.main([model_dir, *ARGS, "--task", "passkey", "--bias", "1", "--out", str(tmp_path / "pk.json")])
    assert result["task"] == "passkey"
    model, tok = load_entry(ModelEntry(model_dir, model_dir), torch.device("cpu"))
    sample = make_sample("passkey", tok, 1024, 0.5, 0)
    assert result["samples"][0]["answer"] == sample.answer
    with torch.inference_mode():
        logp = teacher_forced_logprobs(model, sample.input_ids, sample.answer_start)  # (A, V)
    expected = [float(logp[i, t]) for i, t in enumerate(sample.input_ids[sample.answer_start :])]
    base, biased = result["samples"][0]["variants"]
    assert base["logp_right"] == pytest.approx(expected, abs=2e-4), "the passkey's cached path is one forward pass"
    assert biased["logp_right"] != base["logp_right"], "the bias at the question changes the answer's log-probs"
