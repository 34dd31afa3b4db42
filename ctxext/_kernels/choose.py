"""The far-block choice (``retrieve=k``) on fused kernels: the bound proposes, the exact score picks.

The PyTorch choice (:func:`ctxext.attention.retrieve.far_block_index`) scores queries in chunks
sized for a CPU's memory, a dozen operator calls each: at 131,072 tokens with 32 query heads,
about 2,000 chunks per layer, each a round of kernel launches on a GPU (docs/RESULTS.md, round
18). Here the same choice is one launch for the bound alone, three and a few operator calls with
the exact stage:

* ``choose_bound_kernel``: one program per (tile of ``BLOCK_Q`` queries, batch x query head).
  It walks the far blocks in tiles of ``CP`` (a power of two), scores each tile with two
  ``tl.dot`` (``max(q, 0) . kmax + min(q, 0) . kmin``: the bound on ``q . k`` over the block's
  keys) and keeps each query's ``CP`` best blocks in registers: the running best and the new
  tile are joined and sorted (``tl.sort``), the upper half kept; a tile that beats no kept block
  of any of the program's queries is skipped. Only blocks before the tile's
  last local range are visited (causal: about half of them). With ``PER > 1`` sub-blocks per
  block (``retrieve_score_block``) a block scores the largest bound over its sub-blocks that
  hold a retrievable key: two ``tl.dot`` per sub-block.
* ``choose_exact_kernel``: one program per (far block, batch x query head), over the (query,
  candidate) pairs that proposed the block, gathered from a CSR list
  (:func:`ctxext._kernels.retrieve.query_lists`, a sort in PyTorch): the block's keys are loaded
  once, each tile of pairs is one ``tl.dot`` and a row maximum, the exact ``max q . k`` over the
  block's retrievable keys, written to the pair's place. A kernel with one program per query
  reading its candidates' keys would load ``C * M * D`` floats per query and head (1 MiB at 32
  candidates of 64 keys, head dim 128: about 4 TB per layer at 128k tokens and 32 heads); this
  one loads each block once per head and each query once per candidate (about 70 GB there).
* ``choose_top_kernel``: each query's ``TOP`` best of its ``C`` exact scores (one sort per row).

A score and its block number travel as one int64 (:func:`_pack`): the float32 score's bits made
order-preserving in the high half, ``2**31 - 1 - block`` in the low half, so one integer sort
orders by score and, at equal scores, prefers the lower block. ``-inf`` marks an ineligible or
empty entry; the output's block number is then ``-1``, as in the PyTorch choice.

Inputs are contiguous float32 (the Triton backend's accumulation dtype): queries
``(B, HQ, L, D)``, per-sub-block key maxima and minima ``(B, HKV, NB * PER, D)`` (0 for a sub-block
without a retrievable key), ``SUB`` ``(B, NB * PER)`` uint8 (the sub-block holds a retrievable key;
with ``PER = 1`` the block), keys ``(B, HKV, L, D)`` and ``KOK`` ``(B, L)`` uint8 (retrievable keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import interpreting
from .retrieve import block_keys, query_lists


@triton.jit
def _pack(score, block):
    """``score`` (float32) and ``block`` (int32, -1 allowed) as one int64 ordered by score, then lower block."""
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # order-preserving as a signed int32
    return (key.to(tl.int64) << 32) | (0x7FFFFFFF - block.to(tl.int64))


@triton.jit
def _unpack(packed):
    """(score float32, block int32) of :func:`_pack`'s integers."""
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    block = (0x7FFFFFFF - (packed & 0xFFFFFFFF)).to(tl.int32)
    return bits.to(tl.float32, bitcast=True), block


@triton.jit
def choose_bound_kernel(
    Q, KMAX, KMIN, SUB, IDX,
    L, D, HQ, G, NB, PER, M, N, C_OUT,
    WINDOW: tl.constexpr, PREC: tl.constexpr, CP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b = bh // HQ
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, CP)
    q_in, d_ok = offs_q < L, offs_d < D
    q_rows = bh.to(tl.int64) * L + offs_q
    q = tl.load(Q + q_rows[:, None] * D + offs_d[None, :], mask=q_in[:, None] & d_ok[None, :], other=0.0)
    q_pos, q_neg = tl.maximum(q, 0.0), tl.minimum(q, 0.0)
    start = (offs_q // N) * N  # (BLOCK_Q,) first slot of each query's local range
    if WINDOW:
        start = tl.maximum(start - N, 0)
    start = tl.where(q_in, start, 0)
    kv_base = (b.to(tl.int64) * (HQ // G) + (bh % HQ) // G) * NB * PER
    best = _pack(tl.full([BLOCK_Q, CP], float("-inf"), tl.float32), tl.full([BLOCK_Q, CP], -1, tl.int32))
    far = tl.max(start, 0) // M  # blocks 0 .. far-1 end before some query's local range
    for first in range(0, far, CP):
        blk = first + offs_c  # (CP,)
        in_nb = blk < NB
        tile_ok = in_nb[:, None] & d_ok[None, :]
        bound = tl.full([BLOCK_Q, CP], float("-inf"), tl.float32)
        for part in range(0, PER):  # a block scores its best sub-block that holds a retrievable key
            sub = blk * PER + part  # (CP,)
            rows = (kv_base + sub)[:, None] * D + offs_d[None, :]
            kmax = tl.load(KMAX + rows, mask=tile_ok, other=0.0)
            kmin = tl.load(KMIN + rows, mask=tile_ok, other=0.0)
            has = tl.load(SUB + b * NB * PER + sub, mask=in_nb, other=0) != 0
            part_bound = tl.dot(q_pos, tl.trans(kmax), input_precision=PREC)
            part_bound += tl.dot(q_neg, tl.trans(kmin), input_precision=PREC)  # (BLOCK_Q, CP)
            bound = tl.maximum(bound, tl.where(has[None, :], part_bound, float("-inf")))
        eligible = ((blk[None, :] + 1) * M <= start[:, None]) & (bound > float("-inf"))
        tile = _pack(tl.where(eligible, bound, float("-inf")), tl.where(eligible, blk[None, :], -1))
        if tl.max(tl.max((tile > tl.min(best, 1)[:, None]).to(tl.int32), 1), 0) > 0:  # it beats a kept block
            both = tl.sort(tl.reshape(tl.join(best, tile), [BLOCK_Q, 2 * CP]), descending=True)
            best, _ = tl.split(tl.permute(tl.reshape(both, [BLOCK_Q, 2, CP]), [0, 2, 1]))  # the upper half
    score, block = _unpack(best)
    block = tl.where(score > float("-inf"), block, -1)
    out_ok = q_in[:, None] & (offs_c < C_OUT)[None, :]
    tl.store(IDX + q_rows[:, None] * C_OUT + offs_c[None, :], block, mask=out_ok)


@triton.jit
def choose_exact_kernel(
    Q, K, KOK, QOFF, PAIRS, EXACT,
    L, D, HQ, G, NB, M, C,
    PREC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    offs_q = tl.arange(0, BLOCK_Q)
    d_ok = offs_d < D
    kv_base = (b.to(tl.int64) * (HQ // G) + (bh % HQ) // G) * L
    k, ok, _ = block_keys(K, KOK, kv_base, b, blk, L, D, M, offs_m, offs_d)  # (BLOCK_M, BLOCK_D), (BLOCK_M,)
    first = tl.load(QOFF + bh.to(tl.int64) * NB + blk)
    last = tl.load(QOFF + bh.to(tl.int64) * NB + blk + 1)
    for start in range(first, last, BLOCK_Q):
        at = start + offs_q
        q_in = at < last
        pair = tl.load(PAIRS + at, mask=q_in, other=0).to(tl.int64)  # (BLOCK_Q,) slot * C + candidate
        q_rows = bh.to(tl.int64) * L + pair // C
        q = tl.load(Q + q_rows[:, None] * D + offs_d[None, :], mask=q_in[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BLOCK_Q, BLOCK_M)
        best = tl.max(tl.where(ok[None, :], qk, float("-inf")), 1)
        tl.store(EXACT + bh.to(tl.int64) * L * C + pair, best, mask=q_in)


@triton.jit
def choose_top_kernel(
    EXACT, CAND, IDX, ROWS, C, TOP,
    CP: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, CP)
    cell_ok = (rows < ROWS)[:, None] & (offs_c < C)[None, :]
    at = rows.to(tl.int64)[:, None] * C + offs_c[None, :]
    exact = tl.load(EXACT + at, mask=cell_ok, other=float("-inf"))
    cand = tl.load(CAND + at, mask=cell_ok, other=-1)
    score, block = _unpack(tl.sort(_pack(exact, cand), descending=True))
    out_ok = (rows < ROWS)[:, None] & (offs_c < TOP)[None, :]
    tl.store(IDX + rows.to(tl.int64)[:, None] * TOP + offs_c[None, :], tl.where(score > float("-inf"), block, -1),
             mask=out_ok)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def bound_tiles(block_d: int, width: int) -> tuple[int, int]:
    """(BLOCK_Q, num_stages) of the bound kernel for head-dim tile ``block_d`` and ``width`` (CP) candidates.

    Shared memory grows with all three (the q tiles, the pipelined key-bound tiles, the sort's
    layout changes); these keep it at or below 104 KiB on sm_80 and sm_90 for every head dim up
    to 256 and up to 64 candidates (compiled without a GPU, ``tests/kernels/gpu_compile.py``). Untuned.
    """
    if interpreting():  # the interpreter's cost is per element: the smallest legal tile
        return 16, 1
    block_q = 32 if block_d <= 128 else 16
    return block_q, 2 if width <= 32 else 1


def choose_far_blocks(
    qs: torch.Tensor,
    ks: torch.Tensor,
    key_ok: torch.Tensor,
    kmax: torch.Tensor,
    kmin: torch.Tensor,
    sub_keys: torch.Tensor,
    m: int,
    n: int,
    window: bool,
    top: int,
    candidates: int,
    precision: str = "ieee",
) -> torch.Tensor:
    """Each query's ``top`` far blocks: ``(B, HQ, L, top)`` int32 block numbers, best first, ``-1`` for none.

    qs: ``(B, HQ, L, D)`` and ks: ``(B, HKV, L, D)`` float32 in the selection frame; key_ok:
    ``(B, L)`` bool; kmax, kmin: ``(B, HKV, NB * per, D)`` float32 per scored sub-block, ``per``
    sub-blocks to a far block of ``m`` slots (``per = 1``: the block itself); sub_keys: ``(B, NB * per)``
    bool, the sub-block holds a retrievable key (:class:`ctxext.attention.retrieve.FarBlockKeys`);
    n, window: the local range (inner block, ``local="window"``); candidates: how many blocks the
    bound proposes (``<= top``: the bound chooses alone, else the exact ``max q . k`` picks ``top``
    of them); precision: ``tl.dot``'s for the bound.
    """
    b, hq, length, d = qs.shape
    nb = -(-ks.shape[2] // m)  # far blocks of m slots, the last one padded
    per = kmax.shape[2] // nb  # scored sub-blocks per block
    qs, ks, kmax, kmin = (x.contiguous() for x in (qs, ks, kmax, kmin))
    proposed = min(max(candidates, top), nb)
    two_stage = proposed > top
    width = max(16, triton.next_power_of_2(proposed))  # CP: the running best per query
    block_d = max(16, triton.next_power_of_2(d))
    small = interpreting()
    block_q, stages = bound_tiles(block_d, width)
    index = torch.empty(b, hq, length, proposed, device=qs.device, dtype=torch.int32)
    choose_bound_kernel[(triton.cdiv(length, block_q), b * hq)](
        qs, kmax, kmin, sub_keys.contiguous().view(torch.uint8), index,
        length, d, hq, hq // ks.shape[1], nb, per, m, n, proposed,
        WINDOW=window, PREC=precision, CP=width, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=1 if small else 4,
        num_stages=stages,
    )  # fmt: skip
    if not two_stage:
        return index
    # the exact stage: one program per (far block, head) over the (query, candidate) pairs that proposed it
    offsets, pairs = query_lists(index, nb, pairs=True)
    exact = torch.full((b, hq, length, proposed), float("-inf"), device=qs.device, dtype=torch.float32)
    choose_exact_kernel[(nb, b * hq)](
        qs, ks, key_ok.contiguous().view(torch.uint8), offsets, pairs, exact,
        length, d, hq, hq // ks.shape[1], nb, m, proposed,
        PREC=precision, BLOCK_Q=16 if small else 32, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_D=block_d,
        num_warps=1 if small else 4,
    )  # fmt: skip
    picked = torch.empty(b, hq, length, top, device=qs.device, dtype=torch.int32)
    rows = b * hq * length
    block_r = 16 if small else 32
    choose_top_kernel[(triton.cdiv(rows, block_r),)](
        exact, index, picked, rows, proposed, top, CP=width, BLOCK_R=block_r, num_warps=1 if small else 4
    )
    return picked
