"""Attention transfer: fit tensorized attention's learned parts to exact attention, layer by layer.

Inside :func:`attention_transfer`, every full-attention layer that runs tensorized attention

* computes exact causal attention on its q, k, v and returns it, so the model runs as the
  original full-attention model and each layer sees the inputs it was pretrained on;
* computes tensorized attention on the same q, k, v, **detached**, and records its error
  against the exact output: ``|TA - exact|^2 / |exact|^2`` summed over heads, positions and
  channels of the layer (a relative squared error, so layers of different scale weigh alike).

Gradients of the recorded errors reach only what tensorized attention adds (the learned summary
queries and key gates of ``summary="learned"``): the model's own weights cannot lower the error
by moving the target, so there is no degenerate solution. This is the "attention transfer"
stage of linear-attention conversions (LoLCATs, Zhang et al. 2024) applied to the long-range
hop: it asks the far-block summaries directly for what full attention would fetch, on every
token of every layer, instead of waiting for a sparse language-model signal to reach them
through a path that carries under 15% of the softmax mass.
"""

from __future__ import annotations

import contextlib

import torch

_errors: list[torch.Tensor] | None = None


@contextlib.contextmanager
def attention_transfer():
    """Collect one relative error ``()`` per tensorized layer call into the yielded list."""
    global _errors
    previous, _errors = _errors, []
    try:
        yield _errors
    finally:
        _errors = previous


def collecting() -> bool:
    return _errors is not None


def relative_error(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``sum |out - target|^2 / sum |target|^2`` over real tokens; out, target ``(B, H, N, D)``, valid ``(B, N)``."""
    diff = (out.float() - target.float()).square().sum(dim=(1, 3))  # (B, N)
    norm = target.float().square().sum(dim=(1, 3))
    if valid is not None:
        diff, norm = diff * valid, norm * valid
    return diff.sum() / norm.sum().clamp_min(1e-12)


def record(tensorized, exact, query, key, value, padding_mask) -> torch.Tensor:
    """Run both attentions for one layer; record the error, return the exact output ``(B, Hq, N, D)``.

    ``tensorized(q, k, v)`` and ``exact(q, k, v)`` take ``(B, H, N, D)`` tensors.
    """
    with torch.no_grad():
        target = exact(query, key, value)
    out = tensorized(query.detach(), key.detach(), value.detach())
    _errors.append(relative_error(out, target, padding_mask))
    return target.to(query.dtype)
