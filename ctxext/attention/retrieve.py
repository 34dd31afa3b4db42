"""Retrieval of far blocks (``retrieve=k``): each query also reads its k best far inner blocks exactly.

The long-range hops of tensorized attention reach a far block only through one summary per
fiber, and a summary made without knowing the later query cannot keep an arbitrary span
(the quality study, docs/RESULTS.md). With ``retrieve = k > 0`` the causal stream of the local
hop adds, for every query, the tokens of the ``k`` far inner blocks (blocks of ``n = n_m`` slots
that end before the query's local range starts) with the highest score bound, in the same
softmax as the window and the sinks; the outer hops then run as before, so every earlier token
stays reachable. The block score is the upper bound of ``q . k`` over the block's keys from
their per-channel minimum and maximum (Quest, Tang et al. 2024):
``sum_d max(q_d * kmin_d, q_d * kmax_d)``, one score per query head and far block, so the
choice costs ``O(N * N / n * D)`` multiply-adds (like one outer hop) and reading the chosen
blocks ``O(N * k * n * D)``. With ``retrieve_score_block = s`` a block scores the largest such
bound over its sub-blocks of ``s`` slots: a tighter score that costs ``O(N * N / s * D)``
(``s = 1``: the exact ``max q . k``). The bound of a whole block grows with how varied its keys
are, so among many far blocks of real text it favours varied blocks over the one that holds the
answer (quality study, round 12). With ``retrieve_candidates = C > k`` the choice has two
stages: the bound proposes each query's ``C`` best far blocks, and the exact ``max q . k`` over
their keys picks the ``k`` best of them; the choice is the exact score's whenever the exact best
``k`` blocks are among the candidates, and the exact stage reads ``C * m`` keys per query
(linear in N for a fixed C; see :func:`exact_block_scores`). With ``retrieve_candidate_share = s``
a query's candidates grow with its far blocks: ``max(C, ceil(s * far))`` (:func:`candidate_count`;
round 22 of the quality study: 32 candidates of 512 far blocks lost every needle at 32k). The
exact stage then reads a share ``s`` of each query's far keys: quadratic, like full attention.

Positions: with ``rope="absolute"`` the retrieved keys keep the model's rotation (offsets as
far as the block lies). With ``rope="axis"`` the query is moved to coordinate ``p - start``
(as for the sinks) and a retrieved slot at offset ``o`` in its block to a coordinate just
before the local range, by ``retrieve_frame``:

* ``stacked``: ``o - n`` for every chosen block: they all sit on the same coordinates, so no
  offset exceeds ``3 n`` at any length, but the query cannot tell them apart or order them.
* ``ordered``: the chosen blocks keep their sequence order, one after another: a block with
  ``r`` later chosen blocks (its rank, 0 for the nearest) sits at ``o - (r + 1) n``, so no
  offset exceeds ``(retrieve + 2) n``. The choice itself is scored in the stacked frame (the
  ranks are known only once it is made); the attention rotates the query by ``r n`` per rank
  (rotations compose), one score pass per rank over the blocks a query block chose.

The choice uses only the query itself and blocks entirely in its past, so it is causal.
Sink slots (``t < sinks``) are never retrieved (the sinks already enter every softmax exactly).
Block size: a retrieved block has ``m = retrieve_block`` slots (0: ``m = n``, the inner block),
a divisor of ``n``, so retrieval can work at a finer grain than the local window (round 7 of the
quality study: blocks of 64 recall more than blocks of 128, while a window of two blocks of 128
keeps perplexity). Far blocks are the blocks of ``m`` slots that end before the query's local
range starts; in the axis frame their slots sit at ``o - m`` (stacked) or ``o - (r + 1) m``.

Both the reference and the torch backend call :func:`far_block_index` (the reference through
:func:`select_far_blocks`), so they agree on the choice even at ties; they compute the attention
independently (the torch backend by :func:`read_chosen_blocks`). The Triton backend makes the
same choice on fused kernels (:mod:`ctxext.attention.fused_choice`), the same blocks up to
rounding of the scores and the order of ties.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import score_budget
from .options import TensorizedConfigError, TensorizedOptions
from .rope import rerotate
from .softmax import masked_softmax


def local_range_start(slots: torch.Tensor, n: int, window: bool) -> torch.Tensor:
    """First slot of each slot's causal local range: its block start (minus n with a window)."""
    start = torch.div(slots, n, rounding_mode="floor") * n
    return (start - n).clamp_min(0) if window else start


def query_frame(
    q: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, opts: TensorizedOptions, inv_freq, n: int
) -> torch.Tensor:
    """Queries as the retrieval path scores them: ``(B, Hq, Q, D)``.

    slots: ``(Q,)`` slot of each query; positions: ``(B, Q)`` their RoPE positions (float).
    With ``rope="axis"`` a query moves to coordinate ``p - start`` (its local range's start);
    with ``absolute`` it is unchanged.
    """
    if opts.rope != "axis":
        return q
    start = local_range_start(slots, n, opts.local == "window")
    return rerotate(q, ((slots - start).to(positions.dtype)[None] - positions)[:, None, :], inv_freq)


def key_frame(k: torch.Tensor, positions: torch.Tensor, opts: TensorizedOptions, inv_freq) -> torch.Tensor:
    """Keys of slots ``0..L-1`` as the retrieval path scores them: ``(B, Hkv, L, D)``.

    With ``rope="axis"`` a slot at offset ``o`` in its retrieved block of ``m`` slots
    (``opts.retrieval_block``) moves to coordinate ``o - m``.
    """
    if opts.rope != "axis":
        return k
    m = opts.retrieval_block
    coord = (torch.arange(k.shape[-2], device=k.device) % m - m).to(positions.dtype)
    return rerotate(k, (coord[None] - positions)[:, None, :], inv_freq)


def selection_frame(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, opts: TensorizedOptions, inv_freq, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of slots ``0..L-1`` (a whole forward pass) in the retrieval frame; positions ``(B, L)``."""
    slots = torch.arange(q.shape[-2], device=q.device)
    return query_frame(q, slots, positions, opts, inv_freq, n), key_frame(k, positions, opts, inv_freq)


def retrievable_keys(valid: torch.Tensor, sinks: int) -> torch.Tensor:
    """``(B, L)`` slots a query may retrieve: real tokens that are not sinks."""
    ok = valid.clone()
    ok[:, : min(sinks, ok.shape[1])] = False
    return ok


class FarBlockKeys(NamedTuple):
    """What the choice reads of the keys, per far block of ``m`` slots (``nb = ceil(L / m)``).

    k_pad: ``(B, Hkv, nb * m, D)`` the keys padded to whole blocks; ok_pad: ``(B, nb * m)``
    retrievable (False on the padding); kmax, kmin: ``(B, Hkv, nb * per, D)`` per-channel maximum
    and minimum over each sub-block of ``grain`` slots (``per = m // grain``), 0 where the
    sub-block holds no retrievable key; sub_keys: ``(B, nb * per)`` the sub-block holds one;
    has_keys: ``(B, nb)`` the block holds one.
    """

    k_pad: torch.Tensor
    ok_pad: torch.Tensor
    kmax: torch.Tensor
    kmin: torch.Tensor
    sub_keys: torch.Tensor
    has_keys: torch.Tensor


def far_block_keys(ks: torch.Tensor, key_ok: torch.Tensor, m: int, grain: int) -> FarBlockKeys:
    """Per-block key bounds of ``ks`` ``(B, Hkv, L, D)`` with ``key_ok`` ``(B, L)``: see :class:`FarBlockKeys`."""
    b, hkv, length, d = ks.shape
    nb, per = math.ceil(length / m), m // grain
    pad = nb * m - length
    k_pad, ok_pad = F.pad(ks, (0, 0, 0, pad)), F.pad(key_ok, (0, pad))  # (B, Hkv, nb * m, D), (B, nb * m)
    kb, ok = k_pad.view(b, hkv, nb * per, grain, d), ok_pad.view(b, 1, nb * per, grain, 1)
    big = torch.finfo(kb.dtype).max
    kmax = kb.masked_fill(~ok, -big).amax(dim=-2)  # (B, Hkv, nb * per, D)
    kmin = kb.masked_fill(~ok, big).amin(dim=-2)
    sub_keys = ok.any(dim=-2)[:, 0, :, 0]  # (B, nb * per): sub-blocks holding a retrievable key
    kmax, kmin = kmax.masked_fill(~sub_keys[:, None, :, None], 0), kmin.masked_fill(~sub_keys[:, None, :, None], 0)
    has_keys = sub_keys.view(b, nb, per).any(dim=-1)  # (B, nb)
    return FarBlockKeys(k_pad, ok_pad, kmax, kmin, sub_keys, has_keys)


# The choice scores every far (sub-)block for every query: ``(B, Hq, Q, nb * m / s)`` bounds
# (``s = opts.retrieval_score_block``). Queries are
# scored in chunks so that this tensor stays below this many elements (32 MiB in float32), times
# score_budget.SCALE.
SELECT_SCORE_BUDGET = 1 << 23


@torch.no_grad()
def far_block_index(
    qs: torch.Tensor,
    ks: torch.Tensor,
    key_ok: torch.Tensor,
    opts: TensorizedOptions,
    n: int,
    q_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which far blocks each query reads exactly, as block numbers.

    qs: ``(B, Hq, Q, D)`` queries and ks ``(B, Hkv, L, D)`` keys of slots ``0..L-1``, in the
    selection frame (any positive score scale); key_ok: ``(B, L)`` from :func:`retrievable_keys`;
    q_slots: ``(Q,)`` the queries' slots (None: ``0..L-1``, a whole forward pass); n: the inner
    block (it sets the local range). Returns ``(B, Hq, Q, top)`` long, ``top = min(opts.retrieve,
    nb)`` with ``nb = ceil(L / m)`` and ``m = opts.retrieval_block``: the (at most) ``opts.retrieve``
    eligible blocks of ``m`` slots with the highest bound, ``-1`` where fewer are eligible. A block
    is eligible when it ends before the query's local range starts and holds at least one
    retrievable key; its score is the largest bound over its sub-blocks of
    ``opts.retrieval_score_block`` slots that hold one. Queries are scored in chunks
    (``SELECT_SCORE_BUDGET``): memory ``O(L)``.
    """
    b, hq, n_q, d = qs.shape
    hkv = ks.shape[1]
    m, grain = opts.retrieval_block, opts.retrieval_score_block
    per = m // grain  # scored sub-blocks per block
    keys = far_block_keys(ks, key_ok, m, grain)
    k_pad, ok_pad, kmax, kmin, sub_keys = keys.k_pad, keys.ok_pad, keys.kmax, keys.kmin, keys.sub_keys
    nb, has_keys = keys.has_keys.shape[1], keys.has_keys
    g = hq // hkv
    if q_slots is None:
        q_slots = torch.arange(n_q, device=qs.device)
    start = local_range_start(q_slots, n, opts.local == "window")
    block_end = (torch.arange(nb, device=qs.device) + 1) * m
    top = min(opts.retrieve, nb)
    fixed, shared = max(opts.retrieve_candidates, top), bool(opts.retrieve_candidate_share)
    rows = max(1, score_budget.budget(SELECT_SCORE_BUDGET) // max(1, b * hq * nb * per))
    picks = []
    for first in range(0, n_q, rows):
        part = slice(first, min(first + rows, n_q))
        r = part.stop - part.start
        qg = qs[:, :, part].reshape(b, hkv, g * r, d)
        bound = qg.clamp_min(0) @ kmax.transpose(-1, -2) + qg.clamp_max(0) @ kmin.transpose(-1, -2)
        bound = bound.view(b, hq, r, nb * per)  # (B, Hq, R, nb * per): max over a sub-block of q . k, bounded
        if per > 1:  # a block scores its best sub-block that holds keys
            bound = bound.masked_fill(~sub_keys[:, None, None, :], float("-inf")).view(b, hq, r, nb, per).amax(-1)
        eligible = (block_end[None, :] <= start[part, None])[None, None] & has_keys[:, None, None, :]
        width = fixed  # blocks the bound proposes (= top: it chooses alone)
        if shared:  # each query its own count, (B, 1, R); the widest read on the host (one sync per chunk)
            proposed = candidate_count(opts, eligible.sum(-1), top)
            width = int(proposed.max())
        values, index = bound.masked_fill(~eligible, float("-inf")).topk(min(width, nb), dim=-1)
        if values.shape[-1] > top:  # two stages: the exact max q . k over the candidates' keys picks the top
            if shared:  # a query keeps only its own count of the chunk's widest proposal
                rank = torch.arange(values.shape[-1], device=qs.device)
                values = values.masked_fill(rank >= proposed[..., None], float("-inf"))
            exact = exact_block_scores(qs[:, :, part], k_pad, ok_pad, index, m)
            values, best = exact.masked_fill(~torch.isfinite(values), float("-inf")).topk(top, dim=-1)
            index = index.gather(-1, best)
        picks.append(torch.where(torch.isfinite(values), index, -1))
    return torch.cat(picks, dim=2)


def candidate_count(opts: TensorizedOptions, far_blocks: torch.Tensor, top: int) -> torch.Tensor:
    """How many far blocks the bound proposes to each query: ``max(top, C, ceil(s * far_blocks))``.

    far_blocks: long tensor (any shape), each query's eligible far blocks (they end before its local
    range and hold a retrievable key: a count of its past only, so the choice stays causal and a
    query chooses the same in a forward pass and in the decode cache); ``C = retrieve_candidates``,
    ``s = retrieve_candidate_share``; top: the blocks read (:func:`far_block_index`'s ``top``).
    Returns a long tensor of far_blocks' shape; ``top`` everywhere when the bound chooses alone.
    """
    fixed = max(opts.retrieve_candidates, top)
    if not opts.retrieve_candidate_share:
        return torch.full_like(far_blocks, fixed)
    # float64 and a small slack: s * far = 32.0000001 must not propose 33 (s = 0.1 is not exact in binary)
    shared = torch.ceil(far_blocks.double() * float(opts.retrieve_candidate_share) - 1e-9).long()
    return shared.clamp_min(fixed)


# ``length_advice`` warns when a query's far blocks outnumber its candidates by more than this. Measured
# on the default model (quality study, rounds 22, 30 and 34): 32 candidates of 252 far blocks (16k, 7.9x)
# found 4 / 6 needles, of 508 (32k, 15.9x) none; two lengths, so the threshold sits between them.
FAR_BLOCKS_PER_CANDIDATE = 8


def length_advice(opts: TensorizedOptions, length: int) -> str | None:
    """A warning when a query at ``length`` tokens chooses its far blocks from too few candidates.

    The last query's far blocks (of ``retrieval_block`` slots, before its local range) against its
    candidates (:func:`candidate_count`); None up to ``FAR_BLOCKS_PER_CANDIDATE`` far blocks per
    candidate, or without retrieval.
    """
    if not opts.retrieve:
        return None
    start = local_range_start(torch.tensor(length - 1), opts.inner_block, opts.local == "window")
    far = int(start) // opts.retrieval_block  # every block before the local range (sinks' too: "up to")
    candidates = int(candidate_count(opts, torch.tensor(far), opts.retrieve))
    if far <= FAR_BLOCKS_PER_CANDIDATE * candidates:
        return None
    return (
        f"at {length:,} tokens a query chooses its {opts.retrieve} far blocks from {candidates} candidates of "
        f"up to {far} far blocks; the default model found 4 / 6 needles at 16k (32 of 252) but 0 / 6 at 32k "
        "(32 of 508), 2 / 6 with a quarter of the far blocks as candidates and 5 / 6 with half, by generation "
        "with the default far bias (quality study, rounds 30-34: docs/RESULTS.md); consider "
        "--set retrieve_candidate_share=0.5 (slower: it scores half of full attention's q.k products)"
    )


# The exact stage of a two-stage choice keeps its score tensors below this many elements
# (64 MiB in float32; times score_budget.SCALE) by scoring R queries at a time.
EXACT_SCORE_BUDGET = 1 << 24

# The exact stage scores the union of a chunk's candidate blocks while the far blocks number at
# most this many times the candidates, else each candidate block on its own (linear in the
# length). Measured on the CPU for 32 candidates (benchmarks/exact_stage_cost.py, docs/RESULTS.md
# round 14): the union is faster up to 64 far blocks (time 0.53x / 0.87x of the per-block path at
# 32 / 64 blocks), the per-block path from 128 on (1.6x / 3.3x / 4.3x faster at 128 / 256 / 512).
UNION_MAX_RATIO = 2


def exact_block_scores(
    qs: torch.Tensor, k_pad: torch.Tensor, ok_pad: torch.Tensor, index: torch.Tensor, m: int
) -> torch.Tensor:
    """The exact ``max q . k`` of each query over the retrievable keys of its candidate blocks.

    qs: ``(B, Hq, Q, D)`` queries and k_pad ``(B, Hkv, nb * m, D)`` keys in the selection frame,
    the keys padded to whole blocks of ``m`` slots; ok_pad: ``(B, nb * m)`` their retrievable mask
    (False on the padding), as :func:`far_block_index` pads them once for both stages; index:
    ``(B, Hq, Q, C)`` long candidate block numbers in ``[0, nb)`` (any entry for a query without
    candidates is scored too and must be masked by the caller). Returns ``(B, Hq, Q, C)`` float:
    ``-inf`` for a block without a retrievable key.

    Two ways to the same numbers (up to rounding), chosen by shape (``UNION_MAX_RATIO``): while
    the candidates are a large share of the far blocks, one matmul over the union of a chunk's
    candidates (:func:`exact_scores_over_union`); past that, each candidate block scored only by
    the queries that proposed it (:func:`exact_scores_by_block`: ``Q * C * m`` products, linear).
    """
    nb, candidates = k_pad.shape[2] // m, index.shape[-1]
    if nb <= UNION_MAX_RATIO * candidates:
        return exact_scores_over_union(qs, k_pad, ok_pad, index, m)
    return exact_scores_by_block(qs, k_pad, ok_pad, index, m)


def exact_scores_over_union(
    qs: torch.Tensor, k_pad: torch.Tensor, ok_pad: torch.Tensor, index: torch.Tensor, m: int
) -> torch.Tensor:
    """:func:`exact_block_scores` as one matmul over the union of R queries' candidate blocks.

    R queries at a time (GQA by index, k is never repeated), then each query keeps the maxima of
    its own candidates. Memory ``O(EXACT_SCORE_BUDGET)``; work ``O(Q * U * m * D)`` for a union
    of U blocks: at most the full ``q . k`` product, and near it once the far blocks outnumber the
    candidates (the union of a few hundred queries' candidates is then almost every block).
    """
    b, hq, n_q, d = qs.shape
    hkv, nb = k_pad.shape[1], k_pad.shape[2] // m
    g, ok = hq // hkv, ok_pad.view(b, 1, 1, nb, m)
    offsets = torch.arange(m, device=qs.device)
    scores = []
    rows = max(1, score_budget.budget(EXACT_SCORE_BUDGET) // max(1, b * hq * nb * m))  # the union: at most all
    for first in range(0, n_q, rows):
        part = slice(first, min(first + rows, n_q))
        r = part.stop - part.start
        cand = index[:, :, part]  # (B, Hq, R, C)
        used = cand.unique()  # (U,) sorted block numbers any query here proposed
        where = torch.full((nb,), -1, dtype=torch.long, device=qs.device).scatter(
            0, used, torch.arange(used.numel(), device=qs.device)
        )  # block number -> its column in the union
        slots = (used[:, None] * m + offsets).flatten()  # (U * m,)
        qk = qs[:, :, part].reshape(b, hkv, g * r, d) @ k_pad[:, :, slots].transpose(-1, -2)  # (B, Hkv, g*R, U*m)
        qk = qk.view(b, hq, r, used.numel(), m).masked_fill(~ok[:, :, :, used], float("-inf"))
        best = qk.amax(dim=-1)  # (B, Hq, R, U): exact max q . k per union block
        scores.append(best.gather(-1, where[cand]))
    return torch.cat(scores, dim=2)


def exact_scores_by_block(
    qs: torch.Tensor, k_pad: torch.Tensor, ok_pad: torch.Tensor, index: torch.Tensor, m: int
) -> torch.Tensor:
    """:func:`exact_block_scores` with each candidate block scored only by the queries that proposed it.

    The (query, candidate) pairs of R queries are sorted by key block (batch row, key head, block);
    each block's queries are cut into tiles of ``rows`` (at most 128) and every tile is one small
    matmul ``(rows, D) @ (D, m)`` against its block's keys, all tiles in one batched matmul. Work
    ``O(Q * C * m * D)`` plus the padding of the last tile of each block used; memory
    ``O(EXACT_SCORE_BUDGET)`` with the padding bounded by the tile size, which shrinks (to 16) when
    the pairs spread thin over many blocks.
    """
    b, hq, n_q, d = qs.shape
    c = index.shape[-1]
    keys_t, bias, head_group = _key_block_tables(k_pad, ok_pad, hq, m)
    groups = keys_t.shape[0]
    scores = []
    chunk = max(1, score_budget.budget(EXACT_SCORE_BUDGET) // max(1, b * hq * c * max(d, m)))
    for first in range(0, n_q, chunk):
        part = slice(first, min(first + chunk, n_q))
        r = part.stop - part.start
        group = (head_group[:, :, None, None] + index[:, :, part]).flatten()  # (P,) key block of each pair
        t = pair_tiles(group, groups, c)
        q_tiles = qs[:, :, part].reshape(b * hq * r, d).index_select(0, t.query).view(t.n_tiles, t.rows, d)
        k_tiles = keys_t.index_select(0, t.tile_group)  # (T, D, m)
        qk = torch.baddbmm(bias.index_select(0, t.tile_group), q_tiles, k_tiles)  # (T, rows, m)
        best = qk.amax(dim=-1).flatten()  # (T * rows,)
        scores.append(best[t.at].view(b, hq, r, c))
    return torch.cat(scores, dim=2)


def _key_block_tables(
    k_pad: torch.Tensor, ok_pad: torch.Tensor, hq: int, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The key blocks of ``k_pad`` ``(B, Hkv, nb * m, D)`` (padded to whole blocks; ``ok_pad``
    ``(B, nb * m)``) as tiles for :func:`pair_tiles`: the keys ``(G, D, m)`` with ``G = B * Hkv *
    nb`` (one per batch row, key head and block), a bias ``(G, 1, m)`` (``-inf`` on keys not
    retrievable) and ``(B, Hq)`` the first group of each query head's (batch row, key head)."""
    b, hkv, slots, d = k_pad.shape
    nb, g, dev = slots // m, hq // hkv, k_pad.device
    groups = b * hkv * nb
    keys_t = k_pad.reshape(groups, m, d).transpose(-1, -2).contiguous()  # (G, D, m)
    bias = torch.zeros(b, slots, dtype=k_pad.dtype, device=dev).masked_fill(~ok_pad, float("-inf"))
    bias = bias.view(b, 1, nb, m).expand(b, hkv, nb, m).reshape(groups, 1, m)
    head_group = (torch.arange(b, device=dev)[:, None] * hkv + torch.arange(hq, device=dev)[None] // g) * nb
    return keys_t, bias, head_group


class PairTiles(NamedTuple):
    """(query, key block) pairs laid out in tiles of ``rows`` pairs that share one key block.

    query: ``(n_tiles * rows,)`` the (batch, head, query) row of the pair in each place of the
    table (row 0 on the padding at the end of a block's last tile); tile_group: ``(n_tiles,)`` the
    key block of each tile; at: ``(P,)`` each pair's place in the table, in the pairs' own order.
    """

    query: torch.Tensor
    tile_group: torch.Tensor
    at: torch.Tensor
    n_tiles: int
    rows: int


def pair_tiles(group: torch.Tensor, groups: int, per_query: int) -> PairTiles:
    """Tiles of the pairs whose key blocks are ``group`` ``(P,)`` (in ``[0, groups)``), ``per_query``
    consecutive pairs per query row: sorted by key block (stable), each block's pairs cut into tiles
    of ``rows`` (16 to 128: fewer when the pairs spread thin over many blocks, to bound the padding)."""
    dev = group.device
    group_sorted, order = torch.sort(group, stable=True)
    counts = torch.bincount(group_sorted, minlength=groups)  # (G,) pairs per key block
    rank = torch.arange(order.numel(), device=dev) - (counts.cumsum(0) - counts)[group_sorted]
    used = int((counts > 0).sum())
    rows = min(128, max(16, math.ceil(order.numel() / used)))  # pairs per tile
    tiles = (counts + rows - 1) // rows  # (G,)
    # the place of each sorted pair in the (T * rows) table of tiles
    cell = ((tiles.cumsum(0) - tiles)[group_sorted] + torch.div(rank, rows, rounding_mode="floor")) * rows
    cell += rank % rows
    n_tiles = int(tiles.sum())
    query = torch.zeros(n_tiles * rows, dtype=torch.long, device=dev)  # padding rows: query row 0
    query[cell] = torch.div(order, per_query, rounding_mode="floor")
    tile = torch.div(cell, rows, rounding_mode="floor")
    tile_group = group_sorted.new_zeros(n_tiles).scatter_(0, tile, group_sorted)  # (T,)
    at = torch.empty_like(cell)
    at[order] = cell
    return PairTiles(query, tile_group, at, n_tiles, rows)


def select_far_blocks(
    qs: torch.Tensor,
    ks: torch.Tensor,
    key_ok: torch.Tensor,
    opts: TensorizedOptions,
    n: int,
    q_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`far_block_index` as a mask: ``(B, Hq, Q, nb)`` bool, True for the chosen blocks."""
    index = far_block_index(qs, ks, key_ok, opts, n, q_slots)
    return index_mask(index, math.ceil(ks.shape[2] / opts.retrieval_block))


def index_mask(index: torch.Tensor, nb: int) -> torch.Tensor:
    """Block numbers ``(..., k)`` (``-1``: none) as a mask ``(..., nb)`` bool over the far blocks."""
    chosen = torch.zeros(*index.shape[:-1], nb + 1, dtype=torch.bool, device=index.device)
    return chosen.scatter(-1, torch.where(index >= 0, index, nb), True)[..., :nb]  # -1 -> a dropped column


# The chosen blocks are read over the union of 64 queries' choices while the far blocks number at
# most this many times the blocks a query reads, else pair by pair (linear in the length). Measured
# on the CPU (benchmarks/read_paths.py: SmolLM2's heads, 8 blocks of 64 read, 2 threads, docs/RESULTS.md
# round 20): the union is 2.4x faster at 32 far blocks (2k tokens), even at 64 (1.1x), and 2.0x / 5.2x
# slower at 128 / 256 (8k / 16k).
READ_UNION_MAX_RATIO = 8


def read_chosen_blocks(
    qs: torch.Tensor,
    ks: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    key_ok: torch.Tensor,
    m: int,
    softcap: float | None,
    ordered_inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over its chosen far blocks, from :func:`far_block_index`'s ``index``.

    Arguments and result as :func:`retrieved_attention` (``index`` for ``chosen``); the stacked
    frame past ``READ_UNION_MAX_RATIO`` far blocks per block read goes pair by pair
    (:func:`retrieved_attention_by_block`), everything else over the union.
    """
    nb = math.ceil(ks.shape[2] / m)
    if ordered_inv_freq is None and nb > READ_UNION_MAX_RATIO * index.shape[-1]:
        return retrieved_attention_by_block(qs, ks, v, index, key_ok, m, softcap)
    return retrieved_attention(qs, ks, v, index_mask(index, nb), key_ok, m, softcap, ordered_inv_freq)


def chosen_rank(chosen: torch.Tensor) -> torch.Tensor:
    """``(..., nb)`` long: for each block, how many chosen blocks lie after it (0 for the last chosen).

    chosen: ``(..., nb)`` bool from :func:`select_far_blocks`. Only the entries of chosen blocks
    are meaningful (``retrieve_frame="ordered"`` moves a block of rank r back by ``r m``).
    """
    count = chosen.long()
    return count.flip(-1).cumsum(-1).flip(-1) - count


def ordered_frame_freq(opts: TensorizedOptions, inv_freq: torch.Tensor | None) -> torch.Tensor | None:
    """The inverse frequencies :func:`retrieved_attention` needs for the ordered frame, else None."""
    if opts.rope != "axis" or opts.retrieve_frame != "ordered":
        return None
    if inv_freq is None:
        raise ValueError("retrieve_frame='ordered' needs the model's RoPE inverse frequencies (inv_freq)")
    return inv_freq


def retrieved_attention(
    qs: torch.Tensor,
    ks: torch.Tensor,
    v: torch.Tensor,
    chosen: torch.Tensor,
    key_ok: torch.Tensor,
    m: int,
    softcap: float | None,
    ordered_inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the tokens of its chosen far blocks.

    qs: ``(B, Hq, Q, D)`` pre-scaled queries and ks ``(B, Hkv, L, D)`` keys in the selection
    frame; v: ``(B, Hkv, L, D)``; chosen: ``(B, Hq, Q, nb)`` from :func:`select_far_blocks`
    over blocks of ``m`` slots (``opts.retrieval_block``; ``L <= nb * m``); key_ok: ``(B, L)``;
    ordered_inv_freq: ``(r/2,)`` RoPE inverse frequencies for ``retrieve_frame="ordered"`` (from
    :func:`ordered_frame_freq`; None: the stacked frame). Returns the output ``(B, Hq, Q, D)``
    and its log-sum-exp ``(B, Hq, Q)`` (zeros and ``-inf`` for a query that chose nothing).

    Runs m queries at a time over the union of the blocks they chose (GQA by index: k and v
    are never repeated); each query's softmax is masked to its own choice. In the ordered frame
    a chosen block of rank r is scored by the query rotated by ``r m`` (the same offsets as the
    key moved back by ``r m``).
    """
    b, hq, n_q, d = qs.shape
    hkv = ks.shape[1]
    g = hq // hkv
    offsets = torch.arange(m, device=qs.device)
    outs, lses = [], []
    for first in range(0, n_q, m):
        rows = slice(first, min(first + m, n_q))
        pick = chosen[:, :, rows]  # (B, Hq, R, nb)
        r = pick.shape[2]
        used = pick.flatten(0, 2).any(dim=0).nonzero().flatten()  # (U,) blocks any query here chose
        if used.numel() == 0:
            outs.append(qs.new_zeros(b, hq, r, d))
            lses.append(qs.new_full((b, hq, r), float("-inf")))
            continue
        slots = (used[:, None] * m + offsets).flatten()  # (U * m,); chosen blocks are whole, so < L
        k_t = ks[:, :, slots].transpose(-1, -2)  # (B, Hkv, D, U * m)
        if ordered_inv_freq is None:
            scores = qs[:, :, rows].reshape(b, hkv, g * r, d) @ k_t  # (B, Hkv, g * R, U * m)
        else:
            scores = _ordered_scores(qs[:, :, rows], k_t, chosen_rank(pick)[..., used], m, ordered_inv_freq)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        mask = pick[..., used].repeat_interleave(m, dim=-1) & key_ok[:, None, None, slots]  # (B, Hq, R, U * m)
        probs, lse = masked_softmax(scores.view(b, hq, r, -1), mask)
        out = probs.view(b, hkv, g * r, -1) @ v[:, :, slots]  # (B, Hkv, g * R, D)
        outs.append(out.view(b, hq, r, d))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# Reading the chosen blocks pair by pair keeps its tile tensors below this many elements (64 MiB
# in float32; times score_budget.SCALE) by reading R queries at a time.
READ_PAIR_BUDGET = 1 << 24


def retrieved_attention_by_block(
    qs: torch.Tensor,
    ks: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    key_ok: torch.Tensor,
    m: int,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`retrieved_attention` in the stacked frame, from the choice as block numbers, linear in N.

    qs: ``(B, Hq, Q, D)`` pre-scaled queries and ks ``(B, Hkv, L, D)`` keys in the selection frame;
    v: ``(B, Hkv, L, D)``; index: ``(B, Hq, Q, k)`` long from :func:`far_block_index` (``-1``: none);
    key_ok: ``(B, L)``. Returns the output ``(B, Hq, Q, D)`` and its log-sum-exp ``(B, Hq, Q)``
    (zeros and ``-inf`` for a query that chose nothing), as :func:`retrieved_attention` does.

    Each (query, chosen block) pair is one softmax over the block's ``m`` keys; the pairs, sorted by
    key block, are cut into tiles that share their block's keys and values (:func:`pair_tiles`, as
    the exact stage of the choice), and a query merges its ``k`` pairs by their log-sum-exp. Work
    ``O(Q * k * m * D)``, where the union path's ``O(Q * U * m)`` scores grow with the union ``U`` of
    64 queries' choices (most far blocks at 64k). Differentiable in qs, ks and v.
    """
    b, hq, n_q, d = qs.shape
    top = index.shape[-1]
    pad = math.ceil(ks.shape[2] / m) * m - ks.shape[2]
    keys_t, bias, head_group = _key_block_tables(F.pad(ks, (0, 0, 0, pad)), F.pad(key_ok, (0, pad)), hq, m)
    groups = keys_t.shape[0]
    values = F.pad(v, (0, 0, 0, pad)).reshape(groups, m, d)  # (G, m, D)
    outs, lses = [], []
    chunk = max(1, score_budget.budget(READ_PAIR_BUDGET) // max(1, b * hq * top * max(d, m)))
    for first in range(0, n_q, chunk):
        part = slice(first, min(first + chunk, n_q))
        r = part.stop - part.start
        idx = index[:, :, part]  # (B, Hq, R, k)
        group = (head_group[:, :, None, None] + idx.clamp_min(0)).flatten()  # (P,) key block of each pair
        t = pair_tiles(group, groups, top)
        q_tiles = qs[:, :, part].reshape(b * hq * r, d).index_select(0, t.query).view(t.n_tiles, t.rows, d)
        scores = torch.bmm(q_tiles, keys_t.index_select(0, t.tile_group))  # (T, rows, m)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        lse, out = _softmax_read(scores + bias.index_select(0, t.tile_group), values.index_select(0, t.tile_group))
        pair_lse = lse.flatten()[t.at].view(b, hq, r, top).masked_fill(idx < 0, float("-inf"))
        pair_out = out.reshape(-1, d)[t.at].view(b, hq, r, top, d)
        lse_q, weight = _softmax_read(pair_lse, None)  # (B, Hq, R), (B, Hq, R, k)
        outs.append((weight[..., None] * pair_out).sum(dim=-2))
        lses.append(lse_q)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _softmax_read(scores: torch.Tensor, values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp ``(...)`` of ``scores`` ``(..., S)`` and ``probs @ values`` ``(..., D)`` (the
    probabilities themselves when ``values`` is None); a row of only ``-inf`` gives ``-inf`` and
    zeros, with finite gradients (the row is replaced by zeros before the softmax)."""
    some = torch.isfinite(scores).any(dim=-1, keepdim=True)
    safe = torch.where(some, scores, 0.0)
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    probs = torch.exp(safe - lse) * some
    read = probs if values is None else probs @ values
    return torch.where(some, lse, float("-inf")).squeeze(-1), read


def _ordered_scores(
    q_rows: torch.Tensor, k_t: torch.Tensor, rank: torch.Tensor, n: int, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Scores in the ordered frame: ``(B, Hkv, g * R, U * n)``.

    q_rows: ``(B, Hq, R, D)`` pre-scaled queries in the stacked frame; k_t: ``(B, Hkv, D, U * n)``
    the union's keys (stacked frame, transposed); rank: ``(B, Hq, R, U)`` from :func:`chosen_rank`
    for the union's blocks. One score pass per rank that occurs; entries of unchosen blocks
    keep a rank-0 score (they are masked anyway).
    """
    b, hq, r, d = q_rows.shape
    hkv = k_t.shape[1]
    rank = rank.repeat_interleave(n, dim=-1).view(b, hkv, -1, rank.shape[-1] * n)  # (B, Hkv, g * R, U * n)
    scores = None
    for shift in range(int(rank.max()) + 1):
        q_r = rerotate(q_rows, torch.tensor(float(shift * n)), inv_freq) if shift else q_rows
        s_r = q_r.reshape(b, hkv, -1, d) @ k_t
        scores = s_r if scores is None else torch.where(rank == shift, s_r, scores)
    return scores


def merge_streams(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over two disjoint key sets from their partial results.

    out: ``(..., D)``, lse: ``(...)``; ``lse_a`` is finite everywhere, ``lse_b`` may be ``-inf``
    (an empty set: weight 0). Returns the merged output and log-sum-exp.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return wa * out_a + wb * out_b, lse


def far_logit_bias(opts: TensorizedOptions, slots: torch.Tensor) -> float | torch.Tensor:
    """Nats each query's far logits are lowered by: ``retrieve_bias``, plus ``retrieve_bias_growth``
    per doubling of the query's length beyond ``retrieve_bias_from`` tokens, at most ``retrieve_bias_cap``.

    slots: ``(Q,)`` the queries' slots (a query at slot ``t`` has seen ``t + 1`` tokens). Returns the
    plain float when the bias does not grow, else a ``(Q,)`` float64 tensor:
    ``min(cap, retrieve_bias + growth * max(0, log2((t + 1) / from)))`` (no ``min`` when the cap is 0).
    """
    if not opts.retrieve_bias_growth:
        return opts.retrieve_bias
    if problem := opts.bias_start_problem():
        raise TensorizedConfigError(problem)
    doublings = torch.log2((slots + 1).double() / opts.retrieve_bias_from).clamp_min(0.0)  # (Q,)
    bias = opts.retrieve_bias + opts.retrieve_bias_growth * doublings  # (Q,)
    return bias.clamp_max(opts.retrieve_bias_cap) if opts.retrieve_bias_cap else bias


def merge_far(
    out_local: torch.Tensor,
    lse_local: torch.Tensor,
    out_far: torch.Tensor,
    lse_far: torch.Tensor,
    bias: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The local stream and the retrieved far blocks in one softmax, every far logit lowered by ``bias`` nats.

    out: ``(..., Q, D)``, lse: ``(..., Q)`` as in :func:`merge_streams` (``lse_far`` is ``-inf`` where a
    query read no far block); bias: one float, or ``(Q,)`` per query (:func:`far_logit_bias`). Lowering every
    far logit by ``b`` multiplies the far stream's odds by ``exp(-b)`` (a zero float bias costs nothing).
    """
    return merge_streams(out_local, lse_local, out_far, lower_far_lse(lse_far, bias))


def lower_far_lse(lse_far: torch.Tensor, bias: float | torch.Tensor) -> torch.Tensor:
    """``lse_far`` ``(..., Q)`` with every far logit lowered by ``bias`` nats: one float, or ``(Q,)`` per
    query (:func:`far_logit_bias`); a zero float bias returns ``lse_far`` itself."""
    if isinstance(bias, torch.Tensor):
        return lse_far - bias.to(lse_far.dtype)  # (..., Q) - (Q,)
    return lse_far - bias if bias else lse_far
