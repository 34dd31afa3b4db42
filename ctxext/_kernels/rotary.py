"""Triton helpers shared by the hop kernels: strided row loads with fused RoPE re-rotation, soft-capping.

RoPE uses transformers' rotate-half layout: dims ``(d, d + r/2)`` form a pair rotated by
``delta * inv_freq[d]`` (``r = 2 * HALF`` rotary dims; dims ``>= r`` are left alone). A tile is
rotated by loading it twice, once at its own columns and once at the partner columns, so no
column shuffle of registers is ever needed.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rotation(offs_d, delta, FREQ, HALF, DT: tl.constexpr):
    """cos, signed sin and partner column of a rotation by ``delta`` positions.

    offs_d: ``(BD,)`` columns; delta: ``(R,)`` float positions. Returns ``cos (R, BD)``,
    ``sin (R, BD)`` (already carrying the rotate-half sign, zero past the rotary dims) and
    ``partner (BD,)`` (the column each column pairs with; itself past the rotary dims); angles
    are computed in DT (float32, or float64 for float64 inputs).
    """
    rot = offs_d < 2 * HALF
    first = offs_d < HALF
    partner = tl.where(first, offs_d + HALF, offs_d - HALF)
    partner = tl.where(rot, partner, offs_d)
    fidx = tl.where(first, offs_d, offs_d - HALF)
    freq = tl.load(FREQ + fidx, mask=rot, other=0.0).to(DT)
    ang = delta.to(DT)[:, None] * freq[None, :]  # (R, BD); 0 past the rotary dims
    sign = tl.where(first, -1.0, 1.0)
    sign = tl.where(rot, sign, 0.0)
    return tl.cos(ang), tl.sin(ang) * sign[None, :], partner


@triton.jit
def load_rows(
    base,
    slots,
    row_ok,
    stride_l,
    offs_d,
    D,
    delta,
    FREQ,
    HALF,
    ROPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """Load rows ``slots`` of one ``(L, D)`` head (last dim contiguous), re-rotated when ROPE.

    base: pointer to element ``[b, h, 0, 0]``; slots, row_ok, delta: ``(R,)``.
    Returns ``(R, BD)``: the raw dtype without ROPE, OUT_DTYPE (float32/float64) with it;
    masked rows and columns ``>= D`` are zero.
    """
    rows = slots.to(tl.int64)[:, None] * stride_l
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    x = tl.load(base + rows + offs_d[None, :], mask=mask, other=0.0)
    if ROPE:
        cos, sin, partner = rotation(offs_d, delta, FREQ, HALF, OUT_DTYPE)
        xp = tl.load(base + rows + partner[None, :], mask=mask, other=0.0).to(OUT_DTYPE)
        x = x.to(OUT_DTYPE) * cos + xp * sin
    return x


@triton.jit
def store_unrotated(base, slots, row_ok, stride_l, offs_d, D, x, delta, FREQ, HALF, ROPE: tl.constexpr):
    """Store a gradient computed in the rotated frame, rotated back by ``-delta`` when ROPE.

    The rotation needs the partner columns of a register tile: the tile goes to its
    destination, the program synchronises, reads the partner columns back and overwrites.
    base: float32/float64 destination ``[b, h, 0, 0]`` owned by this program; x: ``(R, BD)``.
    """
    rows = slots.to(tl.int64)[:, None] * stride_l
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    ptrs = base + rows + offs_d[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)
    if ROPE:
        cos, sin, partner = rotation(offs_d, delta, FREQ, HALF, x.dtype)
        tl.debug_barrier()
        xp = tl.load(base + rows + partner[None, :], mask=mask, other=0.0)
        tl.debug_barrier()
        # inverse rotation: the same formula with the sine negated
        out = x * cos - xp.to(x.dtype) * sin
        tl.store(ptrs, out.to(base.dtype.element_ty), mask=mask)


@triton.jit
def tanh(x):
    """tanh without overflow: ``sign(x) * (1 - e) / (1 + e)`` with ``e = exp(-2|x|)``."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def capped(s, softcap, SOFTCAP: tl.constexpr):
    """``softcap * tanh(s / softcap)`` when SOFTCAP, else ``s``."""
    if SOFTCAP:
        s = softcap * tanh(s / softcap)
    return s


@triton.jit
def cap_grad(ds, s_capped, softcap, SOFTCAP: tl.constexpr):
    """Chain rule through the soft-cap: ``d/ds_raw = 1 - tanh^2`` with ``tanh = s_capped / softcap``."""
    if SOFTCAP:
        t = s_capped / softcap
        ds = ds * (1.0 - t * t)
    return ds
