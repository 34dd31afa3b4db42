"""Context parallelism: one sequence across the ranks of a process group (DESIGN.md section 7).

**Sharding.** The sequence of N tokens is folded onto the axes ``compact_axes(N, block_sizes)``
of the torch backend, ``(a_1, ..., a_k)``; an *outer block* is one index of the outermost axis,
``span = a_2 * ... * a_k`` consecutive slots. Rank r holds a contiguous range of whole outer
blocks: the ``a_1`` blocks are split as evenly as possible, the first ``a_1 % R`` ranks taking
one more (:func:`shard_ranges`). Only the very last block can be ragged, so only the last rank
holds fewer tokens than its slots; its tail is masked, as in the single-process operator. The
operator refuses sequences with fewer outer blocks than ranks (a rank would hold nothing).

**Algorithm**, per call, every rank:

1. All-gather a digest of the settings and each rank's shard length (mismatch: error on every
   rank; the lengths give N and must match :func:`shard_ranges`).
2. The local hop runs on the rank's shard. ``sinks`` need the first tokens and
   ``local="window"`` the previous inner block, which may lie on other ranks: one exchange
   sends each rank the k, v (and RoPE positions) of those slots, placed before its shard so
   the torch backend's local hop sees the same key sets as on one process.
3. The outer hops along axes ``a_k-1 .. a_2`` stay inside an outer block: local.
4. The outermost hop: an all-to-all trades the sequence shard for a head shard (DeepSpeed
   Ulysses): each rank receives q, k and the value streams (and lse for ``merge="lse"``) of
   every position for its query heads (an even split, the first ``Hq % R`` ranks one head
   more) and the key-value heads those need. When the kv heads do not split the same way
   (``Hkv % R != 0``, e.g. 3 kv heads on 2 ranks), each rank *gathers* every kv head its
   query heads use (a kv head may go to two ranks; its gradient is summed in backward); a
   rank whose query heads split a kv group gives each of them its own copy of k locally (v is
   never sent: the outer hop's values are the streams). The hop runs there, and a second
   all-to-all returns each rank's positions for all heads.

Everything is differentiable through :mod:`.collectives` (backward of an all-to-all is the
reverse all-to-all). Computation, and what is sent, is float32 (or the input's wider dtype),
like the torch backend, whose hop functions this module reuses. Cost per call: one small
all-gather (the digest) and 2 all-to-alls (3 with sinks or a window). Unsupported (clear
errors): padding masks, fewer queries than keys (decoding), fewer outer blocks or query heads
than ranks, far-block retrieval (``retrieve > 0``) and summaries other than ``token`` (the
shards would silently run another operator); the ``backend`` option is ignored here (warned
once).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .collectives import ContextParallelError, check_same_settings, exchange, group_rank_and_size, keep_in_graph
from .layout import compact_axes, multi_index
from .ops import check_shapes
from .options import TensorizedOptions
from .rope import rerotate
from .torch_backend import _local_hop, _outer_hop

# ---------------------------------------------------------------- sharding


def shard_ranges(n_tokens: int, world: int, block_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """Token range ``[start, end)`` of each of ``world`` ranks for a sequence of ``n_tokens``.

    Whole outer blocks per rank, as evenly as possible (the first ``blocks % world`` ranks get
    one more); the last rank holds the ragged end. Raises :class:`ContextParallelError` when
    there are fewer outer blocks than ranks.
    """
    blocks = shard_blocks(n_tokens, world, block_sizes)
    span = outer_span(n_tokens, block_sizes)
    return [(min(b0 * span, n_tokens), min(b1 * span, n_tokens)) for b0, b1 in blocks]


def outer_span(n_tokens: int, block_sizes: tuple[int, ...]) -> int:
    """Slots per outer block: the product of every axis but the outermost."""
    return math.prod(compact_axes(n_tokens, tuple(block_sizes))[1:])


def shard_blocks(n_tokens: int, world: int, block_sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """Outer-block range ``[b0, b1)`` of each rank (see :func:`shard_ranges`)."""
    axes = compact_axes(n_tokens, tuple(block_sizes))
    if len(axes) < 2 or axes[0] < world:
        count, span = (axes[0], math.prod(axes[1:])) if len(axes) > 1 else (1, n_tokens)
        raise ContextParallelError(
            f"context parallelism over {world} ranks needs at least {world} outer blocks, but a sequence of "
            f"{n_tokens} tokens with block_sizes {list(block_sizes)} has {count} outer block(s) of {span} tokens: "
            "use longer sequences, fewer ranks (parallel.context) or smaller block_sizes"
        )
    base, extra = divmod(axes[0], world)
    out, b0 = [], 0
    for r in range(world):
        b1 = b0 + base + (1 if r < extra else 0)
        out.append((b0, b1))
        b0 = b1
    return out


def head_ranges(n_heads: int, world: int) -> list[tuple[int, int]]:
    """Query-head range ``[h0, h1)`` of each rank in the outermost hop (first ``Hq % R`` ranks one more)."""
    base, extra = divmod(n_heads, world)
    out, h0 = [], 0
    for r in range(world):
        h1 = h0 + base + (1 if r < extra else 0)
        out.append((h0, h1))
        h0 = h1
    return out


def kv_range(heads: tuple[int, int], group_size: int) -> tuple[int, int]:
    """The key-value heads ``[k0, k1)`` that query heads ``[h0, h1)`` use (``group_size = Hq / Hkv``)."""
    return heads[0] // group_size, (heads[1] - 1) // group_size + 1


# ---------------------------------------------------------------- active group (transformers path)

_active_group: list = []
_warned: set[str] = set()


@contextlib.contextmanager
def context_parallel(group) -> Iterator[None]:
    """While active, ``attn_implementation="tensorized"`` runs context-parallel over ``group``.

    Each rank then feeds its shard of the tokens (:func:`shard_ranges`) with their global
    ``position_ids``. Wrap the forward *and* the backward: gradient checkpointing recomputes
    attention during backward. A module-level setting (not thread-local) so that the autograd
    threads see it too.
    """
    _active_group.append(group)
    try:
        yield
    finally:
        _active_group.pop()


def active_group():
    """The process group set by :func:`context_parallel`, or None."""
    return _active_group[-1] if _active_group else None


# ---------------------------------------------------------------- the operator


def _settings(q, k, v, opts, position_ids, padding_mask, scaling, softcap, inv_freq, world) -> dict:
    """What every rank of a group must agree on."""
    freq = None
    if inv_freq is not None:
        freq = hashlib.sha256(inv_freq.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
    return {
        "options": opts.to_dict(),
        "scaling": scaling,
        "softcap": softcap,
        "batch": q.shape[0],
        "heads": (q.shape[1], k.shape[1]),
        "head_dim": q.shape[-1],
        "dtype": str(q.dtype),
        "device": q.device.type,
        "requires_grad": (q.requires_grad, k.requires_grad, v.requires_grad),
        "grad_enabled": torch.is_grad_enabled(),
        "position_ids": position_ids is not None,
        "padding_mask": padding_mask is not None and not bool(padding_mask.bool().all()),
        "inv_freq": freq,
        "world": world,
    }


def _slot_positions(position_ids, batch: int, n_local: int, first_slot: int, n_slots: int, device, dtype):
    """RoPE positions ``(B, n_slots)`` of this rank's slots; padded slots continue the row."""
    if position_ids is None:
        return torch.arange(first_slot, first_slot + n_slots, device=device, dtype=dtype)[None].expand(batch, -1)
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2 or position_ids.shape[-1] != n_local or position_ids.shape[0] not in (1, batch):
        raise ContextParallelError(
            f"position_ids of this rank's shard must have shape ({batch}, {n_local}); got {tuple(position_ids.shape)}"
        )
    pos = position_ids.to(device=device, dtype=dtype).expand(batch, n_local)
    tail = pos[:, -1:] + 1 + torch.arange(n_slots - n_local, device=device, dtype=dtype)[None]
    return torch.cat([pos, tail], dim=1)


def _extra_ranges(slot_start: int, sinks: int, window: bool, inner: int) -> list[tuple[int, int]]:
    """Global slot ranges a rank whose shard starts at ``slot_start`` needs before its shard.

    Sinks need slots ``[0, P)`` (``P``: sinks rounded up to whole inner blocks, so blocks stay
    aligned); the window needs the previous inner block ``[slot_start - inner, slot_start)``.
    When these touch, the rank takes everything ``[0, slot_start)`` instead (only near the
    start of the sequence): the key sets of the local hop are then exactly those of one process.
    """
    if slot_start == 0:
        return []
    prefix = math.ceil(sinks / inner) * inner if sinks else 0
    halo = slot_start - inner if window else slot_start
    if prefix > halo:
        return [(0, slot_start)]
    ranges = [(0, prefix)] if prefix else []
    return ranges + ([(halo, slot_start)] if window else [])


def _fetch_extras(kvp: torch.Tensor, slot_ranges, needs, rank: int, group) -> torch.Tensor:
    """Exchange the slots every rank needs before its shard.

    kvp: ``(B, Ls, W)`` this rank's slots (k, v and positions packed); slot_ranges: every
    rank's slot range; needs: every rank's list of global slot ranges. Returns ``(B, E, W)``.
    """
    b, _, w = kvp.shape
    start, end = slot_ranges[rank]
    sends, shapes = [], []
    for wanted in needs:  # to each destination rank: my part of the slots it needs
        parts = [kvp[:, max(a, start) - start : min(e, end) - start] for a, e in wanted if min(e, end) > max(a, start)]
        sends.append(torch.cat(parts, 1) if parts else kvp[:, :0])
    for s, e in slot_ranges:  # what each source rank sends me, in source order
        size = sum(max(0, min(hi, e) - max(lo, s)) for lo, hi in needs[rank])
        shapes.append((b, size, w))
    received = exchange(sends, shapes, group)
    # Reassemble range by range: pieces of one range come from ranks in increasing order.
    pieces, offsets = [], [0] * len(slot_ranges)
    for lo, hi in needs[rank]:
        for src, (s, e) in enumerate(slot_ranges):
            size = max(0, min(hi, e) - max(lo, s))
            if size:
                pieces.append(received[src][:, offsets[src] : offsets[src] + size])
                offsets[src] += size
    whole = torch.cat(pieces, 1) if pieces else kvp[:, :0]
    return keep_in_graph(whole, *received)


def _to_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` -> ``(B, L, H * D)``."""
    b, h, length, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, length, h * d)


def _from_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, H * D)`` -> ``(B, H, L, D)``."""
    b, length, _ = x.shape
    return x.view(b, length, heads, -1).permute(0, 2, 1, 3)


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    options: TensorizedOptions,
    *,
    group=None,
    position_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    rope_inv_freq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tensorized attention of one sequence sharded over the ranks of ``group``.

    Every rank calls this with its shard (:func:`shard_ranges` of the global length N):
    q: ``(B, Hq, Ns, D)``; k, v: ``(B, Hkv, Ns, D)``, RoPE applied at the global positions;
    position_ids: ``(B, Ns)`` or ``(1, Ns)`` global RoPE positions of the shard (None: the
    shard's slot indices ``start .. end-1``; needed for ``rope="axis"`` only when they differ);
    padding_mask: must be None or all ones (padding is not supported here);
    group: a ``torch.distributed`` process group (None: the default group).
    Returns this rank's ``(B, Hq, Ns, D)``, equal to the single-process operator's output
    at these positions (same options, torch backend), in q's dtype.
    """
    check_shapes(q, k, v)
    opts = options.validate()
    if opts.backend in ("triton", "reference") and opts.backend not in _warned:
        _warned.add(opts.backend)
        warnings.warn(
            f"ctxext: context-parallel attention runs the torch backend's hops; backend={opts.backend!r} is not "
            "used on this path",
            stacklevel=2,
        )
    rank, world = group_rank_and_size(group)
    batch, hq, n_local, dim = q.shape
    hkv = k.shape[1]
    settings = _settings(q, k, v, opts, position_ids, padding_mask, scaling, softcap, rope_inv_freq, world)
    lengths = check_same_settings(settings, n_local, group, q.device)
    n_tokens = sum(lengths)
    # Errors below depend only on what every rank now shares: all ranks raise together.
    if settings["padding_mask"]:
        raise ContextParallelError(
            "context-parallel attention does not support padding masks: pack the sequence without padding "
            "(documents separated by EOS with continuous positions)"
        )
    if opts.rope == "axis" and rope_inv_freq is None:
        raise ContextParallelError("rope='axis' needs the model's RoPE inverse frequencies (rope_inv_freq)")
    unsupported = [f"retrieve={opts.retrieve}"] if opts.retrieve else []
    unsupported += [f"summary={opts.summary!r}"] if opts.summary != "token" else []
    if unsupported:  # the shards would run a different operator: refuse rather than differ silently
        raise ContextParallelError(
            f"context-parallel attention does not support {' and '.join(unsupported)} yet: run on one process, "
            "or set retrieve=0 / summary='token'"
        )
    if hq < world:
        raise ContextParallelError(
            f"context parallelism over {world} ranks needs at least one query head per rank; the model has {hq}: "
            "lower parallel.context"
        )
    blocks = shard_blocks(n_tokens, world, opts.block_sizes)
    expected = [e - s for s, e in shard_ranges(n_tokens, world, opts.block_sizes)]
    if lengths != expected:
        raise ContextParallelError(
            f"context-parallel shards of a {n_tokens}-token sequence must have lengths {expected} (whole outer "
            f"blocks, see ctxext.attention.context_parallel.shard_ranges); the ranks passed {lengths}"
        )

    axes = compact_axes(n_tokens, opts.block_sizes)
    span, inner = math.prod(axes[1:]), axes[-1]
    slot_ranges = [(b0 * span, b1 * span) for b0, b1 in blocks]
    slot_start, slot_end = slot_ranges[rank]
    n_slots = slot_end - slot_start
    pad = n_slots - n_local  # only the last rank's ragged block
    compute = torch.promote_types(q.dtype, torch.float32)
    scaling = dim**-0.5 if scaling is None else scaling
    qs = F.pad(q.to(compute) * scaling, (0, 0, 0, pad))  # (B, Hq, Ls, D), score scale folded into q
    ks, vs = (F.pad(x.to(compute), (0, 0, 0, pad)) for x in (k, v))  # (B, Hkv, Ls, D)
    pos = _slot_positions(position_ids, batch, n_local, slot_start, n_slots, q.device, compute)  # (B, Ls)
    valid = None if pad == 0 else (torch.arange(n_slots, device=q.device) < n_local)[None].expand(batch, -1)
    need_lse = opts.merge != "score" and opts.long_range
    inv_freq = rope_inv_freq

    # ---- 2. local hop, with the sink and window slots of other ranks placed before the shard
    window = opts.local == "window"
    sinks = min(opts.sinks, n_tokens)
    extra = 0
    q_in, k_in, v_in, pos_in, valid_in = qs, ks, vs, pos, valid
    if sinks or window:
        needs = [_extra_ranges(s, sinks, window, inner) for s, _ in slot_ranges]
        kvp = torch.cat([_to_rows(ks), _to_rows(vs), pos[..., None]], dim=-1)  # (B, Ls, 2*Hkv*D + 1)
        got = _fetch_extras(kvp, slot_ranges, needs, rank, group)  # (B, E, 2*Hkv*D + 1)
        extra = got.shape[1]
        if extra:
            width = hkv * dim
            k_in = torch.cat([_from_rows(got[..., :width], hkv), ks], dim=2)
            v_in = torch.cat([_from_rows(got[..., width : 2 * width], hkv), vs], dim=2)
            q_in = torch.cat([qs.new_zeros(batch, hq, extra, dim), qs], dim=2)  # their queries are discarded
            pos_in = torch.cat([got[..., -1].detach(), pos], dim=1)
            slots = torch.cat([torch.arange(a, e, device=q.device) for a, e in needs[rank]])
            own = valid[0] if valid is not None else torch.ones(n_slots, dtype=torch.bool, device=q.device)
            ok = torch.cat([slots < n_tokens, own])
            valid_in = None if bool(ok.all()) else ok[None].expand(batch, -1)
        else:
            qs = keep_in_graph(qs, got)
            q_in = qs
    C, lse_C, Fs, lse_F = _local_hop(q_in, k_in, v_in, valid_in, pos_in, opts, softcap, inv_freq, inner, need_lse)
    C, Fs = (None if x is None else x[:, :, extra:] for x in (C, Fs))  # (B, Hq, Ls, D)
    lse_C, lse_F = (None if x is None else x[:, :, extra:] for x in (lse_C, lse_F))  # (B, Hq, Ls)

    if opts.long_range:
        # ---- 3. outer hops inside an outer block: local
        local_axes = (n_slots // span, *axes[1:])
        idx = multi_index(n_slots, local_axes, device=q.device) if opts.rope == "axis" else None
        for j in range(len(axes) - 2, 0, -1):
            qj, kj = qs, ks
            if idx is not None:  # coordinate i_j of a slot is the same locally and globally (j >= 1)
                delta = (idx[:, j].to(compute)[None] - pos)[:, None, :]  # (B, 1, Ls)
                qj, kj = rerotate(qs, delta, inv_freq), rerotate(ks, delta, inv_freq)
            C, lse_C, Fs, lse_F = _outer_hop(
                qj, kj, C, lse_C, Fs, lse_F, valid, local_axes, j, opts, softcap, False, need_lse
            )
        # ---- 4. outermost hop on a head shard
        qj, kj = qs, ks
        if idx is not None:
            outer = (torch.arange(slot_start, slot_end, device=q.device) // span).to(compute)
            delta = (outer[None] - pos)[:, None, :]  # (B, 1, Ls): to coordinate i_1
            qj, kj = rerotate(qs, delta, inv_freq), rerotate(ks, delta, inv_freq)
        C = _outermost_hop(qj, kj, C, lse_C, Fs, axes, slot_ranges, n_tokens, opts, softcap, need_lse, group)
    out = C[:, :, :n_local]
    return out.to(q.dtype)


def _outermost_hop(qj, kj, C, lse_C, Fs, axes, slot_ranges, n_tokens, opts, softcap, need_lse, group):
    """All-to-all to a head shard, the hop along axis 1, all-to-all back.

    qj: ``(B, Hq, Ls, D)`` pre-scaled (re-rotated for ``rope="axis"``); kj: ``(B, Hkv, Ls, D)``;
    C, Fs: ``(B, Hq, Ls, D)`` (Fs None for dominance); lse_C: ``(B, Hq, Ls)`` or None.
    Returns C ``(B, Hq, Ls, D)``.
    """
    rank, world = group_rank_and_size(group)
    batch, hq, n_slots, dim = qj.shape
    hkv = kj.shape[1]
    g = hq // hkv
    heads = head_ranges(hq, world)
    kv = [kv_range(h, g) for h in heads]
    complete = opts.causal == "complete"
    # The last hop reads q, k, C, F (complete) and, for merge="lse", the causal stream's lse.
    fields = {"q": qj, "C": C, "F": Fs if complete else None, "lse_C": lse_C if need_lse else None}
    fields = {name: (x if x.dim() == 4 else x[..., None]) for name, x in fields.items() if x is not None}
    widths = [x.shape[-1] for x in fields.values()]
    packed = torch.cat(list(fields.values()), dim=-1)  # (B, Hq, Ls, W): one all-to-all for all of them
    width = packed.shape[-1]

    sends = [
        torch.cat([packed[:, h0:h1].reshape(-1), kj[:, k0:k1].reshape(-1)]) for (h0, h1), (k0, k1) in zip(heads, kv)
    ]
    my_h, my_kv = heads[rank][1] - heads[rank][0], kv[rank][1] - kv[rank][0]
    sizes = [(batch * my_h * (e - s) * width, batch * my_kv * (e - s) * dim) for s, e in slot_ranges]
    received = exchange(sends, [(a + b,) for a, b in sizes], group)
    packs, keys = [], []
    for flat, (s, e), (a, _) in zip(received, slot_ranges, sizes):
        packs.append(flat[:a].view(batch, my_h, e - s, width))
        keys.append(flat[a:].view(batch, my_kv, e - s, dim))
    packed_h = torch.cat(packs, dim=2)  # (B, h, Lp, W): every position, my query heads
    k_h = torch.cat(keys, dim=2)  # (B, kv, Lp, D): the kv heads they use
    h0, h1 = heads[rank]
    if h0 % g or h1 % g:  # my query heads split a kv group: give every query head its own k
        index = torch.tensor([h // g - kv[rank][0] for h in range(h0, h1)], device=k_h.device)
        k_h = k_h.index_select(1, index)  # (B, h, Lp, D)
    got = dict(zip(fields, packed_h.split(widths, dim=-1)))
    lse_Ch = got["lse_C"][..., 0] if "lse_C" in got else None
    n_all = slot_ranges[-1][1]
    valid = None
    if n_all != n_tokens:
        valid = (torch.arange(n_all, device=qj.device) < n_tokens)[None].expand(batch, -1)
    out, _, _, _ = _outer_hop(
        got["q"], k_h, got["C"], lse_Ch, got.get("F"), lse_Ch, valid, axes, 0, opts, softcap, True, need_lse
    )  # (B, h, Lp, D); the last hop never reads lse_F (lse_C stands in); padding slots are discarded

    # ---- back: my positions of every head
    sends = [out[:, :, s:e] for s, e in slot_ranges]  # (B, h, Ls_r, D) for each rank r
    shapes = [(batch, b - a, n_slots, dim) for a, b in heads]
    back = exchange(sends, shapes, group)
    return torch.cat(back, dim=1)  # (B, Hq, Ls, D)
