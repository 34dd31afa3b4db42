"""Backward kernels of one hop (see ``hop_fwd.py`` for the streams, flags and layout).

The probabilities are recomputed from q, k and the forward lse (``P = exp(s - lse)``), as in
FlashAttention-2. ``DELTA_*`` is ``rowsum(dO * O) - dlse`` per query row (computed by the
caller), so the score gradient is ``dS = P * (dO . v - DELTA)``, which also carries the
gradient that flows into the lse outputs.

* ``hop_dq_kernel``, grid ``(n_fibers * n_query_tiles, B * HQ)``: dq; with SPLIT_DIAG the
  gradient of the diagonal's value (the previous causal stream); with DIAG_LSE the gradient
  of the lse inputs (the diagonal scores).
* ``hop_dkdv_kernel``, grid ``(n_fibers * n_key_tiles, B * HKV)``: dk summed over the ``G_K``
  query heads of a key head, and the value gradient (summed over heads when values belong to
  key heads, the local hop; per query head otherwise).

Gradients are written in float32 (float64 for float64 inputs); with ROPE they are rotated
back from the fiber coordinate to the RoPE position before the store.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rotary import cap_grad, capped, load_rows, store_unrotated


@triton.jit
def _slot_info(b, offs, base_slot, N_J, S_J, L, VALID, POS, HAS_VALID: tl.constexpr, HAS_POS: tl.constexpr):
    """Slots of fiber coordinates ``offs``: (slot, in range, real token, RoPE delta to the coordinate)."""
    slot = base_slot + offs * S_J
    in_range = (offs < N_J) & (slot < L)
    real = in_range
    if HAS_VALID:
        real = in_range & (tl.load(VALID + b * L + slot, mask=in_range, other=0) != 0)
    if HAS_POS:
        pos = tl.load(POS + b * L + slot, mask=in_range, other=0.0)
    else:
        pos = slot.to(tl.float32)
    return slot, in_range, real, offs.to(tl.float32) - pos


@triton.jit
def _rows(base, slots, ok, stride_l, offs_d, D, ACC: tl.constexpr):
    """Plain ``(R, BD)`` row load in the accumulation dtype."""
    return load_rows(base, slots, ok, stride_l, offs_d, D, slots, base, 0, False, ACC).to(ACC)


@triton.jit
def hop_dq_kernel(
    Q, K, VM, VD, LSE_CI, LSE_FI, VALID, POS, FREQ,
    LSE_C, LSE_F, DO_C, DO_F, DELTA_C, DELTA_F,  # forward lse, output grads, row deltas
    DQ, DVD, DLSE_CI, DLSE_FI,  # outputs
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sob, soh, sol,
    L, D, HQ, G_K, G_V, N_J, S_J, N_QT, HALF,
    scale, softcap, bias,
    HAS_VALID: tl.constexpr, HAS_POS: tl.constexpr, ROPE: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT_DIAG: tl.constexpr, HAS_FULL: tl.constexpr, DIAG_LSE: tl.constexpr, WINDOW: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    fib = pid // N_QT
    mt = pid % N_QT
    base_slot = (fib // S_J) * N_J * S_J + fib % S_J
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_m, m_ok, q_ok, delta_m = _slot_info(b, offs_m, base_slot, N_J, S_J, L, VALID, POS, HAS_VALID, HAS_POS)

    b64 = b.to(tl.int64)
    q_base = b64 * sqb + h * sqh
    k_base = b64 * skb + (h // G_K) * skh
    v_base = b64 * svb + (h // G_V) * svh
    o_base = b64 * sob + h * soh
    lse_base = (b64 * HQ + h) * L
    q = load_rows(Q + q_base, slot_m, m_ok, sql, offs_d, D, delta_m, FREQ, HALF, ROPE, ACC).to(ACC)
    do_c = _rows(DO_C + o_base, slot_m, q_ok, sol, offs_d, D, ACC)  # (BM, BD)
    lse_c = tl.load(LSE_C + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
    delta_c = tl.load(DELTA_C + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if DIAG_LSE:
        dlse_ci = tl.zeros([BLOCK_M], dtype=ACC)
        dlse_fi = tl.zeros([BLOCK_M], dtype=ACC)
        lse_ci = tl.load(LSE_CI + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
    if SPLIT_DIAG:  # the diagonal of the causal stream, valued by VD (the previous causal stream)
        k_own = load_rows(K + k_base, slot_m, m_ok, skl, offs_d, D, delta_m, FREQ, HALF, ROPE, ACC).to(ACC)
        if DIAG_LSE:
            s_d = lse_ci
        else:
            s_d = capped(tl.sum(q * k_own, 1) * scale, softcap, SOFTCAP)
        p_d = tl.where(q_ok, tl.exp(s_d - lse_c), 0.0)
        vd = _rows(VD + b64 * sdb + h * sdh, slot_m, q_ok, sdl, offs_d, D, ACC)
        ds_d = p_d * (tl.sum(do_c * vd, 1) - delta_c)
        if DIAG_LSE:
            dlse_ci += ds_d
        else:
            dq += cap_grad(ds_d, s_d, softcap, SOFTCAP)[:, None] * k_own * scale
        dvd = p_d[:, None] * do_c
        mask = m_ok[:, None] & (offs_d[None, :] < D)
        tl.store(DVD + o_base + slot_m.to(tl.int64)[:, None] * sol + offs_d[None, :], dvd, mask=mask)
    if HAS_FULL:
        do_f = _rows(DO_F + o_base, slot_m, q_ok, sol, offs_d, D, ACC)
        lse_f = tl.load(LSE_F + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
        delta_f = tl.load(DELTA_F + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
        if DIAG_LSE:
            lse_fi = tl.load(LSE_FI + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
        hi = N_J
    else:
        hi = tl.minimum(N_J, (mt + 1) * BLOCK_M)

    if WINDOW:  # local hop: the causal stream's keys in the whole previous block
        prev = base_slot - N_J
        for start_n in range(0, N_J, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            slot_n = prev + offs_n
            n_in = (offs_n < N_J) & (slot_n >= 0)
            n_ok = n_in
            if HAS_VALID:
                n_ok = n_in & (tl.load(VALID + b * L + slot_n, mask=n_in, other=0) != 0)
            k = _rows(K + k_base, slot_n, n_in, skl, offs_d, D, ACC)
            vm = _rows(VM + v_base, slot_n, n_in, svl, offs_d, D, ACC)
            s = capped(tl.dot(q, tl.trans(k), input_precision=PREC) * scale, softcap, SOFTCAP)
            p_c = tl.where(q_ok[:, None] & n_ok[None, :], tl.exp(s - lse_c[:, None]), 0.0)
            ds = p_c * (tl.dot(do_c, tl.trans(vm), input_precision=PREC) - delta_c[:, None])
            dq += tl.dot(cap_grad(ds, s, softcap, SOFTCAP), k, input_precision=PREC) * scale

    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        slot_n, n_in, n_ok, delta_n = _slot_info(b, offs_n, base_slot, N_J, S_J, L, VALID, POS, HAS_VALID, HAS_POS)
        k = load_rows(K + k_base, slot_n, n_in, skl, offs_d, D, delta_n, FREQ, HALF, ROPE, ACC).to(ACC)
        vm = _rows(VM + v_base, slot_n, n_in, svl, offs_d, D, ACC)  # (BN, BD)
        s = capped(tl.dot(q, tl.trans(k), input_precision=PREC) * scale, softcap, SOFTCAP)  # (BM, BN)
        sb = s + bias  # the scores the softmax saw (s itself feeds the soft-cap's chain rule)
        ok = q_ok[:, None] & n_ok[None, :]
        is_diag = offs_m[:, None] == offs_n[None, :]
        ds = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        if HAS_FULL:
            s_f = sb
            if DIAG_LSE:
                s_f = tl.where(is_diag, lse_fi[:, None], sb)
            p_f = tl.where(ok, tl.exp(s_f - lse_f[:, None]), 0.0)
            ds_f = p_f * (tl.dot(do_f, tl.trans(vm), input_precision=PREC) - delta_f[:, None])
            if DIAG_LSE:
                dlse_fi += tl.sum(tl.where(is_diag, ds_f, 0.0), 1)
                ds_f = tl.where(is_diag, 0.0, ds_f)
            ds += ds_f
        if SPLIT_DIAG:
            c_ok = ok & (offs_n[None, :] < offs_m[:, None])
            s_c = sb
        else:
            c_ok = ok & (offs_n[None, :] <= offs_m[:, None])
            s_c = sb
            if DIAG_LSE:
                s_c = tl.where(is_diag, lse_ci[:, None], sb)
        p_c = tl.where(c_ok, tl.exp(s_c - lse_c[:, None]), 0.0)
        ds_c = p_c * (tl.dot(do_c, tl.trans(vm), input_precision=PREC) - delta_c[:, None])
        if DIAG_LSE and not SPLIT_DIAG:
            dlse_ci += tl.sum(tl.where(is_diag, ds_c, 0.0), 1)
            ds_c = tl.where(is_diag, 0.0, ds_c)
        ds += ds_c
        ds = cap_grad(ds, s, softcap, SOFTCAP)
        dq += tl.dot(ds, k, input_precision=PREC) * scale

    store_unrotated(DQ + o_base, slot_m, m_ok, sol, offs_d, D, dq, delta_m, FREQ, HALF, ROPE)
    if DIAG_LSE:
        tl.store(DLSE_CI + lse_base + slot_m, dlse_ci, mask=m_ok)
        if HAS_FULL:
            tl.store(DLSE_FI + lse_base + slot_m, dlse_fi, mask=m_ok)


@triton.jit
def hop_dkdv_kernel(
    Q, K, VM, VD, LSE_CI, LSE_FI, VALID, POS, FREQ,
    LSE_C, LSE_F, DO_C, DO_F, DELTA_C, DELTA_F,
    DK, DVM,  # outputs: dk (B, HKV, L, D); dvm like VM
    sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl, sob, soh, sol,
    sgkb, sgkh, sgkl, sgvb, sgvh, sgvl,  # strides of DK and DVM
    L, D, HQ, HKV, G_K, G_V, N_J, S_J, N_KT, HALF,
    scale, softcap, bias,
    HAS_VALID: tl.constexpr, HAS_POS: tl.constexpr, ROPE: tl.constexpr, SOFTCAP: tl.constexpr,
    SPLIT_DIAG: tl.constexpr, HAS_FULL: tl.constexpr, DIAG_LSE: tl.constexpr, WINDOW: tl.constexpr,
    VALS_PER_QHEAD: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    fib = pid // N_KT
    nt = pid % N_KT
    base_slot = (fib // S_J) * N_J * S_J + fib % S_J
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    slot_n, n_in, n_ok, delta_n = _slot_info(b, offs_n, base_slot, N_J, S_J, L, VALID, POS, HAS_VALID, HAS_POS)
    b64 = b.to(tl.int64)
    k = load_rows(K + b64 * skb + kvh * skh, slot_n, n_in, skl, offs_d, D, delta_n, FREQ, HALF, ROPE, ACC).to(ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    if not VALS_PER_QHEAD:  # the local hop: one value head per key head, shared by the G_K query heads
        vm = _rows(VM + b64 * svb + kvh * svh, slot_n, n_in, svl, offs_d, D, ACC)
    if HAS_FULL:
        lo = 0
    else:  # causal only: queries from the key tile's first row on
        lo = (nt * BLOCK_N // BLOCK_M) * BLOCK_M

    for hh in range(0, G_K):
        h = kvh * G_K + hh
        q_base = b64 * sqb + h * sqh
        o_base = b64 * sob + h * soh
        lse_base = (b64 * HQ + h) * L
        if VALS_PER_QHEAD:
            vm = _rows(VM + b64 * svb + h * svh, slot_n, n_in, svl, offs_d, D, ACC)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        for start_m in range(lo, N_J, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            slot_m, m_in, q_ok, delta_m = _slot_info(b, offs_m, base_slot, N_J, S_J, L, VALID, POS, HAS_VALID, HAS_POS)
            q = load_rows(Q + q_base, slot_m, m_in, sql, offs_d, D, delta_m, FREQ, HALF, ROPE, ACC).to(ACC)
            s = capped(tl.dot(k, tl.trans(q), input_precision=PREC) * scale, softcap, SOFTCAP)  # (BN, BM)
            sb = s + bias
            ok = n_ok[:, None] & q_ok[None, :]
            is_diag = offs_n[:, None] == offs_m[None, :]
            ds = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
            if DIAG_LSE:
                lse_ci = tl.load(LSE_CI + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
            if HAS_FULL:
                do_f = _rows(DO_F + o_base, slot_m, q_ok, sol, offs_d, D, ACC)  # (BM, BD)
                lse_f = tl.load(LSE_F + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
                delta_f = tl.load(DELTA_F + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
                s_f = sb
                if DIAG_LSE:
                    lse_fi = tl.load(LSE_FI + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
                    s_f = tl.where(is_diag, lse_fi[None, :], sb)
                p_f = tl.where(ok, tl.exp(s_f - lse_f[None, :]), 0.0)
                dv += tl.dot(p_f, do_f, input_precision=PREC)
                ds_f = p_f * (tl.dot(vm, tl.trans(do_f), input_precision=PREC) - delta_f[None, :])
                if DIAG_LSE:
                    ds_f = tl.where(is_diag, 0.0, ds_f)
                ds += ds_f
            do_c = _rows(DO_C + o_base, slot_m, q_ok, sol, offs_d, D, ACC)
            lse_c = tl.load(LSE_C + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
            delta_c = tl.load(DELTA_C + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
            if SPLIT_DIAG:
                c_ok = ok & (offs_n[:, None] < offs_m[None, :])
                s_c = sb
            else:
                c_ok = ok & (offs_n[:, None] <= offs_m[None, :])
                s_c = sb
                if DIAG_LSE:
                    s_c = tl.where(is_diag, lse_ci[None, :], sb)
            p_c = tl.where(c_ok, tl.exp(s_c - lse_c[None, :]), 0.0)
            dv += tl.dot(p_c, do_c, input_precision=PREC)
            ds_c = p_c * (tl.dot(vm, tl.trans(do_c), input_precision=PREC) - delta_c[None, :])
            if DIAG_LSE and not SPLIT_DIAG:
                ds_c = tl.where(is_diag, 0.0, ds_c)
            ds += ds_c
            ds = cap_grad(ds, s, softcap, SOFTCAP)
            dk += tl.dot(ds, q, input_precision=PREC) * scale
        if WINDOW:  # local hop: every query of the next block sees this key in its causal stream
            nxt = base_slot + N_J
            for start_m in range(0, N_J, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                slot_m, m_in, q_ok, delta_m = _slot_info(b, offs_m, nxt, N_J, 1, L, VALID, POS, HAS_VALID, HAS_POS)
                q = _rows(Q + q_base, slot_m, m_in, sql, offs_d, D, ACC)
                s = capped(tl.dot(k, tl.trans(q), input_precision=PREC) * scale, softcap, SOFTCAP)  # (BN, BM)
                do_c = _rows(DO_C + o_base, slot_m, q_ok, sol, offs_d, D, ACC)
                lse_c = tl.load(LSE_C + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
                delta_c = tl.load(DELTA_C + lse_base + slot_m, mask=q_ok, other=0.0).to(ACC)
                p_c = tl.where(n_ok[:, None] & q_ok[None, :], tl.exp(s - lse_c[None, :]), 0.0)
                dv += tl.dot(p_c, do_c, input_precision=PREC)
                ds = p_c * (tl.dot(vm, tl.trans(do_c), input_precision=PREC) - delta_c[None, :])
                dk += tl.dot(cap_grad(ds, s, softcap, SOFTCAP), q, input_precision=PREC) * scale
        if SPLIT_DIAG and not DIAG_LSE:  # the causal stream's diagonal: query at this key's own slot
            q_n = load_rows(Q + q_base, slot_n, n_in, sql, offs_d, D, delta_n, FREQ, HALF, ROPE, ACC).to(ACC)
            s_d = capped(tl.sum(q_n * k, 1) * scale, softcap, SOFTCAP)
            lse_cn = tl.load(LSE_C + lse_base + slot_n, mask=n_ok, other=0.0).to(ACC)
            delta_cn = tl.load(DELTA_C + lse_base + slot_n, mask=n_ok, other=0.0).to(ACC)
            p_d = tl.where(n_ok, tl.exp(s_d - lse_cn), 0.0)
            do_cn = _rows(DO_C + o_base, slot_n, n_ok, sol, offs_d, D, ACC)
            vd_n = _rows(VD + b64 * sdb + h * sdh, slot_n, n_ok, sdl, offs_d, D, ACC)
            ds_d = cap_grad(p_d * (tl.sum(do_cn * vd_n, 1) - delta_cn), s_d, softcap, SOFTCAP)
            dk += ds_d[:, None] * q_n * scale
        if VALS_PER_QHEAD:
            mask = n_in[:, None] & (offs_d[None, :] < D)
            dv_ptrs = DVM + b64 * sgvb + h * sgvh + slot_n.to(tl.int64)[:, None] * sgvl + offs_d[None, :]
            tl.store(dv_ptrs, dv, mask=mask)

    if not VALS_PER_QHEAD:
        mask = n_in[:, None] & (offs_d[None, :] < D)
        dv_ptrs = DVM + b64 * sgvb + kvh * sgvh + slot_n.to(tl.int64)[:, None] * sgvl + offs_d[None, :]
        tl.store(dv_ptrs, dv, mask=mask)
    store_unrotated(DK + b64 * sgkb + kvh * sgkh, slot_n, n_in, sgkl, offs_d, D, dk, delta_n, FREQ, HALF, ROPE)
