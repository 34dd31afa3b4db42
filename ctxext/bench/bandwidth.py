"""The memory-bandwidth floor of an attention call: the least time its memory traffic allows.

**Bandwidth** ``W`` (bytes/s): ``dst.copy_(src)`` of one large tensor (1 GiB on CUDA,
256 MiB on CPU, larger than any cache), ``W = 2 * nbytes / t`` (read ``src`` + write
``dst``), ``t`` the median of a few timed copies after a warm-up.

**Bytes of tensorized attention** (forward), hop by hop, each tensor at ``e`` bytes per
element (the input dtype), ``L`` slots (``N`` padded to the axes of
:func:`ctxext.attention.layout.compact_axes`), ``Q = B * Hq * L * D`` and
``K = B * Hkv * L * D`` elements. A hop must at least read its inputs once and write its
outputs once:

* local hop (innermost axis): reads q, k, v and writes the causal stream ``C``, plus the
  full stream ``F`` when ``causal=complete`` and an outer hop follows:
  ``bytes = e * (Q + 2K + Q + [Q])``;
* each outer hop j: reads q, k and the streams it combines (``C``; also ``F`` in
  ``complete`` mode) and writes the new ``C`` (and ``F`` in ``complete`` mode unless it is
  the last hop): ``bytes = e * (Q + K + Q + [Q] + Q + [Q])``;
* ``merge=lse`` adds one log-sum-exp per stream read and written: ``e * B * Hq * L`` each;
* ``long_range=False`` keeps only the local hop, writing ``C`` only.

**Forward + backward**: each hop's backward reads its forward inputs and the gradients of
its outputs and writes the gradients of its inputs, so it moves at least
``2 * in + out`` bytes; ``fwd+bwd = sum over hops of (3 * in + 2 * out)``.

**Exact attention** (SDPA, FlashAttention-2) as one hop: forward ``e * (2Q + 2K)`` (read q,
k, v, write o); forward + backward ``e * (3 * (Q + 2K) + 2Q)``.

The floor is ``bytes / W`` seconds; the benchmark reports measured time as a multiple of it
(``x floor``: 1 would be a kernel that only streams memory at copy speed).
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any

import torch

from ..attention.layout import compact_axes
from ..attention.options import TensorizedOptions
from .measure import release, timed


def copy_bandwidth(device: torch.device, mib: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """Copy bandwidth of ``device``: ``{"bytes_per_s", "gib_per_s", "tensor_mib", "median_s"}``."""
    mib = mib or (1024 if device.type == "cuda" else 256)
    n = mib * 2**20 // 4  # float32 elements
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy = functools.partial(dst.copy_, src)
    timed(copy, device)  # warm-up: page faults, first touch
    times = [timed(copy, device) for _ in range(repeats)]
    del src, dst, copy
    release(device)
    median = statistics.median(times)
    moved = 2 * mib * 2**20  # read + write
    return {
        "bytes_per_s": moved / median,
        "gib_per_s": moved / median / 2**30,
        "tensor_mib": mib,
        "median_s": median,
        "method": f"dst.copy_(src) of {mib} MiB, (read + write bytes) / median of {repeats} copies",
    }


def tensorized_hop_bytes(
    batch: int, hq: int, hkv: int, n: int, d: int, elem_bytes: int, options: TensorizedOptions
) -> list[dict[str, int]]:
    """Least bytes read and written by each forward hop, local hop first: ``[{"in", "out"}, ...]``."""
    axes = compact_axes(n, tuple(options.block_sizes))
    slots = math.prod(axes)
    q = batch * hq * slots * d * elem_bytes  # one (B, Hq, L, D) tensor
    k = batch * hkv * slots * d * elem_bytes  # one (B, Hkv, L, D) tensor
    lse = batch * hq * slots * elem_bytes if options.merge != "score" else 0  # one (B, Hq, L) tensor
    complete = options.causal == "complete"
    outer = len(axes) - 1 if options.long_range else 0
    hops = []
    streams_out = 2 if complete and outer else 1
    hops.append({"in": q + 2 * k, "out": streams_out * (q + lse)})
    for j in range(outer):
        last = j == outer - 1
        streams_in = 2 if complete else 1
        streams_out = 2 if complete and not last else 1
        hops.append({"in": q + k + streams_in * (q + lse), "out": streams_out * (q + lse)})
    return hops


def exact_bytes(batch: int, hq: int, hkv: int, n: int, d: int, elem_bytes: int) -> list[dict[str, int]]:
    """Exact causal attention as one hop: read q, k, v, write o."""
    q = batch * hq * n * d * elem_bytes
    k = batch * hkv * n * d * elem_bytes
    return [{"in": q + 2 * k, "out": q}]


def floor_bytes(hops: list[dict[str, int]], mode: str) -> int:
    """Total least bytes for ``mode`` ``fwd`` (in + out) or ``fwdbwd`` (3 in + 2 out) per hop."""
    if mode == "fwd":
        return sum(h["in"] + h["out"] for h in hops)
    if mode == "fwdbwd":
        return sum(3 * h["in"] + 2 * h["out"] for h in hops)
    raise ValueError(f"unknown mode {mode!r}; expected fwd or fwdbwd")
