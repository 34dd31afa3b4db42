"""transformers integration: ``attn_implementation="tensorized"``.

``register()`` (run by ``import ctxext``) adds two functions to transformers' interfaces:

* ``AttentionInterface["tensorized"]``: called by every attention layer of models that go
  through the interface, with q ``(B, Hq, N, D)``, k/v ``(B, Hkv, N, D)``; returns
  ``(B, N, Hq, D)`` like the sdpa integration. Settings come from
  ``module.config.tensorized_attention``. Layers the model runs with a sliding window keep
  exact sliding-window attention; ``softcap`` is applied to the scores.
* ``AttentionMaskInterface["tensorized"]``: returns the O(N) padding mask ``(B, kv_len)``
  (or None when there is no padding) instead of a ``(B, 1, N, N)`` mask. Without it,
  transformers would drop padding masks for an unknown implementation.

No model forward method is patched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings

import torch

from . import summary, transfer
from .cache import cached_tensorized_attention, layer_for_keys
from .context_parallel import active_group, context_parallel_attention
from .exact import exact_causal_attention
from .ops import tensorized_attention_with_options
from .options import TensorizedConfigError, TensorizedOptions
from .rope import inv_freq_from_config

ATTN_IMPLEMENTATION = "tensorized"
CONFIG_KEY = "tensorized_attention"

_options_cache: dict[tuple, TensorizedOptions] = {}
_inv_freq_cache: dict[tuple, torch.Tensor] = {}


def options_from_config(config) -> TensorizedOptions:
    """The validated TA settings stored in a model config (defaults when absent), a growing far
    bias's start resolved against the config (:func:`with_bias_start`)."""
    raw = getattr(config, CONFIG_KEY, None) or {}
    if not isinstance(raw, dict):
        raw = dict(raw)
    unstarted = raw.get("retrieve_bias_growth") and not raw.get("retrieve_bias_from")
    native = native_context(config) if unstarted else 0  # read only when a growth needs its start
    key = (*sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in raw.items()), native)
    if key not in _options_cache:
        where = f"config.{CONFIG_KEY}"
        _options_cache[key] = with_bias_start(TensorizedOptions.from_dict(raw, where=where), config, where)
    return _options_cache[key]


def native_context(config) -> int:
    """Tokens the model is configured for: ``max_position_embeddings`` of its (text) config, 0 if none."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def with_bias_start(options: TensorizedOptions, config, where: str = "tensorized_attention") -> TensorizedOptions:
    """``options`` with a growing far bias's start filled in: ``retrieve_bias_from = 0`` means the
    model's context, :func:`native_context` of ``config``. Unchanged without retrieval or a growth
    (nothing to start), or with a start."""
    if not (options.retrieve and options.retrieve_bias_growth) or options.retrieve_bias_from:
        return options
    native = native_context(config)
    if native <= 0:
        raise TensorizedConfigError(
            f"{where}.retrieve_bias_from: 0 starts the growing far bias at the model's context "
            "(max_position_embeddings), but the model config has none; set retrieve_bias_from (tokens), e.g. 8192"
        )
    return dataclasses.replace(options, retrieve_bias_from=native)


def _inv_freq(config, device: torch.device) -> torch.Tensor:
    """RoPE inverse frequencies of ``config`` on ``device``, cached (configs are not hashable)."""
    rope = json.dumps(getattr(config, "rope_parameters", None), sort_keys=True, default=str)
    key = (id(config), rope, getattr(config, "head_dim", None), str(device))
    if key not in _inv_freq_cache:
        _inv_freq_cache[key] = inv_freq_from_config(config).to(device)
    return _inv_freq_cache[key]


def tensorized_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """O(N) mask for tensorized attention: the 2D padding mask ``(B, kv_length)`` or None."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[-1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def tensorized_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface entry point. Returns ``((B, N, Hq, D), None)``."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"tensorized attention takes an O(N) padding mask of shape (batch, kv_len), got a "
            f"{attention_mask.dim()}D mask of shape {tuple(attention_mask.shape)}. Pass a 2D attention_mask "
            "(1 for tokens, 0 for padding) to the model; custom 4D masks are not supported."
        )
    if not getattr(module, "is_causal", True):
        raise ValueError(f"tensorized attention is causal only; {type(module).__name__} is not a causal layer")
    if dropout and module.training:
        warnings.warn("ctxext: attention dropout is ignored by tensorized attention", stacklevel=2)
    if sliding_window is not None:
        # Layers that the model runs with a sliding window keep their exact window.
        mask = attention_mask[:, -key.shape[-2] :] if attention_mask is not None else None
        out = exact_causal_attention(
            query, key, value, window=sliding_window, padding_mask=mask, scaling=scaling, softcap=softcap
        )
        return out.transpose(1, 2).contiguous(), None

    config = module.config
    opts = options_from_config(config)
    needs_freq = opts.rope == "axis" or opts.summary != "token"
    inv_freq = _inv_freq(config, query.device) if needs_freq else None
    if position_ids is not None and position_ids.dim() == 3:
        raise ValueError("tensorized attention does not support multi-dimensional (mrope) position ids")
    common = dict(
        position_ids=position_ids,
        padding_mask=attention_mask,
        scaling=scaling,
        softcap=softcap,
        rope_inv_freq=inv_freq,
    )
    cache_layer = layer_for_keys(key)
    cp_group = active_group()  # context_parallel_attention refuses what it cannot shard itself
    if opts.summary != "token" and cp_group is None:
        if cache_layer is not None and query.shape[-2] != key.shape[-2]:
            raise NotImplementedError(
                f"tensorized_attention.summary={opts.summary!r} is not supported by the decode cache yet; "
                "generate with use_cache=False (ctxext generate --no-cache)"
            )
        cache_layer = None  # a first forward pass: the plain operator (the cache keeps k/v only)
    if cache_layer is not None:  # a transformers cache with tensorized decode state (DESIGN.md section 5)
        out = cached_tensorized_attention(cache_layer, query, key, value, opts, **common)
    elif cp_group is not None:  # context parallel: this rank holds a shard of the sequence (DESIGN.md section 7)
        out = context_parallel_attention(query, key, value, opts, group=cp_group, **common)
    else:
        extra = summary.arguments_for(module) if opts.summary == "learned" else {}

        def run(q, k, v):
            return tensorized_attention_with_options(q, k, v, opts, **common, **extra)

        if transfer.collecting():  # attention transfer: the layer returns exact attention, TA's error is recorded
            exact = functools.partial(
                exact_causal_attention, padding_mask=attention_mask, scaling=scaling, softcap=softcap
            )
            out = transfer.record(run, exact, query, key, value, attention_mask)
        else:
            out = run(query, key, value)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"tensorized"`` with transformers' attention and mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, tensorized_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, tensorized_mask)
