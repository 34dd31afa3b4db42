"""``retrieve_bias = b``: every far key's attention logit is lowered by b nats, so a query's far
blocks take a smaller share of its softmax beside its sinks and window (quality study, round 28).
Checked: the torch backend against the reference; the far odds shrink by exactly ``exp(-b)`` on the
same choice; a huge bias is the window alone; the convert flag, the decode cache and the errors (the
Triton backend: tests/kernels/test_triton_interpreter.py)."""

from __future__ import annotations

import math

import pytest

from ctxext.attention.options import TensorizedConfigError, TensorizedOptions

from . import operator_cases as oc
from .convert_flag_check import check_convert_flag
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)

OPTS = {"sinks": 2, "local": "window", "merge": "lse", "long_range": False, "retrieve": 2, "retrieve_block": 4}


def test_merge_far_lowers_the_far_odds_and_a_zero_bias_is_the_plain_merge():
    """``merge_far`` (the one place the three backends apply the bias): the far weight's odds are
    ``exp(-b)`` times the unbiased ones; a query that read no far block (``lse = -inf``) keeps its
    local output at any bias; a zero bias is :func:`merge_streams` to the bit."""
    import torch

    from ctxext.attention.retrieve import merge_far, merge_streams

    g = torch.Generator().manual_seed(0)
    out_local, out_far = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)  # (Hq, Q, D)
    lse_local, lse_far = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)  # (Hq, Q)
    lse_far[:, 0] = -math.inf  # query 0 read no far block
    plain = merge_streams(out_local, lse_local, out_far, lse_far)
    for got, want in zip(merge_far(out_local, lse_local, out_far, lse_far, 0.0), plain, strict=True):
        assert torch.equal(got, want)
    out, lse = merge_far(out_local, lse_local, out_far, lse_far, 1.5)
    odds = torch.exp(lse_far - lse_local)
    w = odds * math.exp(-1.5) / (1 + odds * math.exp(-1.5))  # the biased far weight, (Hq, Q)
    torch.testing.assert_close(out, out_local + w[..., None] * (out_far - out_local), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, torch.logaddexp(lse_local, lse_far - 1.5))
    assert torch.equal(out[:, 0], out_local[:, 0])


@pytest.mark.parametrize(("rope", "frame"), [("absolute", "stacked"), ("axis", "stacked"), ("axis", "ordered")])
def test_torch_matches_reference(rope, frame):
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=45, seed=7)
    opts = {**OPTS, "rope": rope, "retrieve_frame": frame, "retrieve_candidates": 4, "retrieve_bias": 1.5}
    got = oc.run_slots("torch", q, k, v, (8,), opts)
    oc.assert_close(got, oc.run_slots("reference", q, k, v, (8,), opts), 1e-12, "torch vs reference")
    plain = oc.run_slots("torch", q, k, v, (8,), {**opts, "retrieve_bias": 0.0})
    assert (got[:, :, 16:] - plain[:, :, 16:]).abs().max() > 1e-3, "a query with far blocks must change"
    assert (got[:, :, :16] - plain[:, :, :16]).abs().max() == 0.0, "before the first far block nothing changes"


def test_the_far_odds_shrink_by_exp_minus_the_bias_and_a_huge_bias_is_the_window_alone():
    """One query, one head: its output is ``local + w_b (far - local)`` where the far weight's odds
    ``w_b / (1 - w_b)`` are ``exp(-b)`` times those at b = 0. The share ``w_2 / w_0`` measured on the
    line from the window-only output gives w_0; it must then predict ``w_4 / w_0``."""
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=40, seed=3)
    opts = {**OPTS, "retrieve": 1}
    window = oc.run_slots("torch", q, k, v, (8,), {**opts, "retrieve": 0})
    out = {b: oc.run_slots("torch", q, k, v, (8,), {**opts, "retrieve_bias": b}) for b in (0.0, 2.0, 4.0, 1e4)}
    assert (out[1e4] - window).abs().max() < 1e-12, "a huge bias leaves the window's softmax alone"
    slot = 39  # 5 far blocks of 4 before its window (slots 24..39)
    local = window[0, 0, slot]
    direction = out[0.0][0, 0, slot] - local  # w_0 (far - local)
    ratio = {}
    for b in (2.0, 4.0):
        moved = out[b][0, 0, slot] - local
        ratio[b] = float(moved @ direction / (direction @ direction))  # w_b / w_0
        assert (moved - ratio[b] * direction).abs().max() < 1e-9, "the same far read, less of it"

    def weight(w0: float, b: float) -> float:
        odds = math.exp(-b) * w0 / (1 - w0)
        return odds / (1 + odds)

    w0 = (1 - math.exp(-2) / ratio[2.0]) / (1 - math.exp(-2))  # from w_2 / w_0 = ratio[2]
    assert 0.0 < w0 < 1.0
    assert weight(w0, 4.0) / w0 == pytest.approx(ratio[4.0], rel=1e-9)


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), "expected the nats"), (float("inf"), "expected the nats"), (True, "expected the nats"),
     ("1", "expected the nats")],
)  # fmt: skip
def test_a_bad_bias_is_named(value, message):
    with pytest.raises(TensorizedConfigError, match=rf"tensorized_attention\.retrieve_bias: {message}"):
        TensorizedOptions.from_dict({"block_sizes": [8], "retrieve": 2, "retrieve_block": 4, "retrieve_bias": value})


def test_a_bias_without_far_blocks_is_refused():
    with pytest.raises(TensorizedConfigError, match=r"retrieve_bias: 1.0 lowers the far blocks' logits, but retrieve"):
        TensorizedOptions.from_dict({"block_sizes": [8], "retrieve_bias": 1.0})


def test_convert_flag_reaches_the_model_and_the_decode_cache_matches_one_forward(tmp_path):
    """Blocks of 4 read 2 at a time beside a window of 2 x 8: the first far block ends before the
    window of the queries from slot 16 on."""
    flags = ["--retrieve", "2", "--retrieve-block", "4", "--retrieve-bias", "1.0"]
    check_convert_flag(tmp_path, flags, "retrieve_bias", 1.0, off=0.0, same_before=16, bad_value="nan")
