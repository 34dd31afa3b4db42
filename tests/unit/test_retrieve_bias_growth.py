"""``retrieve_bias_growth = g`` from ``retrieve_bias_from = F`` tokens: a query at slot ``t`` lowers its
far logits by ``retrieve_bias + g * max(0, log2((t + 1) / F))`` (quality study, round 30), at most
``retrieve_bias_cap`` nats when a cap is set (round 32).
Checked: the per-query bias itself; the torch backend against the reference (which computes the
bias on its own); each query's output equals a fixed-bias run at that query's bias; the convert
flags, the decode cache and the errors (the Triton backend: tests/kernels/test_triton_interpreter.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctxext.attention.options import TensorizedConfigError, TensorizedOptions

from . import operator_cases as oc
from .convert_flag_check import check_convert_flag, converted_settings
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)

OPTS = {"sinks": 2, "local": "window", "merge": "lse", "long_range": False, "retrieve": 2, "retrieve_block": 4}
GROWTH = {"retrieve_bias": 0.5, "retrieve_bias_growth": 1.0, "retrieve_bias_from": 20}


def test_the_bias_is_fixed_up_to_its_start_and_grows_by_g_per_doubling():
    import torch

    from ctxext.attention.retrieve import far_logit_bias

    fixed = TensorizedOptions(block_sizes=(8,), retrieve=2, retrieve_bias=0.5, retrieve_bias_from=20)
    assert far_logit_bias(fixed, torch.arange(100)) == 0.5, "no growth: the plain float, no tensor"
    grows = TensorizedOptions(block_sizes=(8,), retrieve=2, **{**GROWTH, "retrieve_bias_growth": 0.75})
    bias = far_logit_bias(grows, torch.tensor([0, 10, 19, 39, 79, 29]))  # lengths 1, 11, 20, 40, 80, 30
    want = [0.5, 0.5, 0.5, 1.25, 2.0, 0.5 + 0.75 * math.log2(1.5)]
    assert bias.tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(("rope", "frame"), [("absolute", "stacked"), ("axis", "stacked"), ("axis", "ordered")])
def test_torch_matches_reference(rope, frame):
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=45, seed=7)
    opts = {**OPTS, **GROWTH, "rope": rope, "retrieve_frame": frame, "retrieve_candidates": 4}
    got = oc.run_slots("torch", q, k, v, (8,), opts)
    oc.assert_close(got, oc.run_slots("reference", q, k, v, (8,), opts), 1e-12, "torch vs reference")
    fixed = oc.run_slots("torch", q, k, v, (8,), {**opts, "retrieve_bias_growth": 0.0})
    assert (got[:, :, :20] - fixed[:, :, :20]).abs().max() == 0.0, "up to the start the bias is fixed"
    assert (got[:, :, 20:] - fixed[:, :, 20:]).abs().max() > 1e-3, "beyond it the bias must grow"


@pytest.mark.parametrize("slot", [20, 29, 44])
def test_each_query_is_a_fixed_bias_run_at_its_own_bias(slot):
    """The growth is per query: query ``t`` of the growing run equals query ``t`` of a run whose fixed
    bias is ``0.5 + log2((t + 1) / 20)`` (the choice does not depend on the bias)."""
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=45, seed=11)
    opts = {**OPTS, "rope": "axis", "retrieve_candidates": 4}
    grown = oc.run_slots("torch", q, k, v, (8,), {**opts, **GROWTH})
    own = 0.5 + math.log2((slot + 1) / 20)
    fixed = oc.run_slots("torch", q, k, v, (8,), {**opts, "retrieve_bias": own})
    assert (grown[:, :, slot] - fixed[:, :, slot]).abs().max() < 1e-12


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"retrieve_bias_growth": float("nan"), "retrieve_bias_from": 20}, r"retrieve_bias_growth: expected the nats"),
     ({"retrieve_bias_growth": True, "retrieve_bias_from": 20}, r"retrieve_bias_growth: expected the nats"),
     ({"retrieve_bias_growth": 0.5, "retrieve_bias_from": -8}, r"retrieve_bias_from: expected the tokens"),
     ({"retrieve_bias_growth": 0.5, "retrieve_bias_from": 8.5}, r"retrieve_bias_from: expected the tokens"),
     ({"retrieve_bias_cap": float("inf")}, r"retrieve_bias_cap: expected the most nats"),
     ({"retrieve_bias_cap": -1.0}, r"retrieve_bias_cap: expected the most nats"),
     ({"retrieve_bias_cap": "1"}, r"retrieve_bias_cap: expected the most nats"),
     ({"retrieve_bias": 1.0, "retrieve_bias_cap": 0.5}, r"retrieve_bias_cap: 0\.5 is below retrieve_bias 1\.0")],
)  # fmt: skip
def test_a_bad_growth_is_named(settings, message):
    raw = {"block_sizes": [8], "retrieve": 2, "retrieve_block": 4, **settings}
    with pytest.raises(TensorizedConfigError, match=rf"tensorized_attention\.{message}"):
        TensorizedOptions.from_dict(raw)


def test_without_retrieval_the_growth_is_inert():
    """``--set retrieve=0`` on a model with a growth must work alone: valid, and the same output as
    without the growth (no start needed, none used)."""
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=40, seed=3)
    opts = {"sinks": 1, "local": "window", "retrieve": 0}
    grown = oc.run_slots("torch", q, k, v, (8,), {**opts, "retrieve_bias_growth": 0.5})
    assert torch.equal(grown, oc.run_slots("torch", q, k, v, (8,), opts))


def test_a_start_without_growth_is_allowed():
    """A recipe may keep ``retrieve_bias_from`` while a sweep sets the growth to 0."""
    opts = TensorizedOptions.from_dict({"block_sizes": [8], "retrieve": 2, "retrieve_bias_from": 8192})
    assert opts.retrieve_bias_growth == 0.0 and opts.retrieve_bias_from == 8192


def test_convert_flags_reach_the_model_and_the_decode_cache_matches_one_forward(tmp_path):
    """Far blocks of 4 from slot 16 on; the bias grows from 20 tokens, so logits change from slot 20."""
    flags = ["--retrieve", "2", "--retrieve-block", "4", "--retrieve-bias-growth", "1.0", "--retrieve-bias-from", "20"]
    check_convert_flag(tmp_path, flags, "retrieve_bias_growth", 1.0, off=0.0, same_before=20, bad_value="nan")


def test_the_bare_operator_needs_the_start():
    """Without a model there is no context to start from: the operator and the bias itself say so."""
    from ctxext import tensorized_attention
    from ctxext.attention.retrieve import far_logit_bias

    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    message = r"retrieve_bias_growth: 0\.5 nats per doubling needs the length it starts from.*set retrieve_bias_from"
    with pytest.raises(TensorizedConfigError, match=message):
        tensorized_attention(q, k, v, block_sizes=(8,), retrieve=2, retrieve_block=4, retrieve_bias_growth=0.5)
    opts = TensorizedOptions(block_sizes=(8,), retrieve=2, retrieve_block=4, retrieve_bias_growth=0.5)
    with pytest.raises(TensorizedConfigError, match=message):
        far_logit_bias(opts, torch.arange(24))


@pytest.mark.parametrize(
    ("args", "want"),
    [([], (0.5, "native", 0.5)), (["--retrieve-bias-cap", "1"], (0.5, "native", 1.0)),
     (["--retrieve-bias-growth", "0"], (0.0, 0, 0.0)), (["--retrieve-bias-growth", "0.5"], (0.5, "native", 0.0)),
     (["--retrieve-bias", "1"], (0.0, 0, 0.0)), (["--retrieve", "0"], (0.0, 0, 0.0)),
     (["--retrieve", "0", "--retrieve-bias-growth", "0.5"], (0.5, 0, 0.0)),
     (["--retrieve-bias-growth", "1", "--retrieve-bias-from", "64"], (1.0, 64, 0.0))],
)  # fmt: skip
def test_convert_grows_a_capped_bias_past_the_models_context_by_default(tmp_path, args, want):
    """Rounds 30-33: 0.5 nat per doubling from the source model's ``max_position_embeddings``,
    at most 0.5 nat; a given growth keeps its own cap (none unless given); a fixed bias asked for
    alone stays fixed; without retrieval nothing is started; a given start wins."""
    settings = converted_settings(tmp_path, args)
    native = json.loads((tmp_path / "src" / "config.json").read_text())["max_position_embeddings"]
    growth, start, cap = want
    got = (settings["retrieve_bias_growth"], settings["retrieve_bias_from"], settings["retrieve_bias_cap"])
    assert native > 0 and got == (growth, native if start == "native" else start, cap)


def test_a_config_with_a_start_of_zero_runs_as_with_its_context_and_set_fills_it_in():
    """A config's start of 0 behaves as its ``max_position_embeddings`` (here 20) written out, in the
    forward pass and under ``--set``; a config without that key is refused by name."""
    from transformers import LlamaConfig

    from ctxext.attention.hf import options_from_config
    from ctxext.evaluate.runner import override_settings
    from ctxext.models import apply_tensorized
    from ctxext.tiny import tiny_model

    model = tiny_model("llama").eval()
    model.config.max_position_embeddings = 20
    base = {"block_sizes": [8], "retrieve": 2, "retrieve_block": 4, "retrieve_bias_growth": 1.0}
    apply_tensorized(model, TensorizedOptions.from_dict({**base, "retrieve_bias_from": 20}))
    ids = torch.randint(0, 256, (1, 45))
    with torch.no_grad():
        explicit = model(ids, use_cache=False).logits
        model.config.tensorized_attention = {**model.config.tensorized_attention, "retrieve_bias_from": 0}
        assert options_from_config(model.config).retrieve_bias_from == 20
        native = model(ids, use_cache=False).logits
        model.config.tensorized_attention = {**model.config.tensorized_attention, "retrieve_bias_growth": 0.0}
        flat = model(ids, use_cache=False).logits
    assert torch.equal(native, explicit)
    assert (native[0, 20:] - flat[0, 20:]).abs().max() > 1e-4  # the growth acts: the test can fail
    override_settings(model, {"retrieve_bias_growth": 0.5})
    assert model.config.tensorized_attention["retrieve_bias_from"] == 20
    bare = LlamaConfig(max_position_embeddings=0)
    bare.tensorized_attention = {**base, "retrieve_bias_from": 0}
    with pytest.raises(TensorizedConfigError, match=r"config\.tensorized_attention\.retrieve_bias_from: 0 starts"):
        options_from_config(bare)
    bare.tensorized_attention = {**base, "retrieve": 0, "retrieve_bias_from": 0}
    assert options_from_config(bare).retrieve_bias_from == 0, "without retrieval there is nothing to start"


def test_the_cap_bounds_the_growing_bias():
    """``retrieve_bias_cap``: the fixed bias and the growth together stop at the cap; 0 is no cap."""
    from ctxext.attention.retrieve import far_logit_bias

    capped = TensorizedOptions(block_sizes=(8,), retrieve=2, **GROWTH, retrieve_bias_cap=1.25)
    bias = far_logit_bias(capped, torch.tensor([0, 19, 29, 39, 79, 1279]))  # lengths 1, 20, 30, 40, 80, 1280
    want = [0.5, 0.5, 0.5 + math.log2(1.5), 1.25, 1.25, 1.25]
    assert bias.tolist() == pytest.approx(want, abs=1e-12)
    uncapped = far_logit_bias(TensorizedOptions(block_sizes=(8,), retrieve=2, **GROWTH), torch.tensor([1279]))
    assert uncapped.item() == pytest.approx(6.5), "without a cap the bias keeps growing"


@pytest.mark.parametrize("rope", ["absolute", "axis"])
def test_a_capped_growth_matches_the_reference_and_acts_only_past_the_cap(rope):
    """0.5 + log2((t + 1) / 20) reaches the cap of 1.0 at t + 1 = 20 * 2 ** 0.5 (slot 27): the capped run
    equals the uncapped one before it and differs after; torch agrees with the reference (which computes
    the capped bias on its own)."""
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=45, seed=5)
    opts = {**OPTS, **GROWTH, "rope": rope, "retrieve_candidates": 4}
    capped = oc.run_slots("torch", q, k, v, (8,), {**opts, "retrieve_bias_cap": 1.0})
    reference = oc.run_slots("reference", q, k, v, (8,), {**opts, "retrieve_bias_cap": 1.0})
    oc.assert_close(capped, reference, 1e-12, "capped growth: torch vs reference")
    uncapped = oc.run_slots("torch", q, k, v, (8,), opts)
    assert (capped[:, :, :28] - uncapped[:, :, :28]).abs().max() == 0.0, "below the cap nothing changes"
    assert (capped[:, :, 28:] - uncapped[:, :, 28:]).abs().max() > 1e-3, "past it the cap must act"
    fixed = oc.run_slots("torch", q, k, v, (8,), {**OPTS, "rope": rope, "retrieve_candidates": 4, "retrieve_bias": 1.0})
    assert (capped[:, :, 28:] - fixed[:, :, 28:]).abs().max() < 1e-12, "past the cap: a fixed bias at the cap"


def test_convert_flag_for_the_cap_reaches_the_model(tmp_path):
    """A growth of 1 from 20 tokens capped at 1 nat: the cap acts from slot 40 (41 tokens) on."""
    flags = ["--retrieve", "2", "--retrieve-block", "4", "--retrieve-bias-growth", "1.0", "--retrieve-bias-from", "20",
             "--retrieve-bias-cap", "1.0"]  # fmt: skip
    check_convert_flag(tmp_path, flags, "retrieve_bias_cap", 1.0, off=0.0, same_before=40, bad_value="nan")
