"""Tensorized attention over a growing sequence: the state a decode cache keeps, and the step.

DESIGN.md section 5. Slot ``p`` of a row has multi-index ``(i_0, i_1, ..., i_{m-1})`` with
strides ``s_j = prod(block_sizes[j:])`` (``s_{m-1} = 1``); outer hop ``j`` runs along axis
``j`` for ``j = m-2, ..., 0`` after the local hop (axis ``m-1``). In both causal modes the
causal stream of outer hop ``j`` at ``p`` is a softmax over the earlier fiber elements
``p - t * s_j`` (``t = 1..i_j``), valued by a stored stream ``S_j``, and the diagonal, valued
by ``p``'s own causal stream so far. What ``S_j`` is:

* ``complete``: the *full* stream entering hop ``j`` (the bidirectional output of hop
  ``j+1``). It is final once ``p``'s level-``j`` sub-block (the ``s_j`` slots sharing
  ``i_0..i_j``) is complete, and is computed then, for the whole sub-block at once, from the
  queries of that sub-block (kept until the outermost sub-block of ``s_0`` slots completes)
  and ``S_{j+1}``. With ``merge="lse"`` or ``"mass"`` the log-sum-exp of each stream is kept too.
* ``dominance``: the *causal* stream entering hop ``j``, final as soon as ``p`` is
  processed; appended per token.

Kept per layer and row, beyond k and v (which stay in the transformers cache): the token
index and RoPE position of every slot; ``S_0`` for every slot of a completed outer block;
``S_j`` (``j >= 1``) and, in ``complete`` mode, the queries, only inside the current outer
block. So the state is ``Hq * D`` values per token (``complete``, two axes) beyond the
``2 * Hkv * D`` of a KV cache, plus ``O(s_0 * Hq * D)``.

Per new token the work is one attention over at most ``2 * n_{m-1} + sinks`` keys (local hop)
and one over at most ``n_j + 1`` entries per outer hop: ``O(sum_j n_j * D)`` per head. In
``complete`` mode the token that completes a level-``j`` sub-block also computes that
sub-block's full stream: ``O(s_j * n_{j+1} * D)`` per head; the worst case is the token that
completes an outer block (every level at once), amortised to ``O(sum_j n_j * D)`` per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .options import TensorizedOptions
from .retrieve import (
    far_block_index,
    far_logit_bias,
    key_frame,
    merge_far,
    ordered_frame_freq,
    query_frame,
    read_chosen_blocks,
    retrievable_keys,
)
from .rope import rerotate
from .slot_buffer import SlotBuffer
from .softmax import masked_softmax

# Gathered per-query keys and values are processed in groups of at most this many elements.
GATHER_BUDGET = 1 << 23


@dataclass(frozen=True)
class LayerGeometry:
    """Shapes and settings one layer's decode state is tied to (a mismatch is an error)."""

    options: TensorizedOptions
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None

    @property
    def strides(self) -> tuple[int, ...]:
        """``s_j = prod(block_sizes[j:])`` for the outer hops ``j = 0..m-2``."""
        bs = self.options.block_sizes
        return tuple(math.prod(bs[j:]) for j in range(len(bs)))

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def keeps_full_streams(self) -> bool:
        return self.options.causal == "complete" and self.options.long_range

    @property
    def keeps_lse(self) -> bool:
        return self.keeps_full_streams and self.options.merge != "score"

    def axis_size(self, j: int) -> int:
        """``n_j`` for inner axes ``j >= 1`` (the outermost axis is unbounded)."""
        return self.options.block_sizes[j - 1]

    def coordinate(self, slots: torch.Tensor, j: int) -> torch.Tensor:
        """``i_j`` of each slot."""
        i = torch.div(slots, self.strides[j], rounding_mode="floor")
        return i if j == 0 else i % self.axis_size(j)


class RowState:
    """The decode state of one sequence (one batch row) in one layer.

    tok: token index of each slot in the transformers cache's k/v; pos: its RoPE position.
    q: queries of the current outer block (``complete`` only); streams[j] / lses[j]: ``S_j``.
    """

    def __init__(self, geo: LayerGeometry, dtype: torch.dtype, device: torch.device):
        self.geo = geo
        self.n_slots = 0
        self.base: int | None = None  # token index of slot 0 while slot s holds token base + s (no holes)
        self.contiguous = True
        levels = len(geo.options.block_sizes) if geo.options.long_range else 0
        self.tok = SlotBuffer(1, (), torch.long, device)
        self.pos = SlotBuffer(1, (), torch.float32, device)
        self.q = SlotBuffer(geo.n_heads, (geo.head_dim,), dtype, device) if geo.keeps_full_streams else None
        self.streams = [SlotBuffer(geo.n_heads, (geo.head_dim,), dtype, device) for _ in range(levels)]
        self.lses = [SlotBuffer(geo.n_heads, (), torch.float32, device) for _ in range(levels)] if geo.keeps_lse else []

    def clone(self) -> RowState:
        other = RowState.__new__(RowState)
        other.geo, other.n_slots = self.geo, self.n_slots
        other.base, other.contiguous = self.base, self.contiguous
        other.tok, other.pos = self.tok.clone(), self.pos.clone()
        other.q = self.q.clone() if self.q is not None else None
        other.streams = [s.clone() for s in self.streams]
        other.lses = [s.clone() for s in self.lses]
        return other

    def nbytes(self) -> int:
        """Bytes beyond k and v: slot maps, queries, stored streams."""
        parts = [self.tok, self.pos, *self.streams, *self.lses] + ([self.q] if self.q is not None else [])
        return sum(p.nbytes() for p in parts)


class _Step:
    """One call's view of a row: its k/v in the transformers cache and the compute helpers."""

    def __init__(self, row: RowState, keys: torch.Tensor, values: torch.Tensor, inv_freq: torch.Tensor | None):
        self.row, self.geo, self.opts = row, row.geo, row.geo.options
        self.keys, self.values = keys, values  # (Hkv, T, D) of this row
        self.inv_freq = inv_freq
        self.compute = torch.promote_types(keys.dtype, torch.float32)

    def _tokens(self, slots: torch.Tensor) -> torch.Tensor:
        return slots + self.row.base if self.row.contiguous else self.row.tok.gather(slots)[0]

    def kv(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v at ``slots`` (any shape): ``(Hkv, *slots.shape, D)`` in the compute dtype."""
        tok = self._tokens(slots)
        return self.keys[:, tok].to(self.compute), self.values[:, tok].to(self.compute)

    def k(self, slots: torch.Tensor) -> torch.Tensor:
        """k at ``slots``: ``(Hkv, *slots.shape, D)`` in the compute dtype."""
        return self.keys[:, self._tokens(slots)].to(self.compute)

    def kv_range(self, first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v of slots ``[first, stop)`` of a contiguous row, sliced: ``(Hkv, stop - first, D)``."""
        a, b = first + self.row.base, stop + self.row.base
        return self.keys[:, a:b].to(self.compute), self.values[:, a:b].to(self.compute)

    def positions(self, slots: torch.Tensor) -> torch.Tensor:
        return self.row.pos.gather(slots)[0]

    def score(self, s: torch.Tensor) -> torch.Tensor:
        s = s * self.geo.scaling
        cap = self.geo.softcap
        return cap * torch.tanh(s / cap) if cap else s

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """``(Hq, ...)`` -> ``(Hkv, g, ...)``: the g query heads that share a key-value head."""
        return x.reshape(self.geo.n_kv_heads, self.geo.group, *x.shape[1:])

    # ---- the causal stream of new queries -------------------------------------------------

    def local_causal(self, q: torch.Tensor, slots: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Local hop of queries at ``slots`` ((Q,) long, ``slots[0] == first``); q: ``(Hq, Q, D)``.

        Returns the causal stream C ``(Hq, Q, D)`` and its lse ``(Hq, Q)``.
        """
        n = self.opts.inner_block
        window = self.opts.local == "window"
        if len(slots) == 1 and self.row.contiguous and self.opts.sinks == 0:
            return self._local_causal_one(q, first, n, window)
        width = 2 * n if window else n
        block_start = torch.div(slots, n, rounding_mode="floor") * n
        start = torch.where(block_start > 0, block_start - n, block_start) if window else block_start
        key_slots = start[:, None] + torch.arange(width, device=slots.device)  # (Q, W)
        ok = key_slots <= slots[:, None]
        k, v = self.kv(torch.minimum(key_slots, slots[:, None]))  # (Hkv, Q, W, D)
        qg = self.grouped(q)  # (Hkv, g, Q, D)
        s = self.score(torch.einsum("hgqd,hqwd->hgqw", qg, k))
        mask = ok[None, None]
        n_sinks = min(self.opts.sinks, self.row.n_slots)
        if n_sinks:
            t = torch.arange(n_sinks, device=slots.device)
            sink_k, sink_v = self.kv(t)  # (Hkv, s, D)
            q_sink = qg
            if self.opts.rope == "axis":  # query to coordinate p - start, sink t to coordinate t
                delta = (slots - start).to(self.compute) - self.positions(slots)
                q_sink = rerotate(qg, delta, self.inv_freq)
                sink_k = rerotate(sink_k, t.to(self.compute) - self.positions(t), self.inv_freq)
            s = torch.cat([self.score(torch.einsum("hgqd,hsd->hgqs", q_sink, sink_k)), s], dim=-1)
            mask = torch.cat([(t[None, :] < start[:, None])[None, None], mask], dim=-1)
        probs, lse = masked_softmax(s, mask)  # (Hkv, g, Q, s + W)
        out = torch.einsum("hgqw,hqwd->hgqd", probs[..., n_sinks:], v)
        if n_sinks:
            out = out + torch.einsum("hgqs,hsd->hgqd", probs[..., :n_sinks], sink_v)
        return out.flatten(0, 1), lse.flatten(0, 1)

    def retrieved(self, q: torch.Tensor, slots: torch.Tensor, C: torch.Tensor, lse_C: torch.Tensor):
        """Add the far blocks each new query chooses (``retrieve``) to its local softmax.

        q: ``(Hq, Q, D)`` at ``slots`` ``(Q,)``; C, lse_C: the local hop's ``(Hq, Q, D)``, ``(Hq, Q)``.
        The choice reads every earlier key once (``O(N D)`` per token, like a KV-cache step); the
        attention reads the ``retrieve`` chosen blocks.
        """
        n = self.opts.inner_block
        every = torch.arange(self.row.n_slots, device=slots.device)
        k, v = self.kv(every)  # (Hkv, S, D)
        ks = key_frame(k[None], self.positions(every)[None], self.opts, self.inv_freq)
        qs = query_frame(q[None], slots, self.positions(slots)[None], self.opts, self.inv_freq, n)
        key_ok = retrievable_keys(torch.ones(1, len(every), dtype=torch.bool, device=slots.device), self.opts.sinks)
        index = far_block_index(qs, ks, key_ok, self.opts, n, q_slots=slots)  # (1, Hq, Q, k)
        order = ordered_frame_freq(self.opts, self.inv_freq)
        far, lse_far = read_chosen_blocks(
            qs * self.geo.scaling, ks, v[None], index, key_ok, self.opts.retrieval_block, self.geo.softcap, order
        )
        return merge_far(C, lse_C, far[0], lse_far[0], far_logit_bias(self.opts, slots))  # far logits - the bias

    def _local_causal_one(self, q: torch.Tensor, p: int, n: int, window: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The local hop of one decoded token (no sinks, contiguous row): keys sliced, no gather."""
        start = (p // n) * n
        if window and start > 0:
            start -= n
        k, v = self.kv_range(start, p + 1)  # (Hkv, W, D)
        s = self.score(torch.einsum("hgd,hwd->hgw", self.grouped(q[:, 0]), k))
        probs = torch.softmax(s, dim=-1)
        out = torch.einsum("hgw,hwd->hgd", probs, v)
        return out.flatten(0, 1)[:, None], torch.logsumexp(s, dim=-1).flatten(0, 1)[:, None]

    def outer_causal(self, j: int, q, slots, C, lse_C, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal stream of outer hop j for queries at ``slots``; q, C: ``(Hq, Q, D)``.

        reach: the largest coordinate ``i_j`` among the slots (known on the host: no sync).
        """
        stride = self.geo.strides[j]
        i = self.geo.coordinate(slots, j)  # (Q,)
        t = torch.arange(1, reach + 1, device=slots.device)
        ok = t[None, :] <= i[:, None]  # (Q, T)
        stream = self.row.streams[j]
        earlier = torch.where(
            ok, slots[:, None] - t[None, :] * stride, torch.full_like(ok, stream.start, dtype=torch.long)
        )
        k = self.k(earlier)  # (Hkv, Q, T, D)
        k_self = self.k(slots)  # (Hkv, Q, D)
        qj = q
        if self.opts.rope == "axis":  # to coordinate i_j along this axis
            qj = rerotate(q, i.to(self.compute) - self.positions(slots), self.inv_freq)
            coord = (i[:, None] - t[None, :]).to(self.compute)
            k = rerotate(k, coord - self.positions(earlier), self.inv_freq)
            k_self = rerotate(k_self, i.to(self.compute) - self.positions(slots), self.inv_freq)
        qg = self.grouped(qj)  # (Hkv, g, Q, D)
        s = self.score(torch.einsum("hgqd,hqtd->hgqt", qg, k))
        if self.opts.merge == "mass":  # each earlier entry summarises the s_j slots of its sub-block
            s = s + math.log(stride)
        if self.opts.merge != "score":
            diag = self.grouped(lse_C)  # (Hkv, g, Q)
        else:
            diag = self.score(torch.einsum("hgqd,hqd->hgq", qg, k_self))
        s = torch.cat([s, diag[..., None]], dim=-1)
        mask = torch.cat([ok, ok.new_ones(ok.shape[0], 1)], dim=-1)[None, None]
        probs, lse = masked_softmax(s, mask)  # (Hkv, g, Q, T + 1)
        vals = self.grouped(stream.gather(earlier).to(self.compute))  # (Hkv, g, Q, T, D)
        out = torch.einsum("hgqt,hgqtd->hgqd", probs[..., :-1], vals) + probs[..., -1:] * self.grouped(C)
        return out.flatten(0, 1), lse.flatten(0, 1)

    # ---- full streams of completed sub-blocks (complete mode) --------------------------------

    def full_local(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full local stream of whole inner blocks ((G,) block numbers): ``(Hq, G*n, D)``, lse."""
        n = self.opts.inner_block
        block_start = blocks * n
        slots = block_start[:, None] + torch.arange(n, device=blocks.device)  # (G, n)
        q = self.grouped(self.row.q.gather(slots).to(self.compute))  # (Hkv, g, G, n, D)
        k, v = self.kv(slots)  # (Hkv, G, n, D)
        s = self.score(torch.einsum("hgbqd,hbkd->hgbqk", q, k))
        mask = torch.ones_like(s[:1, :1], dtype=torch.bool)
        n_sinks = min(self.opts.sinks, self.row.n_slots)
        if n_sinks:
            t = torch.arange(n_sinks, device=blocks.device)
            sink_k, sink_v = self.kv(t)
            q_sink = q
            if self.opts.rope == "axis":
                delta = (slots - block_start[:, None]).to(self.compute) - self.positions(slots)
                q_sink = rerotate(q, delta, self.inv_freq)
                sink_k = rerotate(sink_k, t.to(self.compute) - self.positions(t), self.inv_freq)
            s = torch.cat([self.score(torch.einsum("hgbqd,hsd->hgbqs", q_sink, sink_k)), s], dim=-1)
            sink_ok = (t[None, :] < block_start[:, None])[:, None, :].expand(-1, n, -1)  # (G, n, s)
            mask = torch.cat([sink_ok[None, None], mask.expand(1, 1, *s.shape[2:4], n)], dim=-1)
        probs, lse = masked_softmax(s, mask)
        out = torch.einsum("hgbqk,hbkd->hgbqd", probs[..., n_sinks:], v)
        if n_sinks:
            out = out + torch.einsum("hgbqs,hsd->hgbqd", probs[..., :n_sinks], sink_v)
        return out.flatten(0, 1).flatten(1, 2), lse.flatten(0, 1).flatten(1, 2)

    def full_outer(self, j: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full stream of hop ``j+1`` over whole level-j sub-blocks: ``(Hq, G*s_j, D)``, lse."""
        n1, c = self.geo.axis_size(j + 1), self.geo.strides[j + 1]
        dev = blocks.device
        i = torch.arange(n1, device=dev)
        slots = blocks[:, None, None] * self.geo.strides[j] + i[None, :, None] * c + torch.arange(c, device=dev)
        slots = slots.transpose(1, 2)  # (G, c, n1): fibers of axis j+1
        q = self.row.q.gather(slots).to(self.compute)  # (Hq, G, c, n1, D)
        k = self.k(slots)  # (Hkv, G, c, n1, D)
        if self.opts.rope == "axis":
            delta = i.to(self.compute) - self.positions(slots)
            q, k = rerotate(q, delta, self.inv_freq), rerotate(k, delta, self.inv_freq)
        s = self.score(torch.einsum("hgbcqd,hbckd->hgbcqk", self.grouped(q), k))
        if self.opts.merge == "mass":  # each entry summarises the c slots of its sub-block
            s = s + math.log(c)
        if self.opts.merge != "score":  # the diagonal carries the mass the lower hop summarised
            lse_in = self.grouped(self.row.lses[j + 1].gather(slots))  # (Hkv, g, G, c, n1)
            eye = torch.eye(n1, dtype=torch.bool, device=dev)
            s = torch.where(eye, lse_in[..., None], s)
        probs = torch.softmax(s, dim=-1)
        lse = torch.logsumexp(s, dim=-1)
        vals = self.grouped(self.row.streams[j + 1].gather(slots).to(self.compute))  # (Hkv, g, G, c, n1, D)
        out = torch.einsum("hgbcqk,hgbckd->hgbcqd", probs, vals)
        out = out.transpose(3, 4).flatten(0, 1).flatten(1, 3)  # slot order (G, n1, c)
        return out, lse.transpose(3, 4).flatten(0, 1).flatten(1, 3)


def _groups(total: int, per_item: int):
    """Split ``range(total)`` into slices whose items cost ``per_item`` elements each."""
    step = max(1, GATHER_BUDGET // max(1, per_item))
    for a in range(0, total, step):
        yield slice(a, min(total, a + step))


def max_coordinate(geo: LayerGeometry, first: int, stop: int, j: int) -> int:
    """The largest ``i_j`` among slots ``[first, stop)``, computed on the host."""
    lo, hi = first // geo.strides[j], (stop - 1) // geo.strides[j]
    if j == 0:
        return hi
    n = geo.axis_size(j)
    return n - 1 if hi - lo + 1 >= n else max(b % n for b in range(lo, hi + 1))


def append_slots(
    row: RowState, tok: torch.Tensor, pos: torch.Tensor, q: torch.Tensor | None, tok_first: int | None
) -> int:
    """Register new real tokens on the next slots; returns the first new slot.

    tok_first: when the new tokens are the consecutive indices ``tok_first, tok_first + 1, ...``
    (no padding among them), known on the host; None makes the contiguity check read ``tok``.
    """
    first = row.n_slots
    if row.contiguous:
        if tok_first is None:
            head = int(tok[0])
            expected = torch.arange(head, head + tok.shape[0], device=tok.device)
            tok_first = head if torch.equal(tok, expected) else None
        if row.base is None and tok_first is not None:
            row.base = tok_first
        row.contiguous = tok_first is not None and tok_first == row.base + first
    row.tok.extend(tok[None])
    row.pos.extend(pos.to(torch.float32)[None])
    if row.q is not None:
        row.q.extend(q)
    row.n_slots += tok.shape[0]
    return first


def complete_blocks(row: RowState, step: _Step, first: int) -> None:
    """Compute ``S_j`` for every sub-block completed by the slots from ``first`` on (complete mode)."""
    geo = row.geo
    if not geo.keeps_full_streams:
        return
    dev = row.tok.device
    for j in range(len(geo.strides) - 1, -1, -1):  # deepest level first: level j reads S_{j+1}
        stride = geo.strides[j]
        lo, hi = first // stride, row.n_slots // stride
        if hi <= lo:
            continue
        blocks = torch.arange(lo, hi, device=dev)
        cost = stride * geo.n_heads * (geo.head_dim + (geo.axis_size(j + 1) if j + 1 < len(geo.strides) else stride))
        for part in _groups(hi - lo, cost):
            if j == len(geo.strides) - 1:
                out, lse = step.full_local(blocks[part])
            else:
                out, lse = step.full_outer(j, blocks[part])
            row.streams[j].extend(out)
            if geo.keeps_lse:
                row.lses[j].extend(lse)


def causal_outputs(row: RowState, step: _Step, q: torch.Tensor, first: int) -> torch.Tensor:
    """Outputs of the new queries on slots ``[first, n_slots)`` (already appended); q: ``(Hq, Q, D)``."""
    geo, opts = row.geo, row.geo.options
    q = q.to(step.compute)
    slots = torch.arange(first, row.n_slots, device=q.device)
    width = 2 * opts.inner_block + opts.sinks
    parts = [
        step.local_causal(q[:, p], slots[p], first + p.start)
        for p in _groups(len(slots), width * geo.n_kv_heads * geo.head_dim)
    ]
    C, lse_C = torch.cat([c for c, _ in parts], 1), torch.cat([x for _, x in parts], 1)
    if opts.retrieve:
        C, lse_C = step.retrieved(q, slots, C, lse_C)
    if not opts.long_range:
        return C
    for j in range(len(geo.strides) - 1, -1, -1):
        if opts.causal == "dominance":
            assert row.streams[j].end == first, "dominance streams must follow the slots"
            row.streams[j].extend(C)  # the causal stream entering hop j
        reach = max_coordinate(geo, first, row.n_slots, j) + 1
        parts = [
            step.outer_causal(
                j, q[:, p], slots[p], C[:, p], lse_C[:, p], max_coordinate(geo, first + p.start, first + p.stop, j)
            )
            for p in _groups(len(slots), reach * geo.n_heads * geo.head_dim * 2)
        ]
        C, lse_C = torch.cat([c for c, _ in parts], 1), torch.cat([x for _, x in parts], 1)
    return C


def forget_finished(row: RowState) -> None:
    """Drop what later tokens can no longer need: queries and inner streams of finished outer blocks."""
    if not row.streams:
        return
    base = (row.n_slots // row.geo.strides[0]) * row.geo.strides[0]
    if row.q is not None:
        row.q.trim(base)
    for buf in row.streams[1:] + row.lses[1:]:
        buf.trim(base)


def extend_row(
    row: RowState,
    keys: torch.Tensor,
    values: torch.Tensor,
    q: torch.Tensor,
    tok: torch.Tensor,
    pos: torch.Tensor,
    inv_freq: torch.Tensor | None,
    *,
    tok_first: int | None = None,
    want_outputs: bool = True,
) -> torch.Tensor | None:
    """Process new real tokens of one row; returns their outputs ``(Hq, Q, D)`` (or None).

    keys, values: ``(Hkv, T, D)``, this row's k/v in the transformers cache (new tokens
    included); q: ``(Hq, Q, D)``; tok: ``(Q,)`` their indices in T; pos: ``(Q,)`` RoPE positions;
    tok_first: ``tok[0]`` when tok is consecutive and known on the host (saves a device sync).
    """
    step = _Step(row, keys, values, inv_freq)
    first = append_slots(row, tok, pos, q, tok_first)
    complete_blocks(row, step, first)
    out = causal_outputs(row, step, q, first) if want_outputs or row.geo.options.causal == "dominance" else None
    forget_finished(row)
    return out
