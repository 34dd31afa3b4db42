"""``decode`` section of ``ctxext bench``: one generated token at a context of N tokens.

Two modes per method (``sdpa`` with transformers' KV cache, ``ta-<backend>`` with the
tensorized decode cache of :mod:`ctxext.attention.cache`):

* ``attention``: the attention part of a decode step for one layer with the model's head
  shapes: ``steps`` tokens decoded one at a time after a context of N tokens. SDPA attends
  over the whole KV cache; tensorized attention runs its step (local hop, one hop per outer
  axis, and the full stream of a block when the token completes one). Appending k/v to the
  transformers cache is the same for both and not timed. ``median_s`` is the median time per
  token, ``worst_s`` the slowest token (for tensorized attention: the one that completes a
  block), ``mean_s`` the amortised time.
* ``model``: whole-model decoding (``--layers`` of the model, random weights): tokens/s of
  ``steps`` greedy steps after a prefill of N tokens; at batch 1 reading the weights
  dominates, so this is reported beside the attention part, not instead of it.

Cache sizes are exact byte counts (``cache_mib``; ``cache_vs_kv`` is the tensorized cache
against a KV cache of the same tokens). The decode path of tensorized attention is PyTorch
on every backend (the Triton kernels serve prefill and training); ``ta-<backend>`` only
selects the prefill backend.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from .measure import describe_error, release, sync
from .sources import attention_shapes

MODES = ("attention", "model")


def _steps(ctx) -> int:
    """Tokens decoded per measurement: one inner block plus one, so one block completes."""
    return ctx.options.block_sizes[-1] + 1


def _summary(times: list[float], cache: dict[str, int] | None) -> dict[str, Any]:
    out = {
        "median_s": statistics.median(times),
        "mean_s": sum(times) / len(times),
        "worst_s": max(times),
        "times_s": None,
        "tokens": len(times),
        "error": None,
    }
    if cache is not None:
        total = cache["kv"] + cache["tensorized"]
        out["cache_mib"] = total / 2**20
        out["cache_vs_kv"] = total / cache["kv"] if cache["kv"] else None
    out["peak_mib"] = out.get("cache_mib")
    return out


def _attention_steps(ctx, method, n: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` single-token attention calls of one layer after N cached tokens."""
    from transformers.cache_utils import DynamicLayer

    from ..attention.cache import TensorizedCacheLayer, cached_tensorized_attention

    hq, hkv, d = attention_shapes(ctx.config)
    b, dev, dtype = ctx.spec.batch, ctx.device, ctx.dtype
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(h, length):
        return torch.randn(b, h, length, d, generator=g, device=dev, dtype=dtype)

    opts = ctx.options if method.backend is None else dataclasses.replace(ctx.options, backend=method.backend)
    scaling = d**-0.5
    inv_freq = _inv_freq(ctx, opts)
    tensorized = method.kind == "tensorized"
    layer = TensorizedCacheLayer() if tensorized else DynamicLayer()

    def attend(q, keys, values):
        if tensorized:
            return cached_tensorized_attention(layer, q, keys, values, opts, scaling=scaling, rope_inv_freq=inv_freq)
        return F.scaled_dot_product_attention(q, keys, values, scale=scaling, enable_gqa=hq != hkv)

    keys, values = layer.update(rand(hkv, n), rand(hkv, n))
    with torch.no_grad():
        if tensorized:  # the prefill builds the decode state (full streams of completed blocks)
            attend(rand(hq, n), keys, values)
        times = []
        for step in range(ctx.spec.warmup + steps):  # the first calls warm up and are not kept
            q = rand(hq, 1)
            keys, values = layer.update(rand(hkv, 1), rand(hkv, 1))
            sync(dev)
            start = time.perf_counter()
            attend(q, keys, values)
            sync(dev)
            if step >= ctx.spec.warmup:
                times.append(time.perf_counter() - start)
    kv = keys.numel() * keys.element_size() * 2
    extra = layer.tensorized.nbytes() if tensorized else 0
    return _summary(times, {"kv": kv, "tensorized": extra})


def _inv_freq(ctx, opts):
    if opts.rope != "axis":
        return None
    from ..attention.rope import inv_freq_from_config

    return inv_freq_from_config(ctx.config).to(ctx.device)


def _model_steps(ctx, model, method, n: int, steps: int) -> dict[str, Any]:
    """Prefill N random tokens, then time ``steps`` greedy single-token forwards."""
    from transformers import DynamicCache

    from ..attention.cache import cache_argument, cache_memory
    from .model import use_method

    use_method(model, method, ctx.options)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    ids = torch.randint(0, ctx.config.vocab_size, (ctx.spec.batch, n), generator=g, device=ctx.device)
    cache = DynamicCache(config=model.config)
    times = []
    with torch.no_grad():
        sync(ctx.device)
        start = time.perf_counter()
        out = model(ids, **cache_argument(cache), use_cache=True, logits_to_keep=1)
        sync(ctx.device)
        prefill_s = time.perf_counter() - start
        for step in range(ctx.spec.warmup + steps):
            nxt = out.logits[:, -1:].argmax(-1)
            sync(ctx.device)
            start = time.perf_counter()
            out = model(nxt, **cache_argument(cache), use_cache=True)
            sync(ctx.device)
            if step >= ctx.spec.warmup:
                times.append(time.perf_counter() - start)
    cell = _summary(times, cache_memory(cache))
    cell["tokens_per_s"] = ctx.spec.batch / cell["mean_s"]
    cell["prefill_s"] = prefill_s
    return cell


def run(ctx) -> list[dict[str, Any]]:
    """Cells for every (N, mode, method): time per decoded token and cache size."""
    from .model import build_model

    steps = _steps(ctx)
    methods = [m for m in ctx.methods if m.kind in ("sdpa", "tensorized")]
    skipped = [m for m in ctx.methods if m not in methods]
    ctx.info["decode"] = {
        "steps_per_cell": steps,
        "attention": "one layer, model head shapes; time of the attention call per generated token (k/v append "
        "not timed); median, mean (amortised) and worst token",
        "model": f"{ctx.layers} layers, random weights; greedy single-token forwards after a prefill of N tokens",
        "decode_path": "PyTorch on every tensorized backend (the backend only serves the prefill)",
    }
    model, build_error = None, None
    try:
        model = build_model(ctx.config, ctx.layers, ctx.dtype, ctx.device)
    except Exception as err:  # noqa: BLE001 - OOM or an architecture transformers cannot build
        build_error = f"building the model: {describe_error(err)}"
    cells = []
    too_slow: dict[str, str] = {}  # model mode: a method whose prefill exceeded --max-call-s skips longer N
    limit = ctx.spec.max_call_s
    for n in ctx.lengths:
        for mode in MODES:
            for m in methods:
                cell: dict[str, Any] = {"section": "decode", "mode": mode, "method": m.name, "n": n}
                try:
                    if mode == "attention":
                        cell.update(_attention_steps(ctx, m, n, steps))
                    elif model is None:
                        cell.update(median_s=None, peak_mib=None, error=build_error)
                    elif m.name in too_slow:
                        cell.update(median_s=None, peak_mib=None, error=too_slow[m.name])
                    else:
                        cell.update(_model_steps(ctx, model, m, n, steps))
                        if limit and cell["prefill_s"] > limit:
                            too_slow[m.name] = (
                                f"skipped: the prefill at N={n} took {cell['prefill_s']:.0f} s > --max-call-s"
                            )
                except Exception as err:  # noqa: BLE001 - OOM or a failing backend is this cell's result
                    cell.update(median_s=None, peak_mib=None, error=describe_error(err))
                    release(ctx.device, full=True)
                ctx.progress(cell)
                cells.append(cell)
            release(ctx.device)
        for m in skipped:
            cells.append(
                {
                    "section": "decode",
                    "mode": "attention",
                    "method": m.name,
                    "n": n,
                    "median_s": None,
                    "peak_mib": None,
                    "error": f"{m.name} has no decode cache in this benchmark",
                }
            )
    del model
    release(ctx.device)
    return cells
