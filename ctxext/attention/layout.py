"""The tensor layout of a sequence: axes, multi-indices, folding tokens by position id.

Position ``p`` has multi-index ``(i_1, ..., i_m)`` with ``p = sum_j i_j * s_j`` (row-major,
``s_m = 1``). Tokens are placed on the slot equal to their position id, so left padding
keeps real tokens on the multi-index they would have without padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def full_axes(n_slots: int, block_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """All m axes ``(n_1, n_2, ..., n_m)`` with ``n_1 = ceil(n_slots / prod(block_sizes))``.

    Used by the reference; leading axes of size 1 are kept (a hop along them is the identity).
    """
    return (max(1, math.ceil(n_slots / math.prod(block_sizes))), *block_sizes)


def compact_axes(n_slots: int, block_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The axes a fast path materialises: leading size-1 axes dropped, the new leading axis cut.

    After dropping a size-1 leading axis, the next axis only needs the entries that hold a
    position ``< n_slots`` (the rest would be masked), so ``N = 20`` with
    ``block_sizes = (16, 16)`` gives ``(2, 16)``: 32 slots, not 256. The row-major
    multi-index of every position is unchanged, so results equal :func:`full_axes`.
    """
    axes = full_axes(n_slots, block_sizes)
    while len(axes) > 1 and axes[0] == 1:
        axes = axes[1:]
        span = math.prod(axes[1:])
        axes = (min(axes[0], math.ceil(n_slots / span)), *axes[1:])
    return axes


def multi_index(n_slots: int, axes: tuple[int, ...], device=None) -> torch.Tensor:
    """Row-major multi-index of every slot: ``(n_slots, m)`` long tensor."""
    p = torch.arange(n_slots, device=device)
    strides = [math.prod(axes[j + 1 :]) for j in range(len(axes))]
    return torch.stack([(p // s) % n for s, n in zip(strides, axes)], dim=-1)


@dataclass
class Fold:
    """Where each token lands in the slot layout.

    slot: ``(B, N)`` long slot of each token, or None when token t sits on slot t.
    real: ``(B, N)`` bool, True for real (non-padding) tokens, or None when all are real.
    valid: ``(B, L)`` bool, True for slots that hold a real token, or None when all do.
    n_slots: L, one past the largest position id of a real token.
    """

    slot: torch.Tensor | None
    real: torch.Tensor | None
    valid: torch.Tensor | None
    n_slots: int

    @property
    def is_identity(self) -> bool:
        return self.slot is None


def plan_fold(
    batch: int,
    n_tokens: int,
    position_ids: torch.Tensor | None,
    padding_mask: torch.Tensor | None,
    device: torch.device,
) -> Fold:
    """Decide each token's slot from its position id; O(N) work and memory.

    position_ids: ``(B, N)`` or ``(1, N)`` integer RoPE positions, None for ``arange(N)``.
    padding_mask: ``(B, N)``, nonzero/True for real tokens, None when there is no padding.
    """
    real = None
    if padding_mask is not None:
        if padding_mask.dim() != 2 or padding_mask.shape[-1] != n_tokens:
            raise ValueError(
                f"padding_mask must have shape (batch, {n_tokens}) (1 for real tokens, 0 for padding); "
                f"got {tuple(padding_mask.shape)}. Tensorized attention takes O(N) masks, never (B, N, N)."
            )
        real = padding_mask.to(device=device, dtype=torch.bool).expand(batch, n_tokens)
        if bool(real.all()):
            real = None
    arange = torch.arange(n_tokens, device=device)
    if position_ids is None or bool((position_ids == arange).all()):
        return Fold(slot=None, real=real, valid=real, n_slots=n_tokens)

    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != n_tokens:
        raise ValueError(f"position_ids must have shape (batch, {n_tokens}); got {tuple(position_ids.shape)}")
    pos = position_ids.to(device=device, dtype=torch.long).expand(batch, n_tokens)
    is_real = real if real is not None else torch.ones(batch, n_tokens, dtype=torch.bool, device=device)
    if bool((pos[is_real] < 0).any()):
        raise ValueError("position_ids of real tokens must be >= 0")
    # Real tokens must have strictly increasing positions: one slot per token.
    masked = torch.where(is_real, pos, torch.full_like(pos, -1))
    running_max = torch.cummax(masked, dim=-1).values
    previous = torch.cat([torch.full_like(pos[:, :1], -1), running_max[:, :-1]], dim=-1)
    if bool((is_real & (pos <= previous)).any()):
        raise ValueError(
            "position_ids of real tokens must increase strictly along each row; packed sequences whose "
            "positions restart are not supported by tensorized attention. Pack documents with continuous "
            "positions (separated by an EOS token) instead."
        )
    n_slots = int(masked.max().item()) + 1 if bool(is_real.any()) else n_tokens
    n_slots = max(n_slots, 1)
    valid = torch.zeros(batch, n_slots, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)[:, None].expand(batch, n_tokens)
    valid[rows[is_real], pos[is_real]] = True
    slot = torch.where(is_real, pos, torch.zeros_like(pos))
    return Fold(slot=slot, real=real if real is not None else None, valid=valid, n_slots=n_slots)


def fold(x: torch.Tensor, plan: Fold) -> torch.Tensor:
    """Tokens to slots: ``(B, H, N, D)`` -> ``(B, H, L, D)``; padding tokens are dropped (zeros)."""
    if plan.is_identity:
        return x
    b, h, _, d = x.shape
    out = x.new_zeros(b, h, plan.n_slots, d)
    real = plan.real if plan.real is not None else torch.ones_like(plan.slot, dtype=torch.bool)
    # Padding tokens would collide on slot 0: zero them so the scatter only places real tokens.
    src = x * real[:, None, :, None].to(x.dtype)
    index = plan.slot[:, None, :, None].expand(b, h, -1, d)
    return out.scatter_add(2, index, src)


def unfold(y: torch.Tensor, plan: Fold) -> torch.Tensor:
    """Slots back to tokens: ``(B, H, L, D)`` -> ``(B, H, N, D)``; padding tokens get zeros."""
    if plan.is_identity:
        if plan.real is not None:
            return y * plan.real[:, None, :, None].to(y.dtype)
        return y
    b, h, _, d = y.shape
    index = plan.slot[:, None, :, None].expand(b, h, -1, d)
    out = y.gather(2, index)
    if plan.real is not None:
        out = out * plan.real[:, None, :, None].to(out.dtype)
    return out
