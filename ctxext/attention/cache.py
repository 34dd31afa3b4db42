"""The transformers cache for tensorized attention (DESIGN.md section 5).

**The channel.** transformers hands an attention function the k and v that
``Cache.update`` returned, never the cache. ctxext registers :class:`TensorizedCacheLayer`
as the cache layer for ``"full_attention"`` layers (transformers' own ``_layer_type``
registration), so every ``DynamicCache`` built from a model config, including the one
``generate`` builds, uses it. Its ``update`` publishes the layer (thread-local); the
tensorized attention function takes it back with :func:`layer_for_keys` only when the key
tensor it received *is* that layer's keys (an identity check), so a stale or foreign layer
is never used. The layer then carries the decode state of :mod:`ctxext.attention.decode`
beside its k and v. For other attention implementations the layer is a plain
``DynamicLayer``: the state is only created by tensorized attention.
"""

from __future__ import annotations

import threading
import weakref

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .decode import LayerGeometry, RowState, extend_row
from .ops import tensorized_attention_with_options

_published = threading.local()


class TensorizedCacheError(RuntimeError):
    """A cache that cannot serve this call (filled elsewhere, or by other settings)."""


class TensorizedDecodeState:
    """Per-layer decode state: one :class:`RowState` per batch row, and the tokens seen so far."""

    def __init__(self, geometry: LayerGeometry, batch: int, dtype: torch.dtype, device: torch.device):
        self.geometry = geometry
        self.rows = [RowState(geometry, dtype, device) for _ in range(batch)]
        self.tokens_seen = 0

    def check(self, geometry: LayerGeometry, batch: int) -> None:
        if geometry != self.geometry:
            raise TensorizedCacheError(
                "this cache was filled by a model with other tensorized-attention settings or shapes "
                f"({self.geometry}) and cannot serve this one ({geometry}). Use a new cache per model and settings "
                f"(generate builds one when no cache is passed as {CACHE_KEYWORD}=)."
            )
        if batch != len(self.rows):
            raise TensorizedCacheError(
                f"this cache holds {len(self.rows)} sequences but the call has batch size {batch}; use a new cache"
            )

    def nbytes(self) -> int:
        return sum(row.nbytes() for row in self.rows)

    def select_rows(self, indices: list[int]) -> None:
        """Keep/reorder/repeat rows (beam search); a row that appears twice is copied."""
        seen: set[int] = set()
        rows = []
        for i in indices:
            rows.append(self.rows[i].clone() if i in seen else self.rows[i])
            seen.add(i)
        self.rows = rows


class TensorizedCacheLayer(DynamicLayer):
    """A ``DynamicLayer`` that can also carry tensorized decode state, with an amortised append.

    ``DynamicLayer.update`` concatenates the whole cache on every token (``O(N)`` copies per
    token: at 128k this dominates a decode step). Under ``no_grad`` this layer writes new k/v
    into a buffer with up to 1/8 spare capacity and returns views of its filled part. If
    anything else replaced ``keys``/``values`` (crop, beam reorder, offloading), the buffer is
    rebuilt from them on the next update.
    """

    _layer_type = "full_attention"  # registers this class for full-attention layers of DynamicCache

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tensorized: TensorizedDecodeState | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (k, v): (B, H, capacity, D)
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None  # what keys/values were set to

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self._buffers = self._views = None
        else:
            keys, values = self._append(key_states, value_states)
        _published.layer = weakref.ref(self)
        return keys, values

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``(B, H, n, D)`` new k/v after the cached ones; returns views ``(B, H, T, D)``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        total = length + key_states.shape[-2]
        fresh = self._views is None or self.keys is not self._views[0] or self.values is not self._views[1]
        if fresh or total > self._buffers[0].shape[-2] or self._buffers[0].shape[:2] != key_states.shape[:2]:
            capacity = total + max(256, total // 8)
            buffers = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buf = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
                if length:
                    buf[..., :length, :] = old
                buffers.append(buf)
            self._buffers = (buffers[0], buffers[1])
        k_buf, v_buf = self._buffers
        k_buf[..., length:total, :] = key_states
        v_buf[..., length:total, :] = value_states
        self.keys, self.values = k_buf[..., :total, :], v_buf[..., :total, :]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self.tensorized = None
        self._buffers = self._views = None

    def crop(self, tokens_to_remove: int) -> None:
        if self.tensorized is not None and tokens_to_remove != 0:
            raise TensorizedCacheError(
                "cropping a tensorized decode cache is not supported (assisted decoding / speculative rollback); "
                "generate without an assistant model"
            )
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.tensorized is not None:
            self.tensorized.select_rows([i for i in range(len(self.tensorized.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.tensorized is not None:
            self.tensorized.select_rows(torch.as_tensor(indices).flatten().tolist())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.tensorized is not None:
            self.tensorized.select_rows(beam_idx.flatten().tolist())


class TensorizedCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers carry tensorized decode state.

    ``generate`` builds one by itself on a converted model (``DynamicCache(config=...)``
    already uses :class:`TensorizedCacheLayer`); build it yourself to keep it across calls
    or to read :meth:`memory`. Pass the model config (needed for sliding-window layers).
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        if config is None:
            self.layer_class_to_replicate = TensorizedCacheLayer

    def memory(self) -> dict[str, int]:
        """Bytes held: ``kv`` (keys and values), ``tensorized`` (the extra decode state)."""
        return cache_memory(self)


def _cache_keyword() -> str:
    """The keyword a model call and ``generate`` take a cache by: ``past_key_values`` until
    transformers renamed it ``cache`` (5.2x, the old name deprecated: a FutureWarning per call)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


CACHE_KEYWORD = _cache_keyword()


def cache_argument(cache) -> dict[str, object]:
    """``{keyword: cache}`` for ``model(...)`` or ``model.generate(...)`` on the installed transformers."""
    return {CACHE_KEYWORD: cache}


def cache_memory(cache) -> dict[str, int]:
    """Bytes a transformers cache holds: ``kv`` (keys and values) and ``tensorized`` (decode state)."""
    kv = extra = 0
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False) and layer.keys is not None:
            kv += layer.keys.numel() * layer.keys.element_size() * 2
        state = getattr(layer, "tensorized", None)
        extra += state.nbytes() if state is not None else 0
    return {"kv": kv, "tensorized": extra}


def layer_for_keys(keys: torch.Tensor) -> TensorizedCacheLayer | None:
    """The cache layer whose ``update`` returned ``keys`` just now, or None."""
    ref = getattr(_published, "layer", None)
    layer = ref() if ref is not None else None
    if layer is None or layer.keys is not keys:
        return None
    return layer


def cached_tensorized_attention(
    layer: TensorizedCacheLayer,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    opts,
    *,
    padding_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    rope_inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tensorized attention of new queries against everything ``layer`` holds.

    q: ``(B, Hq, Q, D)`` the new tokens; k, v: ``(B, Hkv, T, D)`` from the cache, new tokens
    last; padding_mask: ``(B, T)`` (True = real token) or None; position_ids: ``(B|1, Q)``.
    Returns ``(B, Hq, Q, D)``; padding tokens get zeros. Equals one forward pass over the
    whole sequence (tested): prefill, chunked prefill and token-by-token decoding.
    """
    b, hq, n_new, d = q.shape
    total = k.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    inv_freq = rope_inv_freq
    geometry = LayerGeometry(opts, hq, k.shape[1], d, float(scaling), float(softcap) if softcap else None)
    state = layer.tensorized
    past = total - n_new
    if state is None:
        if past != 0:
            raise TensorizedCacheError(
                f"this cache already holds {past} tokens that were not processed by tensorized attention (filled by "
                "another attention implementation or before ctxext was imported); start from an empty cache"
            )
        state = layer.tensorized = TensorizedDecodeState(geometry, b, k.dtype, k.device)
    state.check(geometry, b)
    if state.tokens_seen != past:
        raise TensorizedCacheError(
            f"cache out of step: its tensorized state covers {state.tokens_seen} tokens but k/v hold {past} before "
            "this call; the cache was modified outside tensorized attention"
        )
    real = None  # (B, Q) bool, None when every new token is real
    if padding_mask is not None:
        real = padding_mask[:, -n_new:].to(device=q.device, dtype=torch.bool)
    given_positions = position_ids is not None
    if position_ids is None:
        position_ids = torch.arange(past, total, device=q.device)[None]
    position_ids = position_ids.to(q.device).expand(b, n_new)
    if given_positions and state.tokens_seen:
        _check_positions_continue(state, position_ids, real)

    fresh = past == 0 and (opts.causal == "complete" or not opts.long_range)
    if fresh:  # a first prefill: the batched operator gives the outputs, the state is built beside it
        out = tensorized_attention_with_options(
            q,
            k,
            v,
            opts,
            position_ids=position_ids,
            padding_mask=real if real is not None and not bool(real.all()) else None,
            scaling=scaling,
            softcap=softcap,
            rope_inv_freq=inv_freq,
        )
    else:
        out = q.new_zeros(b, hq, n_new, d)
    with torch.no_grad():
        for row_index, row in enumerate(state.rows):
            if real is None:  # every new token is real: no device round trip
                sel, tok, tok_first = slice(None), torch.arange(past, total, device=q.device), past
            else:
                sel = real[row_index].nonzero().flatten()
                if sel.numel() == 0:
                    continue
                tok, tok_first = sel + past, None
            row_out = extend_row(
                row,
                k[row_index],
                v[row_index],
                q[row_index, :, sel].detach(),
                tok,
                position_ids[row_index, sel],
                inv_freq,
                tok_first=tok_first,
                want_outputs=not fresh,
            )
            if not fresh:
                out[row_index, :, sel] = row_out.to(out.dtype)
    state.tokens_seen = total
    return out


_checked_positions: list[weakref.ref] = []  # the position ids last checked (one check per forward, not per layer)


def _check_positions_continue(state: TensorizedDecodeState, position_ids: torch.Tensor, real) -> None:
    """Position ids of a cached call must continue each row's: checked once per forward pass."""
    if _checked_positions and _checked_positions[0]() is position_ids:
        return
    first_real = torch.zeros(len(state.rows), dtype=torch.long, device=position_ids.device)
    if real is not None:
        first_real = torch.where(real.any(-1), real.long().argmax(-1), torch.full_like(first_real, -1))
    new = position_ids.gather(1, first_real.clamp(min=0)[:, None])[:, 0].float()
    empty = torch.full((), float("-inf"), device=position_ids.device)
    last = torch.stack([row.pos.data[0, row.pos.size - 1] if row.pos.size else empty for row in state.rows])
    bad = (new <= last) & (first_real >= 0)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"position ids must keep increasing across cached calls: row {row} continues at {int(new[row])} "
            f"after {int(last[row])}"
        )
    _checked_positions[:] = [weakref.ref(position_ids)]
