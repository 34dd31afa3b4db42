"""Forward kernel of one tensorized-attention hop: every fiber of one axis, online softmax.

A hop along an axis of size ``N_J`` and stride ``S_J`` (slots ``base + t * S_J``, ``t < N_J``)
runs attention inside every fiber with up to two value streams, read in one pass over the
fiber's keys:

* causal stream: keys ``t <= i`` valued by ``VM`` (the local hop and ``dominance``), or, with
  SPLIT_DIAG (``complete`` outer hops), keys ``t < i`` valued by ``VM`` (the previous full
  stream) plus the diagonal valued by ``VD`` (the previous causal stream);
* full stream (HAS_FULL): every key of the fiber, valued by ``VM``.

With DIAG_LSE (``merge="lse"`` or ``"mass"``) the diagonal's score is the lower hop's
log-sum-exp (``LSE_CI`` / ``LSE_FI``) instead of ``q . k``; ``bias`` is added to every other
score (``log(s_j)`` for ``merge="mass"``, else 0). With WINDOW (``local="window"``, local
hop only) the causal stream also attends to the whole previous block. With ROPE, q and k are re-rotated from their
RoPE position (``POS``, or the slot index) to the fiber coordinate ``t`` on load.

UPCAST (set by the launcher in Triton's interpreter only, whose ``tl.dot`` multiplies the raw
bits of bfloat16 tiles) computes the dots of bfloat16 tiles in float32.

Grid: ``(n_fibers * n_query_tiles, B * HQ)``. Query head ``h`` reads key head ``h // G_K`` and
value head ``h // G_V`` (grouped-query attention by index, nothing repeated). Every tensor
is ``(B, H, L, D)`` with a contiguous last dim, read through its strides; lse tensors are
contiguous ``(B, HQ, L)``. Slots ``>= L`` and padding slots (``VALID`` false) are masked keys;
padding queries get zero output and lse ``-inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rotary import capped, load_rows

NEG_INIT = tl.constexpr(-1.0e30)  # running max start: finite, so exp(m_old - m_new) never sees inf - inf


@triton.jit
def _online(m, l, acc, s, vals, PREC: tl.constexpr):
    """One online-softmax step: scores ``s (BM, BN)`` (-inf where masked), values ``(BN, BD)``."""
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])  # (BM, BN)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PREC).to(acc.dtype)
    return m_new, l, acc


@triton.jit
def _finish(m, l, acc, OUT, out_base, LSE, lse_base, slots, row_ok, stride_l, offs_d, D):
    """Normalise and store one stream: ``(BM, BD)`` output and ``(BM,)`` lse (zeros / -inf when empty)."""
    has = l > 0
    safe_l = tl.where(has, l, 1.0)
    out = tl.where(has[:, None], acc / safe_l[:, None], 0.0)
    lse = tl.where(has, m + tl.log(safe_l), float("-inf"))
    rows = slots.to(tl.int64)
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(OUT + out_base + rows[:, None] * stride_l + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + lse_base + rows, lse.to(LSE.dtype.element_ty), mask=row_ok)


@triton.jit
def hop_fwd_kernel(
    Q, K, VM, VD, LSE_CI, LSE_FI, VALID, POS, FREQ,  # inputs
    CO, LSE_CO, FO, LSE_FO,  # outputs
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sob, soh, sol,  # strides
    L, D, HQ, G_K, G_V, N_J, S_J, N_QT, HALF,  # sizes
    scale, softcap, bias,
    HAS_VALID: tl.constexpr, HAS_POS: tl.constexpr, ROPE: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT_DIAG: tl.constexpr, HAS_FULL: tl.constexpr, DIAG_LSE: tl.constexpr, WINDOW: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    fib = pid // N_QT
    mt = pid % N_QT
    base_slot = (fib // S_J) * N_J * S_J + fib % S_J  # slot of fiber element t = 0

    offs_d = tl.arange(0, BLOCK_D)
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)  # fiber coordinate i of each query row
    slot_m = base_slot + offs_m * S_J
    m_ok = (offs_m < N_J) & (slot_m < L)
    q_ok = m_ok
    if HAS_VALID:
        q_ok = m_ok & (tl.load(VALID + b * L + slot_m, mask=m_ok, other=0) != 0)
    if HAS_POS:
        pos_m = tl.load(POS + b * L + slot_m, mask=m_ok, other=0.0)
    else:
        pos_m = slot_m.to(tl.float32)
    delta_m = offs_m.to(tl.float32) - pos_m  # RoPE position -> fiber coordinate

    b64 = b.to(tl.int64)
    q_base = b64 * sqb + h * sqh
    k_base = b64 * skb + (h // G_K) * skh
    v_base = b64 * svb + (h // G_V) * svh
    lse_base = (b64 * HQ + h) * L
    q = load_rows(Q + q_base, slot_m, m_ok, sql, offs_d, D, delta_m, FREQ, HALF, ROPE, ACC)  # (BM, BD)
    if UPCAST:
        q = q.to(ACC)

    m_c = tl.full([BLOCK_M], NEG_INIT, dtype=ACC)
    l_c = tl.zeros([BLOCK_M], dtype=ACC)
    acc_c = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if SPLIT_DIAG:  # the diagonal, valued by the previous causal stream, starts the causal softmax
        if DIAG_LSE:
            s_d = tl.load(LSE_CI + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
        else:
            k_own = load_rows(K + k_base, slot_m, m_ok, skl, offs_d, D, delta_m, FREQ, HALF, ROPE, ACC)
            s_d = capped(tl.sum(q.to(ACC) * k_own.to(ACC), 1) * scale, softcap, SOFTCAP)
        m_c = tl.where(q_ok, s_d, NEG_INIT)
        l_c = tl.where(q_ok, 1.0, 0.0).to(ACC)
        d_base = b64 * sdb + h * sdh
        acc_c = load_rows(VD + d_base, slot_m, q_ok, sdl, offs_d, D, delta_m, FREQ, HALF, False, ACC).to(ACC)
    elif DIAG_LSE:
        lse_ci = tl.load(LSE_CI + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
    if HAS_FULL:
        m_f = tl.full([BLOCK_M], NEG_INIT, dtype=ACC)
        l_f = tl.zeros([BLOCK_M], dtype=ACC)
        acc_f = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
        if DIAG_LSE:
            lse_fi = tl.load(LSE_FI + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
        hi = N_J
    else:  # causal only: keys up to the last query row of this tile
        hi = tl.minimum(N_J, (mt + 1) * BLOCK_M)

    if WINDOW:  # local hop only (S_J = 1): the causal stream also sees the whole previous block
        prev = base_slot - N_J
        for start_n in range(0, N_J, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            slot_n = prev + offs_n
            n_ok = (offs_n < N_J) & (slot_n >= 0)
            k = load_rows(K + k_base, slot_n, n_ok, skl, offs_d, D, pos_m, FREQ, HALF, False, ACC)
            vm = load_rows(VM + v_base, slot_n, n_ok, svl, offs_d, D, pos_m, FREQ, HALF, False, ACC)
            if UPCAST:
                k = k.to(ACC)
                vm = vm.to(ACC)
            if HAS_VALID:
                n_ok = n_ok & (tl.load(VALID + b * L + slot_n, mask=n_ok, other=0) != 0)
            s = capped(tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale, softcap, SOFTCAP)
            s = tl.where(q_ok[:, None] & n_ok[None, :], s, float("-inf"))
            m_c, l_c, acc_c = _online(m_c, l_c, acc_c, s, vm, PREC)

    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        slot_n = base_slot + offs_n * S_J
        n_ok = (offs_n < N_J) & (slot_n < L)
        if HAS_POS:
            pos_n = tl.load(POS + b * L + slot_n, mask=n_ok, other=0.0)
        else:
            pos_n = slot_n.to(tl.float32)
        k = load_rows(K + k_base, slot_n, n_ok, skl, offs_d, D, offs_n.to(tl.float32) - pos_n, FREQ, HALF, ROPE, ACC)
        vm = load_rows(VM + v_base, slot_n, n_ok, svl, offs_d, D, pos_n, FREQ, HALF, False, ACC)  # (BN, BD)
        if UPCAST:
            k = k.to(ACC)
            vm = vm.to(ACC)
        if HAS_VALID:
            n_ok = n_ok & (tl.load(VALID + b * L + slot_n, mask=n_ok, other=0) != 0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(ACC) * scale  # (BM, BN)
        s = capped(s, softcap, SOFTCAP) + bias  # bias: log(s_j) with merge="mass", else 0
        ok = q_ok[:, None] & n_ok[None, :]
        is_diag = offs_m[:, None] == offs_n[None, :]
        if HAS_FULL:
            s_f = s
            if DIAG_LSE:
                s_f = tl.where(is_diag, lse_fi[:, None], s)
            s_f = tl.where(ok, s_f, float("-inf"))
            m_f, l_f, acc_f = _online(m_f, l_f, acc_f, s_f, vm, PREC)
        if SPLIT_DIAG:
            c_ok = ok & (offs_n[None, :] < offs_m[:, None])
            s_c = s
        else:
            c_ok = ok & (offs_n[None, :] <= offs_m[:, None])
            s_c = s
            if DIAG_LSE:
                s_c = tl.where(is_diag, lse_ci[:, None], s)
        s_c = tl.where(c_ok, s_c, float("-inf"))
        m_c, l_c, acc_c = _online(m_c, l_c, acc_c, s_c, vm, PREC)

    o_base = b64 * sob + h * soh
    _finish(m_c, l_c, acc_c, CO, o_base, LSE_CO, lse_base, slot_m, m_ok, sol, offs_d, D)
    if HAS_FULL:
        _finish(m_f, l_f, acc_f, FO, o_base, LSE_FO, lse_base, slot_m, m_ok, sol, offs_d, D)
