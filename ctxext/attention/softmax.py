"""A masked softmax that stays finite: empty rows give zero weights and lse ``-inf``.

Both the reference and the torch backend use it, so "an all-masked fiber contributes
nothing, never NaN" holds in the forward and in the backward pass.
"""

from __future__ import annotations

import torch

_TINY = 1e-30  # keeps log() and division finite on empty rows; such rows are zeroed anyway


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim where ``mask`` is True.

    logits: ``(..., K)``; mask: broadcastable to logits (True = key present).
    Returns ``(probs (..., K), lse (...))``; rows with no key get zeros and ``-inf``.
    """
    logits = logits.masked_fill(~mask, float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - row_max)  # masked entries: exp(-inf) = 0
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / total.clamp_min(_TINY)
    lse = torch.where(
        total > 0, torch.log(total.clamp_min(_TINY)) + row_max, torch.full_like(total, float("-inf"))
    ).squeeze(-1)
    return probs, lse


def softmax_rows(
    logits: torch.Tensor, mask: torch.Tensor | None, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fast masked softmax for rows that always keep at least one key (the fast paths' invariant).

    logits: ``(..., K)``; mask: broadcastable bool (True = key present) or None for no mask.
    Returns ``(probs, lse or None)``: one fused softmax, and the log-sum-exp only when asked.
    """
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs, (torch.logsumexp(logits, dim=-1) if need_lse else None)
