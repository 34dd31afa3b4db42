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
    positions: ``(B, L)`` long RoPE position of the token on each slot (what q and k were
        rotated at), or None when slot s holds position s. Used by ``rope="axis"``.
    n_slots: L, the largest number of real tokens in a row.
    """

    slot: torch.Tensor | None
    real: torch.Tensor | None
    valid: torch.Tensor | None
    n_slots: int
    positions: torch.Tensor | None = None

    @property
    def is_identity(self) -> bool:
        return self.slot is None


def _check_positions(position_ids: torch.Tensor, batch: int, n_tokens: int, device) -> torch.Tensor:
    """Validate and broadcast position ids to ``(B, N)`` long."""
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != n_tokens or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids must have shape ({batch}, {n_tokens}) or (1, {n_tokens}); got {tuple(position_ids.shape)}"
        )
    return position_ids.to(device=device, dtype=torch.long).expand(batch, n_tokens)


def plan_fold(
    batch: int,
    n_tokens: int,
    position_ids: torch.Tensor | None,
    padding_mask: torch.Tensor | None,
    device: torch.device,
) -> Fold:
    """Place the real tokens of each row on consecutive slots ``0, 1, 2, ...``; O(N) work and memory.

    A real token's slot is its rank among the real tokens of its row, so padding anywhere
    (left, right, or holes) leaves real tokens on the multi-index they would have without
    padding, whether or not the caller shifted the position ids. Position ids only say at
    which RoPE position q and k were rotated (needed by ``rope="axis"``); among real tokens
    they must increase strictly (restarting positions, as in packed sequences, are refused).

    position_ids: ``(B, N)`` or ``(1, N)`` integer RoPE positions, None for ``arange(N)``.
    padding_mask: ``(B, N)``, nonzero/True for real tokens, None when there is no padding.
    """
    real = None
    if padding_mask is not None:
        if padding_mask.dim() != 2 or padding_mask.shape[-1] != n_tokens or padding_mask.shape[0] not in (1, batch):
            raise ValueError(
                f"padding_mask must have shape ({batch}, {n_tokens}) (1 for real tokens, 0 for padding); "
                f"got {tuple(padding_mask.shape)}. Tensorized attention takes O(N) masks, never (B, N, N)."
            )
        real = padding_mask.to(device=device, dtype=torch.bool).expand(batch, n_tokens)
        if bool(real.all()):
            real = None
    arange = torch.arange(n_tokens, device=device)
    pos = None
    if position_ids is not None:
        pos = _check_positions(position_ids, batch, n_tokens, device)
        is_real = real if real is not None else torch.ones(batch, n_tokens, dtype=torch.bool, device=device)
        if bool((pos[is_real] < 0).any()):
            raise ValueError("position_ids of real tokens must be >= 0")
        masked = torch.where(is_real, pos, torch.full_like(pos, -1))
        running_max = torch.cummax(masked, dim=-1).values
        previous = torch.cat([torch.full_like(pos[:, :1], -1), running_max[:, :-1]], dim=-1)
        if bool((is_real & (pos <= previous)).any()):
            raise ValueError(
                "position_ids of real tokens must increase strictly along each row; packed sequences whose "
                "positions restart are not supported by tensorized attention. Pack documents with continuous "
                "positions (separated by an EOS token) instead."
            )
    if real is None:
        positions = None if pos is None or bool((pos == arange).all()) else pos
        return Fold(slot=None, real=None, valid=None, n_slots=n_tokens, positions=positions)

    counts = real.sum(dim=-1)  # (B,)
    n_slots = max(int(counts.max().item()), 1)
    slot = (real.long().cumsum(dim=-1) - 1).clamp(min=0)  # rank among the row's real tokens
    valid = torch.arange(n_slots, device=device)[None, :] < counts[:, None]  # (B, L)
    token_pos = pos if pos is not None else arange[None].expand(batch, n_tokens)
    positions = torch.zeros(batch, n_slots, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)[:, None].expand(batch, n_tokens)
    positions[rows[real], slot[real]] = token_pos[real]
    # Slots past a row's real tokens are masked; give them consecutive positions (never used as keys).
    tail = positions.gather(1, (counts - 1).clamp(min=0)[:, None]) + 1 + torch.arange(n_slots, device=device)[None]
    positions = torch.where(valid, positions, tail - counts[:, None])
    if bool((positions == torch.arange(n_slots, device=device)[None]).all()):
        positions = None
    return Fold(slot=slot, real=real, valid=valid, n_slots=n_slots, positions=positions)


def fold(x: torch.Tensor, plan: Fold) -> torch.Tensor:
    """Tokens to slots: ``(B, H, N, D)`` -> ``(B, H, L, D)``; padding tokens are dropped (zeros)."""
    if plan.is_identity:
        return x
    b, h, _, d = x.shape
    out = x.new_zeros(b, h, plan.n_slots, d)
    # Padding tokens share a slot with a real token: zero them so the scatter only places real tokens.
    src = torch.where(plan.real[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
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
