"""The tensorized decode cache (DESIGN.md section 5): cached calls equal one forward pass."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache

import ctxext
from ctxext.attention import retrieve
from ctxext.attention.cache import TensorizedCacheError, TensorizedCacheLayer, cache_argument, cache_memory
from ctxext.models import apply_tensorized

from .tiny_models import tiny_model

N = 23  # crosses inner blocks of 4 and outer blocks of 4 * 3 = 12

SETTINGS = {
    "complete": dict(block_sizes=(4,)),
    "dominance": dict(block_sizes=(4,), causal="dominance"),
    "complete-3axes": dict(block_sizes=(4, 3)),
    "dominance-3axes": dict(block_sizes=(4, 3), causal="dominance"),
    "complete-axis-rope": dict(block_sizes=(4, 3), rope="axis"),
    "dominance-axis-rope": dict(block_sizes=(4,), causal="dominance", rope="axis"),
    "all-options": dict(block_sizes=(4, 3), rope="axis", merge="lse", sinks=2, local="window"),
    "dominance-all-options": dict(block_sizes=(4, 3), causal="dominance", rope="axis", merge="lse", sinks=2),
    "mass-3axes": dict(block_sizes=(4, 3), merge="mass", sinks=2, local="window"),
    "window-only": dict(block_sizes=(4,), long_range=False, sinks=1, local="window"),
    "retrieve": dict(block_sizes=(4,), sinks=1, local="window", merge="lse", retrieve=1),
    "retrieve-axis-3axes": dict(block_sizes=(4, 3), rope="axis", sinks=2, local="block", retrieve=2),
    "retrieve-window-only": dict(block_sizes=(4,), long_range=False, sinks=2, local="window", retrieve=2),
    "retrieve-ordered": dict(
        block_sizes=(4,), rope="axis", sinks=1, local="window", retrieve=3, retrieve_frame="ordered"
    ),
    # 12 far blocks of 2 for 1 read: past READ_UNION_MAX_RATIO, so the far blocks are read pair by pair
    "retrieve-pair-by-pair": dict(
        block_sizes=(4,), sinks=1, local="window", long_range=False, retrieve=1, retrieve_block=2, retrieve_candidates=3
    ),
}
SCHEDULES = {"token-by-token": (1,), "uneven-chunks": (5, 1, 3), "prompt-then-tokens": (13, 1)}


def _model(arch: str = "llama", **settings):
    model = tiny_model(arch, "sdpa")
    apply_tensorized(model, ctxext.TensorizedOptions(**settings))
    return model


def _inputs(n: int, batch: int = 1, pad: tuple[int, ...] = ()):
    ids = torch.randint(1, 128, (batch, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, n, dtype=torch.long)
    for row, count in enumerate(pad):
        mask[row, :count] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@torch.no_grad()
def _cached_logits(model, ids, mask, positions, schedule, cache=None):
    """Feed the sequence in chunks of the sizes in ``schedule`` (cycled) through one cache."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    outs, start = [], 0
    for size in itertools.cycle(schedule):
        stop = min(ids.shape[1], start + size)
        outs.append(
            model(
                ids[:, start:stop],
                attention_mask=mask[:, :stop],
                position_ids=positions[:, start:stop],
                **cache_argument(cache),
                use_cache=True,
            ).logits
        )
        start = stop
        if start == ids.shape[1]:
            return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("schedule", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_cached_calls_equal_one_forward_pass(settings, schedule):
    model = _model(**settings)
    ids, mask, positions = _inputs(N)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    cached, cache = _cached_logits(model, ids, mask, positions, schedule)
    assert isinstance(cache.layers[0], TensorizedCacheLayer) and cache.layers[0].tensorized is not None
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    # The comparison is sensitive: full attention gives other logits at this length.
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        exact = model(ids, use_cache=False).logits
    assert (exact - full).abs().max() > 1e-3


@pytest.mark.parametrize(
    "settings", [SETTINGS["complete-3axes"], SETTINGS["all-options"], SETTINGS["dominance"], SETTINGS["retrieve"]]
)
def test_batch_with_left_padding_and_holes(settings):
    model = _model(**settings)
    ids, mask, positions = _inputs(N, batch=3, pad=(0, 5, 11))
    mask[0, 7:9] = 0  # a hole inside row 0: its slots no longer map to consecutive tokens
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    for schedule in [(1,), (13, 2)]:
        cached, _ = _cached_logits(model, ids, mask, positions, schedule)
        real = mask.bool()
        torch.testing.assert_close(cached[real], full[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_generate_uses_the_cache_and_matches_generation_without_it(arch):
    model = _model(arch, block_sizes=(4, 3))
    ids, _, _ = _inputs(10, batch=1)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)
        cache = ctxext.TensorizedCache(model.config)
        cached = model.generate(ids, max_new_tokens=16, do_sample=False, **cache_argument(cache))
    assert torch.equal(cached, reference)
    full_layers = [layer for layer in cache.layers if isinstance(layer, TensorizedCacheLayer)]
    assert full_layers and all(layer.tensorized.tokens_seen == 25 for layer in full_layers)


def test_generate_builds_the_cache_itself_batched_with_padding_and_beams():
    model = _model(block_sizes=(4,), merge="lse", sinks=1)
    ids, mask, _ = _inputs(9, batch=2, pad=(3,))
    with torch.no_grad():
        for kwargs in [{}, {"num_beams": 2}]:
            reference = model.generate(
                ids, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=False, **kwargs
            )
            cached = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, **kwargs)
            assert torch.equal(cached, reference), kwargs


def test_cache_size_is_a_small_multiple_of_a_kv_cache():
    # complete mode, two axes: the full streams of completed blocks add Hq * D per token to the
    # 2 * Hkv * D of k and v (4 query heads, 2 kv heads here: 2x), plus the current block's queries.
    model = _model(block_sizes=(4,))
    ids, mask, positions = _inputs(400)
    _, cache = _cached_logits(model, ids, mask, positions, (399, 1))
    memory = cache_memory(cache)
    assert memory["kv"] == 2 * 2 * 400 * 16 * 4 * 2  # layers * (k, v) * tokens * D * bytes * Hkv
    multiple = (memory["kv"] + memory["tensorized"]) / memory["kv"]
    assert 2.0 <= multiple <= 2.15, multiple


def test_work_per_token_does_not_grow_with_the_inner_blocks():
    # A token attends to at most (local keys) + (n_j + 1) per outer hop, not to every earlier token.
    from ctxext.attention import decode

    seen = []
    original = decode._Step.outer_causal

    def spy(self, j, q, slots, C, lse_C, reach):
        assert reach == int(self.geo.coordinate(slots, j).max())  # computed on the host, no sync
        seen.append((j, reach + 1))
        return original(self, j, q, slots, C, lse_C, reach)

    model = _model(block_sizes=(4, 4))
    ids, mask, positions = _inputs(120)
    decode._Step.outer_causal = spy
    try:
        _cached_logits(model, ids, mask, positions, (100, 1))
    finally:
        decode._Step.outer_causal = original
    per_token = [keys for j, keys in seen[2 * 2 :]]  # after the prefill (2 layers x 2 hops)
    assert max(per_token) <= 120 // 16 + 1


def test_a_cache_filled_by_other_settings_is_refused():
    ids, mask, positions = _inputs(9)
    model = _model(block_sizes=(4,))
    _, cache = _cached_logits(model, ids, mask, positions, (9,))
    other = _model(block_sizes=(8,))
    with torch.no_grad(), pytest.raises(TensorizedCacheError, match="other tensorized-attention settings"):
        other(ids[:, :1], **cache_argument(cache), use_cache=True)


def test_a_cache_filled_by_full_attention_is_refused():
    ids, _, _ = _inputs(9)
    model = tiny_model("llama", "sdpa")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_argument(cache), use_cache=True)
    apply_tensorized(model, ctxext.TensorizedOptions(block_sizes=(4,)))
    with torch.no_grad(), pytest.raises(TensorizedCacheError, match="not processed by tensorized attention"):
        model(ids[:, :1], **cache_argument(cache), use_cache=True)


def test_a_plain_kv_cache_gets_a_clear_error():
    model = _model(block_sizes=(4,))
    ids, _, _ = _inputs(9)
    cache = DynamicCache()  # no config: plain DynamicLayer, no tensorized state
    with torch.no_grad():
        model(ids, **cache_argument(cache), use_cache=True)
        with pytest.raises(NotImplementedError, match="TensorizedCache"):
            model(ids[:, :1], **cache_argument(cache), use_cache=True)


def test_cropping_a_tensorized_cache_is_refused():
    model = _model(block_sizes=(4,))
    ids, mask, positions = _inputs(9)
    _, cache = _cached_logits(model, ids, mask, positions, (9,))
    with pytest.raises(TensorizedCacheError, match="cropping"):
        cache.crop(-2)


def test_other_attention_implementations_are_unaffected():
    model = tiny_model("llama", "sdpa")
    ids, _, _ = _inputs(12)
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(cached, reference)


def test_positions_must_continue_across_cached_calls():
    model = _model(block_sizes=(4,))
    ids, mask, positions = _inputs(9)
    _, cache = _cached_logits(model, ids, mask, positions, (9,))
    with torch.no_grad(), pytest.raises(ValueError, match="keep increasing.*continues at 3 after 8"):
        model(ids[:, :1], **cache_argument(cache), use_cache=True, position_ids=torch.tensor([[3]]))


def test_cache_layer_appends_in_place_and_follows_every_dynamic_layer_operation():
    from transformers.cache_utils import DynamicLayer

    ours, plain = TensorizedCacheLayer(), DynamicLayer()
    g = torch.Generator().manual_seed(0)

    def step(n):
        batch = ours.keys.shape[0] if ours.is_initialized else 3
        k, v = torch.randn(batch, 2, n, 4, generator=g), torch.randn(batch, 2, n, 4, generator=g)
        with torch.no_grad():
            got, want = ours.update(k, v), plain.update(k, v)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        return got

    first = step(300)
    buffer = ours._buffers[0]
    for _ in range(20):  # single tokens land in the spare capacity: no reallocation, no O(N) copy
        step(1)
    assert ours._buffers[0] is buffer and ours.keys.data_ptr() == buffer.data_ptr()
    assert torch.equal(first[0], plain.keys[..., :300, :])  # earlier views are not overwritten
    for op, arg in [
        ("crop", -5),
        ("batch_select_indices", torch.tensor([2, 0])),
        ("batch_repeat_interleave", 2),
        ("reorder_cache", torch.tensor([3, 2, 1, 0])),
    ]:
        getattr(ours, op)(arg)
        getattr(plain, op)(arg)
        step(1)
        step(7)
    assert ours.get_seq_length() == plain.get_seq_length() == 300 + 20 + 4 * 8 - 5
    k = torch.randn(4, 2, 2, 4, requires_grad=True)  # with autograd: DynamicLayer's concatenation
    keys, _ = ours.update(k, k)
    assert keys.requires_grad and ours._buffers is None


def test_a_long_cached_prefill_reads_its_far_blocks_pair_by_pair(monkeypatch):
    """The decode cache reads through the same dispatcher as a forward pass: many far blocks per
    block read go pair by pair (the union path would be quadratic in a long chunked prefill)."""
    calls = []
    by_block = retrieve.retrieved_attention_by_block
    monkeypatch.setattr(retrieve, "retrieved_attention_by_block", lambda *a: calls.append(a[0].shape) or by_block(*a))
    model = _model(**SETTINGS["retrieve-pair-by-pair"])
    ids, mask, positions = _inputs(N)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    forward_calls = len(calls)
    cached, _ = _cached_logits(model, ids, mask, positions, (13, 1))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    assert forward_calls > 0 and len(calls) > forward_calls, "the cached calls never read pair by pair"
