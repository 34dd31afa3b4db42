"""A growable per-slot tensor: what the decode state keeps for a contiguous range of slots."""

from __future__ import annotations

import torch


class SlotBuffer:
    """Tensors for slots ``[start, end)`` of one sequence, stored as ``(H, capacity, *tail)``.

    Appends go to ``end`` (capacity doubles, so appending one slot at a time is amortised
    O(1) copies per slot); ``trim`` forgets the slots before a new start.
    """

    def __init__(self, heads: int, tail: tuple[int, ...], dtype: torch.dtype, device: torch.device, start: int = 0):
        self.heads, self.tail, self.dtype, self.device = heads, tail, dtype, device
        self.start = start
        self.size = 0
        self.data = torch.empty(heads, 0, *tail, dtype=dtype, device=device)

    @property
    def end(self) -> int:
        return self.start + self.size

    def extend(self, x: torch.Tensor) -> None:
        """Append ``x`` of shape ``(H, n, *tail)`` at slots ``[end, end + n)``."""
        n = x.shape[1]
        if self.size + n > self.data.shape[1]:
            capacity = max(16, 2 * (self.size + n))
            grown = torch.empty(self.heads, capacity, *self.tail, dtype=self.dtype, device=self.device)
            grown[:, : self.size] = self.data[:, : self.size]
            self.data = grown
        self.data[:, self.size : self.size + n] = x.detach().to(self.dtype)
        self.size += n

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Entries at ``slots`` (any shape, all in ``[start, end)``): ``(H, *slots.shape, *tail)``."""
        return self.data[:, slots - self.start]

    def trim(self, new_start: int) -> None:
        """Forget slots before ``new_start`` (no-op when already past it)."""
        drop = min(max(0, new_start - self.start), self.size)
        if drop == 0:
            return
        keep = self.data[:, drop : self.size].clone()
        self.data, self.size, self.start = keep, self.size - drop, self.start + drop

    def clone(self) -> SlotBuffer:
        other = SlotBuffer(self.heads, self.tail, self.dtype, self.device, self.start)
        other.data, other.size = self.data[:, : self.size].clone(), self.size
        return other

    def nbytes(self) -> int:
        """Bytes held for the live slots (not the spare capacity)."""
        return self.size * self.heads * self.data.element_size() * int(torch.Size(self.tail).numel())
