"""transformers integration: every supported architecture runs tensorized attention through the
AttentionInterface, equals the reference attention inside one block, and keeps sliding windows."""

from __future__ import annotations

import json

import pytest
import torch

import ctxext
from ctxext.attention.cache import cache_argument
from ctxext.attention.hf import ATTN_IMPLEMENTATION, tensorized_mask
from ctxext.models import UnsupportedModelError, apply_tensorized, save_model_dir
from tests.unit.tiny_models import tiny_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
# Models whose reference attention is eager (soft-capping is not supported by SDPA).
EAGER_REFERENCE = {"gemma2", "gemma3"}


def _reference_impl(arch: str) -> str:
    return "eager" if arch in EAGER_REFERENCE else "sdpa"


def _switch(model, **settings):
    apply_tensorized(model, ctxext.TensorizedOptions(**settings))
    return model


def _ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, n), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_block_equals_reference_attention(arch):
    model = tiny_model(arch, _reference_impl(arch))
    ids = _ids(37)
    with torch.no_grad():
        expected = model(ids).logits
        _switch(model, block_sizes=(64,))
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_beyond_one_block(arch):
    model = tiny_model(arch, _reference_impl(arch))
    ids = _ids(45)
    with torch.no_grad():
        full = model(ids).logits
    _switch(model, block_sizes=(4,), sinks=2, merge="lse")
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(out.logits).all()
    # Tensorized attention is really in use: beyond one block the logits differ from full attention.
    assert (out.logits.detach() - full).abs().max() > 1e-3


@pytest.mark.parametrize("shifted", [True, False], ids=["shifted-position-ids", "plain-attention-mask"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_left_padding_keeps_real_tokens_on_their_multi_index(arch, shifted):
    """A left-padded row gives the same logits on its real tokens as the unpadded sequence, whether
    the position ids are shifted (as generate does) or not (a plain forward with a mask)."""
    model = _switch(tiny_model(arch), block_sizes=(4,), causal="complete")
    ids = _ids(19, batch=1)
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if shifted else None
    with torch.no_grad():
        alone = model(ids).logits
        together = model(padded, attention_mask=mask, position_ids=positions).logits[:, pad:]
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=1e-4)


def test_padding_mask_is_o_of_n():
    mask = torch.ones(2, 10, dtype=torch.long)
    assert tensorized_mask(2, 10, 10, attention_mask=mask.bool()) is None
    mask[0, :3] = 0
    out = tensorized_mask(2, 10, 10, attention_mask=mask.bool())
    assert out.shape == (2, 10) and out.dtype == torch.bool and not out[0, :3].any()


def test_padding_mask_reaches_the_attention_function():
    """Without the registered mask function transformers would drop the padding mask."""
    model = _switch(tiny_model("llama"), block_sizes=(64,))
    ids = _ids(12, batch=1)
    mask = torch.ones_like(ids)
    mask[0, 4] = 0  # one padding token in the middle: later tokens must not see it
    with torch.no_grad():
        masked = model(ids, attention_mask=mask).logits
        unmasked = model(ids).logits
        model.set_attn_implementation("sdpa")
        expected = model(ids, attention_mask=mask).logits
    assert (masked[0, 5:] - unmasked[0, 5:]).abs().max() > 1e-4
    torch.testing.assert_close(masked[0, 5:], expected[0, 5:], atol=2e-5, rtol=1e-4)


def test_sliding_window_layers_keep_their_window():
    """Mistral with a sliding window on every layer: tensorized attention changes nothing."""
    model = tiny_model("mistral", sliding_window=6)
    ids = _ids(30)
    with torch.no_grad():
        expected = model(ids).logits
        _switch(model, block_sizes=(4,))
        got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_gemma2_soft_capping_is_applied():
    model = tiny_model("gemma2", "eager", attn_logit_softcapping=0.5)
    with torch.no_grad():
        for layer in model.model.layers:  # large scores, so that the cap bites
            layer.self_attn.q_proj.weight.mul_(30.0)
    ids = _ids(20)
    with torch.no_grad():
        expected = model(ids).logits
        _switch(model, block_sizes=(64,))
        got = model(ids).logits
        model.config.attn_logit_softcapping = None
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (uncapped - got).abs().max() > 1e-3


def test_reload_with_from_pretrained_runs_tensorized(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _switch(tiny_model("llama"), block_sizes=(4,), sinks=1)
    ids = _ids(21)
    with torch.no_grad():
        before = model(ids).logits
    save_model_dir(model, None, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["attn_implementation"] == ATTN_IMPLEMENTATION
    assert config["tensorized_attention"]["block_sizes"] == [4]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.config._attn_implementation == ATTN_IMPLEMENTATION
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before)


def test_without_explicit_attn_implementation_transformers_falls_back_to_sdpa(tmp_path):
    """Why save_model_dir writes attn_implementation: save_pretrained alone loses it."""
    from transformers import AutoModelForCausalLM

    model = _switch(tiny_model("llama"), block_sizes=(4,))
    model.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert reloaded.config._attn_implementation != ATTN_IMPLEMENTATION


def test_unsupported_architecture_gets_a_clear_error():
    model = tiny_model("bloom", "eager")
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM.*AttentionInterface"):
        _switch(model)


def test_cached_decoding_without_the_tensorized_cache_raises_clearly():
    from transformers import DynamicCache

    model = _switch(tiny_model("llama"), block_sizes=(4,))
    ids = _ids(9, batch=1)
    cache = DynamicCache()  # a plain KV cache: no tensorized state
    with torch.no_grad(), pytest.raises(NotImplementedError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=2, do_sample=False, **cache_argument(cache))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False)
    assert out.shape == (1, 11)


def test_axis_rope_uses_the_models_frequencies():
    model = tiny_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    ids = _ids(23)
    with torch.no_grad():
        expected = model(ids).logits
        _switch(model, block_sizes=(32,), rope="axis")  # one block: axis == absolute == full
        torch.testing.assert_close(model(ids).logits, expected, atol=2e-5, rtol=1e-4)
        _switch(model, block_sizes=(4,), rope="axis")
        axis = model(ids).logits
        _switch(model, block_sizes=(4,), rope="absolute")
        absolute = model(ids).logits
    assert (axis - absolute).abs().max() > 1e-4
    assert torch.isfinite(axis).all()


def test_bad_settings_in_config_name_the_key():
    model = tiny_model("llama")
    model.config.tensorized_attention = {"block_size": [4], "causal": "sideways"}
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    with pytest.raises(ctxext.TensorizedConfigError) as info, torch.no_grad():
        model(_ids(5))
    message = str(info.value)
    assert "block_size" in message and "did you mean 'block_sizes'" in message
    assert "causal" in message and "sideways" in message
