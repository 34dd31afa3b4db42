"""Differentiable collectives for context parallelism, over ``torch.distributed`` (NCCL or gloo).

One primitive carries every exchange of ``context_parallel.py``: :func:`exchange` sends one
tensor to each rank of a group and receives one from each (an all-to-all with uneven sizes,
``all_to_all_single`` on a flat buffer). Its backward is the reverse all-to-all: the
gradient of what rank r received from rank s goes back from r to s. Sequence-to-head
resharding (DeepSpeed Ulysses), the sink broadcast and the window halo are all built on it.

Every rank of the group must call the same collectives in the same order. In backward,
autograd runs them in reverse creation order on every rank, so each rank must also keep
every collective's output on its path to the loss (:func:`keep_in_graph`), or the other
ranks wait for a backward that never comes (until the group's timeout).

:func:`check_same_settings` all-gathers a digest of the settings each rank was called
with, so a mismatch raises a clear error on every rank instead of a hang or garbage.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist


class ContextParallelError(ValueError):
    """Context-parallel attention cannot run with these inputs; the message says what to change."""


def group_rank_and_size(group) -> tuple[int, int]:
    """This process's rank inside ``group`` and the group's size."""
    if not dist.is_available() or not dist.is_initialized():
        raise ContextParallelError(
            "context-parallel attention needs torch.distributed: call torch.distributed.init_process_group "
            "(NCCL on GPUs, gloo on CPUs) or launch through accelerate/torchrun first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """Flat all-to-all: ``flat`` holds the chunks for ranks 0..R-1 back to back."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group):
        ctx.send_sizes, ctx.recv_sizes, ctx.group = send_sizes, recv_sizes, group
        out = flat.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, flat.contiguous(), recv_sizes, send_sizes, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(sum(ctx.send_sizes))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_sizes, ctx.recv_sizes, group=ctx.group)
        return back, None, None, None


def exchange(sends: Sequence[torch.Tensor], recv_shapes: Sequence[tuple[int, ...]], group) -> list[torch.Tensor]:
    """Send ``sends[r]`` to rank r and receive a tensor of ``recv_shapes[r]`` from every rank r.

    All tensors share one dtype and device; any of them may be empty. Differentiable: the
    backward sends each received tensor's gradient back to the rank it came from.
    """
    flat = torch.cat([s.reshape(-1) for s in sends])
    recv_sizes = [math.prod(shape) for shape in recv_shapes]
    out = _AllToAll.apply(flat, [s.numel() for s in sends], recv_sizes, group)
    return [piece.view(shape) for piece, shape in zip(out.split(recv_sizes), recv_shapes)]


def keep_in_graph(x: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
    """``x`` with a zero-valued dependence on ``unused`` so their collectives run in every rank's backward."""
    for u in unused:
        if u.requires_grad:
            x = x + u.reshape(-1)[:0].sum()  # an empty slice: adds 0, reads nothing, gives u a zero gradient
    return x


def settings_digest(settings: dict) -> int:
    """A stable 63-bit digest of a settings dict (Python's ``hash`` differs between processes)."""
    text = repr(sorted((k, repr(v)) for k, v in settings.items()))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def check_same_settings(settings: dict, shard_length: int, group, device: torch.device) -> list[int]:
    """All-gather (digest, shard length); raise on every rank if the settings differ between ranks.

    Returns the shard length of every rank of ``group``, in rank order.
    """
    rank, size = group_rank_and_size(group)
    mine = torch.tensor([settings_digest(settings), shard_length], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(gathered, mine, group=group)
    rows = [t.tolist() for t in gathered]
    differing = [r for r, row in enumerate(rows) if row[0] != rows[0][0]]
    if differing:
        raise ContextParallelError(
            f"context-parallel attention: the settings differ across the ranks of the context group (rank(s) "
            f"{differing} differ from rank 0; this is rank {rank} with {settings}). Every rank of a group must "
            "run the same model, options, batch size, head counts, dtype and autograd mode on its shard."
        )
    return [row[1] for row in rows]
