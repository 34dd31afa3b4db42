"""Greedy generation from the real SmolLM2 with the tensorized decode cache matches the no-cache
reference token for token, across an inner-block boundary."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from ctxext.attention.cache import cache_argument

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2_tensorized():
    from ctxext.attention.options import TensorizedOptions
    from ctxext.evaluate.runner import ModelEntry, load_entry
    from ctxext.models import apply_tensorized

    model, tokenizer = load_entry(ModelEntry("smollm2", "smollm2"), torch.device("cpu"))
    apply_tensorized(model, TensorizedOptions())  # the defaults: complete, blocks of 128
    return model, tokenizer


@pytest.mark.parametrize("prompt_tokens", [250])  # crosses the block boundary at 256
def test_greedy_generation_matches_the_no_cache_reference(smollm2_tensorized, prompt_tokens):
    import ctxext

    model, tokenizer = smollm2_tensorized
    ids = tokenizer(inspect.getsource(json.decoder), return_tensors="pt").input_ids[:, :prompt_tokens]
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
        cache = ctxext.TensorizedCache(model.config)
        cached = model.generate(ids, max_new_tokens=10, do_sample=False, **cache_argument(cache))
    assert cached[0, prompt_tokens:].tolist() == reference[0, prompt_tokens:].tolist()
    memory = cache.memory()
    # complete mode, two axes: + Hq * D = 9 * 64 per token beside 2 * Hkv * D = 2 * 3 * 64 (2.5x).
    assert 2.4 < (memory["kv"] + memory["tensorized"]) / memory["kv"] < 3.1


def test_greedy_generation_with_retrieval_matches_the_no_cache_reference():
    """The ctxext convert defaults (sinks, window, lse, 8 far blocks of 64) on the real SmolLM2: a
    300-token prompt puts tokens 256+ beyond the window, where each query reads its chosen far blocks."""
    import ctxext
    from ctxext.attention.options import TensorizedOptions
    from ctxext.evaluate.runner import ModelEntry, load_entry
    from ctxext.models import apply_tensorized

    model, tokenizer = load_entry(ModelEntry("smollm2", "smollm2"), torch.device("cpu"))
    apply_tensorized(model, TensorizedOptions(sinks=4, local="window", merge="lse", retrieve=8, retrieve_block=64))
    ids = tokenizer(inspect.getsource(json.decoder), return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
        cached = model.generate(
            ids, max_new_tokens=8, do_sample=False, **cache_argument(ctxext.TensorizedCache(model.config))
        )
    assert cached[0, 300:].tolist() == reference[0, 300:].tolist()
