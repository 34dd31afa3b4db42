"""Fused retrieval of far blocks (``retrieve=k``, stacked frame): forward and backward kernels.

Each query reads the ``k`` far blocks of ``M`` slots it chose (``IDX``: ``(B, HQ, L, k)`` block
numbers, ``-1`` for none) exactly, in one softmax, and returns the output and its log-sum-exp;
the caller merges them into the local hop's causal stream (``ctxext.attention.side_streams``).
Only the chosen blocks are read: ``O(L * k * M * D)`` per head, never the ``(L, U * M)`` score
tile of the PyTorch path's masked union.

* ``retrieve_fwd_kernel``: one program per query (vector work over its blocks; queries of a
  head that chose the same blocks hit them in L2).
* ``retrieve_dq_kernel``: the same walk for ``dq``.
* ``retrieve_dkdv_kernel``: one program per (far block, query head) over the queries that chose
  that block, gathered from a CSR list (:func:`query_lists`) built in PyTorch, so ``dk`` and
  ``dv`` need no atomics; they come out per query head and are summed over each key head's
  group afterwards (GQA).

Every tensor is contiguous ``(B, H, L, D)`` in the accumulation dtype (float32, or float64 for
tests); ``KOK`` is ``(B, L)`` uint8 (retrievable keys). The caller scales nothing: ``scale``
multiplies ``q . k`` before the soft-cap, as in the hop kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import acc_dtype, dot_precision, interpreting
from .rotary import cap_grad, capped

NEG_INIT = tl.constexpr(-1.0e30)


@triton.jit
def block_keys(K, KOK, kv_base, b, blk, L, D, M, offs_m, offs_d):
    """Keys ``(BLOCK_M, BLOCK_D)`` of far block ``blk`` (< 0: none), which slots are keys, and their rows.

    kv_base: the key head's first row in ``(B * HKV * L)``; rows: ``(BLOCK_M,)`` int64 (for the values).
    """
    slots = blk * M + offs_m
    ok = (offs_m < M) & (slots >= 0) & (slots < L)  # slots >= 0 iff blk >= 0
    ok = ok & (tl.load(KOK + b * L + slots, mask=ok, other=0) != 0)
    rows = (kv_base + slots).to(tl.int64)
    k = tl.load(K + rows[:, None] * D + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return k, ok, rows


@triton.jit
def _block(K, V, KOK, kv_base, b, blk, L, D, M, offs_m, offs_d):
    """Keys and values ``(BLOCK_M, BLOCK_D)`` of far block ``blk`` (< 0: none) and which slots are keys."""
    k, ok, rows = block_keys(K, KOK, kv_base, b, blk, L, D, M, offs_m, offs_d)
    v = tl.load(V + rows[:, None] * D + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return k, v, ok


@triton.jit
def _query(Q, L, D, HQ, G, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query (grid ``(L, B * HQ)``): batch, row in ``(B * HQ * L)``, key-head row base, q."""
    bh = tl.program_id(1)
    b = bh // HQ
    q_row = bh.to(tl.int64) * L + tl.program_id(0)
    kv_base = (b.to(tl.int64) * (HQ // G) + (bh % HQ) // G) * L
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + q_row * D + offs_d, mask=offs_d < D, other=0.0).to(ACC)
    return b, q_row, kv_base, offs_d, q


@triton.jit
def _chosen(q, K, V, IDX, KOK, kv_base, b, q_row, j, NCHOSEN, L, D, M, offs_m, offs_d, scale, softcap,
            SOFTCAP: tl.constexpr):  # fmt: skip
    """The query's j-th chosen block: keys, values, key mask and (soft-capped) scores ``(BLOCK_M,)``."""
    blk = tl.load(IDX + q_row * NCHOSEN + j)
    k, v, ok = _block(K, V, KOK, kv_base, b, blk, L, D, M, offs_m, offs_d)
    s = capped(tl.sum(k * q[None, :], 1) * scale, softcap, SOFTCAP)
    return k, v, ok, s


@triton.jit
def retrieve_fwd_kernel(
    Q, K, V, IDX, KOK, OUT, LSE,
    L, D, HQ, G, NCHOSEN, M, scale, softcap,
    SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b, q_row, kv_base, offs_d, q = _query(Q, L, D, HQ, G, ACC, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    m_i = tl.full([1], NEG_INIT, dtype=ACC)
    l_i = tl.zeros([1], dtype=ACC)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for j in range(NCHOSEN):
        k, v, ok, s = _chosen(q, K, V, IDX, KOK, kv_base, b, q_row, j, NCHOSEN, L, D, M, offs_m, offs_d, scale,
                              softcap, SOFTCAP)  # fmt: skip
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    has = l_i > 0
    safe_l = tl.where(has, l_i, 1.0)
    out = tl.where(has, acc / safe_l, 0.0)
    lse = tl.where(has, m_i + tl.log(safe_l), float("-inf"))
    tl.store(OUT + q_row * D + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < D)
    tl.store(LSE + q_row + tl.arange(0, 1), lse.to(LSE.dtype.element_ty))


@triton.jit
def retrieve_dq_kernel(
    Q, K, V, IDX, KOK, LSE, DO, DELTA, DQ,
    L, D, HQ, G, NCHOSEN, M, scale, softcap,
    SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b, q_row, kv_base, offs_d, q = _query(Q, L, D, HQ, G, ACC, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    do = tl.load(DO + q_row * D + offs_d, mask=offs_d < D, other=0.0).to(ACC)
    lse = tl.load(LSE + q_row + tl.arange(0, 1))
    lse = tl.where(lse > float("-inf"), lse, 0.0)  # chose nothing: every key is masked anyway
    delta = tl.load(DELTA + q_row + tl.arange(0, 1))
    dq = tl.zeros([BLOCK_D], dtype=ACC)
    for j in range(NCHOSEN):
        k, v, ok, s = _chosen(q, K, V, IDX, KOK, kv_base, b, q_row, j, NCHOSEN, L, D, M, offs_m, offs_d, scale,
                              softcap, SOFTCAP)  # fmt: skip
        p = tl.where(ok, tl.exp(s - lse), 0.0)
        dp = tl.sum(v * do[None, :], 1)
        ds = cap_grad(p * (dp - delta), s, softcap, SOFTCAP)
        dq += tl.sum(ds[:, None] * k, 0) * scale
    tl.store(DQ + q_row * D + offs_d, dq.to(DQ.dtype.element_ty), mask=offs_d < D)


@triton.jit
def retrieve_dkdv_kernel(
    Q, K, V, KOK, LSE, DO, DELTA, QOFF, QIDS, DK, DV,
    L, D, HQ, G, NB, M, scale, softcap,
    SOFTCAP: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    offs_q = tl.arange(0, BLOCK_Q)
    d_ok = offs_d < D
    kv_base = (b.to(tl.int64) * (HQ // G) + h // G) * L
    k, v, ok = _block(K, V, KOK, kv_base, b, blk, L, D, M, offs_m, offs_d)
    k, v = k.to(ACC), v.to(ACC)
    list_at = bh.to(tl.int64) * NB + blk
    first = tl.load(QOFF + list_at)
    last = tl.load(QOFF + list_at + 1)
    q_base = bh.to(tl.int64) * L
    dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start in range(first, last, BLOCK_Q):
        at = start + offs_q
        q_in = at < last
        rows = q_base + tl.load(QIDS + at, mask=q_in, other=0).to(tl.int64)  # (BLOCK_Q,) query rows
        tile_ok = q_in[:, None] & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * D + offs_d[None, :], mask=tile_ok, other=0.0).to(ACC)
        do = tl.load(DO + rows[:, None] * D + offs_d[None, :], mask=tile_ok, other=0.0).to(ACC)
        lse = tl.load(LSE + rows, mask=q_in, other=0.0)
        delta = tl.load(DELTA + rows, mask=q_in, other=0.0)
        s = capped(tl.dot(q, tl.trans(k), input_precision=PREC) * scale, softcap, SOFTCAP)  # (BQ, BM)
        p = tl.where(q_in[:, None] & ok[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = cap_grad(p * (dp - delta[:, None]), s, softcap, SOFTCAP)
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC) * scale
    out_rows = (q_base + blk * M + offs_m).to(tl.int64)  # per query head: summed over the group later
    out_ok = ((offs_m < M) & (blk * M + offs_m < L))[:, None] & d_ok[None, :]
    tl.store(DK + out_rows[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + out_rows[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_ok)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def query_lists(index: torch.Tensor, nb: int, pairs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (batch * query head, far block): the queries that chose it, as a CSR list.

    index: ``(B, HQ, L, k)`` block numbers (``-1``: none). Returns offsets ``(B * HQ * nb + 1,)``
    int64 and query slots ``(E,)`` int32 sorted by (head, block), E = the number of choices;
    pairs: each entry is the choice's place ``slot * k + j`` in its head's ``(L, k)`` instead.
    """
    b, hq, length, top = index.shape
    flat = index.reshape(b * hq, length * top).long()
    taken = flat >= 0
    list_of = (torch.arange(b * hq, device=index.device)[:, None] * nb + flat)[taken]  # (E,)
    place = torch.arange(length * top, device=index.device)
    slot = (place if pairs else place // top).expand(b * hq, -1)[taken]
    order = torch.argsort(list_of, stable=True)
    counts = torch.bincount(list_of, minlength=b * hq * nb)
    offsets = torch.zeros(b * hq * nb + 1, dtype=torch.int64, device=index.device)
    offsets[1:] = counts.cumsum(0)
    return offsets, slot[order].to(torch.int32).contiguous()


def _sizes(q, m):
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    block_m = max(16, triton.next_power_of_2(m))
    return block_m, block_d


def _flags(q, softcap):
    acc = acc_dtype(q.dtype)
    return dict(SOFTCAP=softcap != 0.0, ACC=tl.float64 if acc == torch.float64 else tl.float32)


def retrieve_forward(q, k, v, index, key_ok, m: int, scale: float, softcap: float):
    """Output ``(B, HQ, L, D)`` and lse ``(B, HQ, L)`` of each query over its chosen far blocks.

    q: ``(B, HQ, L, D)``; k, v: ``(B, HKV, L, D)`` (same dtype); index ``(B, HQ, L, k)`` int32;
    key_ok: ``(B, L)`` bool; m: slots per far block.
    """
    q, k, v, index = (x.contiguous() for x in (q, k, v, index))
    b, hq, length, d = q.shape
    acc = acc_dtype(q.dtype)
    out = torch.empty(b, hq, length, d, device=q.device, dtype=acc)
    lse = torch.empty(b, hq, length, device=q.device, dtype=acc)
    if length == 0 or index.shape[-1] == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    block_m, block_d = _sizes(q, m)
    kok = key_ok.contiguous().view(torch.uint8)
    retrieve_fwd_kernel[(length, b * hq)](
        q, k, v, index, kok, out, lse,
        length, d, hq, hq // k.shape[1], index.shape[-1], m, float(scale), float(softcap),
        **_flags(q, softcap), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=1 if interpreting() else 4,
    )  # fmt: skip
    return out, lse


def retrieve_backward(q, k, v, index, key_ok, out, lse, dout, dlse, m: int, scale: float, softcap: float):
    """``(dq, dk, dv)`` of :func:`retrieve_forward` (accumulation dtype) from ``dout`` and ``dlse``."""
    q, k, v, index = (x.contiguous() for x in (q, k, v, index))
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    acc = acc_dtype(q.dtype)
    dout = dout.to(acc).contiguous()
    delta = (dout * out).sum(-1)  # (B, HQ, L): rowsum(dO * O); d lse / d s = p folds in as -dlse
    if dlse is not None:
        delta = delta - dlse.to(acc)
    delta = delta.contiguous()
    lse = lse.contiguous()
    dq = torch.zeros(b, hq, length, d, device=q.device, dtype=acc)
    dk_q = torch.zeros(b, hq, length, d, device=q.device, dtype=acc)  # per query head
    dv_q = torch.zeros(b, hq, length, d, device=q.device, dtype=acc)
    if length and index.shape[-1]:
        block_m, block_d = _sizes(q, m)
        kok = key_ok.contiguous().view(torch.uint8)
        flags = _flags(q, softcap)
        warps = 1 if interpreting() else 4
        common = (length, d, hq, hq // hkv)
        retrieve_dq_kernel[(length, b * hq)](
            q, k, v, index, kok, lse, dout, delta, dq, *common, index.shape[-1], m, float(scale), float(softcap),
            **flags, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
        nb = triton.cdiv(length, m)
        offsets, slots = query_lists(index, nb)
        retrieve_dkdv_kernel[(nb, b * hq)](
            q, k, v, kok, lse, dout, delta, offsets, slots, dk_q, dv_q, *common, nb, m, float(scale),
            float(softcap), **flags, PREC=dot_precision(q.dtype),
            BLOCK_Q=16 if interpreting() else 32, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
        )  # fmt: skip
    g = hq // hkv
    dk = dk_q.view(b, hkv, g, length, d).sum(2)
    dv = dv_q.view(b, hkv, g, length, d).sum(2)
    return dq, dk, dv
