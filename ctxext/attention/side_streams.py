"""Sinks and retrieved far blocks as side streams of the local hop (the fused backend's way).

The torch backend puts the sink keys into the local hop's softmax rows and merges the
retrieved far blocks into its causal stream. The Triton local-hop kernel knows neither, so the
Triton backend computes each as a separate stream, an output and its log-sum-exp over a key
set disjoint from the local hop's, and folds it in with
:func:`ctxext.attention.retrieve.merge_streams`: one softmax over the union of the key sets,
the same attention as the torch backend up to rounding (DESIGN.md invariant 8).

The sink stream costs ``O(L * sinks * D)``: it stays in PyTorch. The retrieved stream runs on
the fused retrieval kernel (``ctxext._kernels.retrieve``) in the stacked frame and on
:func:`ctxext.attention.retrieve.read_chosen_blocks` in the ordered frame.
"""

from __future__ import annotations

import torch

from .options import TensorizedOptions
from .retrieve import (
    far_block_index,
    local_range_start,
    ordered_frame_freq,
    read_chosen_blocks,
    retrievable_keys,
    selection_frame,
)
from .rope import rerotate
from .softmax import masked_softmax


def block_start(slots: torch.Tensor, n: int) -> torch.Tensor:
    """First slot of each slot's inner block of ``n`` slots (the full stream's key range)."""
    return torch.div(slots, n, rounding_mode="floor") * n


def sink_stream(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    range_start: torch.Tensor,
    opts: TensorizedOptions,
    scale: float,
    softcap: float | None,
    inv_freq: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the sinks that lie before its key range.

    q: ``(B, Hq, L, D)`` unscaled; k, v: ``(B, Hkv, L, D)``; valid: ``(B, L)`` bool;
    positions: ``(B, L)`` float RoPE positions; range_start: ``(L,)`` first slot of each query's
    own key range (sink ``t`` is added when ``t < range_start``, else the range holds it).
    With ``rope="axis"`` the query moves to coordinate ``p - range_start`` and sink ``t`` to
    coordinate ``t``, as in the torch backend. Returns the output ``(B, Hq, L, D)`` and its
    log-sum-exp ``(B, Hq, L)`` (zeros and ``-inf`` where no sink applies).
    """
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    n_sinks = min(opts.sinks, length)
    slots = torch.arange(length, device=q.device)
    sink_k, sink_v = k[:, :, :n_sinks], v[:, :, :n_sinks]  # (B, Hkv, s, D)
    if opts.rope == "axis":
        q = rerotate(q, ((slots - range_start).to(positions.dtype)[None] - positions)[:, None, :], inv_freq)
        t = torch.arange(n_sinks, device=q.device, dtype=positions.dtype)
        sink_k = rerotate(sink_k, (t[None] - positions[:, :n_sinks])[:, None, :], inv_freq)
    scores = (q.reshape(b, hkv, g * length, d) @ sink_k.transpose(-1, -2)) * scale  # (B, Hkv, g * L, s)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    t = torch.arange(n_sinks, device=q.device)
    mask = (t[None, :] < range_start[:, None])[None, None] & valid[:, None, None, :n_sinks]  # (B, 1, L, s)
    probs, lse = masked_softmax(scores.view(b, hq, length, n_sinks), mask)
    out = probs.view(b, hkv, g * length, n_sinks) @ sink_v  # (B, Hkv, g * L, D)
    return out.view(b, hq, length, d), lse


def retrieved_stream(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    opts: TensorizedOptions,
    n: int,
    scale: float,
    softcap: float | None,
    inv_freq: torch.Tensor | None,
    fused: bool,
    precision: str = "ieee",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over its ``opts.retrieve`` chosen far blocks.

    q: ``(B, Hq, L, D)`` unscaled; k, v: ``(B, Hkv, L, D)``; valid ``(B, L)`` bool; positions
    ``(B, L)`` float; n: the inner block (it sets the local range). The choice is
    :func:`far_block_index` (no gradient), as in the torch backend. fused: make the choice with
    the fused kernels (:mod:`ctxext.attention.fused_choice`; precision: their ``tl.dot``'s for the
    bound) and read the blocks with the Triton retrieval kernel (stacked frame only; the ordered
    frame always takes the PyTorch path).
    Returns the output ``(B, Hq, L, D)`` and log-sum-exp ``(B, Hq, L)`` (``-inf``: chose nothing).
    """
    qs, ks = selection_frame(q, k, positions, opts, inv_freq, n)
    key_ok = retrievable_keys(valid, opts.sinks)
    order = ordered_frame_freq(opts, inv_freq)
    m = opts.retrieval_block
    if fused and order is None:
        from .fused_choice import choose
        from .triton_retrieve import ta_retrieve

        index = choose(qs, ks, key_ok, opts, n, precision)
        return ta_retrieve(qs, ks, v, index, key_ok, m, float(scale), float(softcap or 0.0))
    index = far_block_index(qs, ks, key_ok, opts, n)
    return read_chosen_blocks(qs * scale, ks, v, index, key_ok, m, softcap, order)


__all__ = ["block_start", "local_range_start", "retrieved_stream", "sink_stream"]
