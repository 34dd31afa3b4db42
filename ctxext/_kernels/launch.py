"""Launchers of the hop kernels: tile sizes, grids, buffers. Plain functions on tensors, no autograd.

Every ``(B, H, L, D)`` input is read through its strides (only a non-unit stride of the last
dim forces a copy); streams and lse come back as contiguous ``(B, HQ, L, D)`` / ``(B, HQ, L)``
tensors in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .hop_bwd import hop_dkdv_kernel, hop_dq_kernel
from .hop_fwd import hop_fwd_kernel

MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation / stream dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot``, whose operands are held in float32 (or float64).

    float32 / float64 inputs: ``ieee``. bfloat16: ``tf32``, whose 10 mantissa bits exceed bfloat16's
    7, so the kernels stay within DESIGN.md invariant 8. float16: ``tf32x3``. With ``tf32`` the
    products of float32 intermediates (P, dS) keep no more precision than float16 itself, and on an
    H200 (2026-12-04, ``tests/kernels/test_triton_gpu.py``) four float16 gradient cases came out at
    2.3-4.8x the torch backend's own float16 error, outside the invariant; three tf32 passes give
    float32 accuracy at three times the tensor-core work, for float16 inputs only.
    """
    if dtype in (torch.float32, torch.float64):
        return "ieee"
    return "tf32x3" if dtype == torch.float16 else "tf32"


def _tiles(n_j: int, head_dim: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a fiber of n_j and head dim D.

    Untuned guesses, checked only by compiling for sm_80/sm_90 without a GPU (registers and
    spills from cuobjdump): the backward keeps more tiles live, so it gets smaller ones.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    fiber = max(16, triton.next_power_of_2(n_j))
    if interpreting():  # the interpreter's cost is per element: smallest legal tiles
        return 16, 16, block_d, 1
    warps = 4 if block_d <= 64 else 8
    if backward:
        side = 32 if block_d <= 128 else 16
        return min(fiber, side), min(fiber, side), block_d, warps
    block_m = min(fiber, 64 if block_d <= 128 else 32)
    block_n = min(fiber, 64 if block_d <= 64 else 32 if block_d <= 128 else 16)
    return block_m, block_n, block_d, warps


def _last_dim_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None or x.stride(-1) == 1:
        return x
    return x.contiguous()


class HopSpec:
    """Static description of one hop (shared by forward and backward launches)."""

    def __init__(self, n_j, s_j, split_diag, has_full, diag_lse, rope, scale, softcap, bias=0.0, window=False):
        self.n_j, self.s_j = int(n_j), int(s_j)
        self.split_diag, self.has_full, self.diag_lse, self.rope = split_diag, has_full, diag_lse, rope
        self.scale, self.softcap = float(scale), float(softcap or 0.0)
        self.bias = float(bias)  # added to every non-diagonal score (merge="mass": log(s_j))
        self.window = bool(window)  # local hop with local="window"

    def flags(self, q, valid, positions):
        return dict(
            HAS_VALID=valid is not None,
            HAS_POS=positions is not None,
            ROPE=self.rope,
            SOFTCAP=self.softcap != 0.0,
            SPLIT_DIAG=self.split_diag,
            HAS_FULL=self.has_full,
            DIAG_LSE=self.diag_lse,
            WINDOW=self.window,
            ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
            PREC=dot_precision(q.dtype),
        )


def _common(q, k, vm, vd, valid, positions, inv_freq):
    """Normalise optional inputs to pointers the kernels accept; returns them and the sizes."""
    b, hq, length, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the tensorized-attention kernels support head dims up to {MAX_HEAD_DIM}, got {d}")
    dummy = q
    valid_t = valid.contiguous().view(torch.uint8) if valid is not None else dummy
    acc = acc_dtype(q.dtype)  # positions and frequencies in the accumulation dtype (exact angles for float64)
    pos_t = positions.to(acc).contiguous() if positions is not None else dummy
    freq_t = inv_freq.to(device=q.device, dtype=acc).contiguous() if inv_freq is not None else dummy
    half = inv_freq.numel() if inv_freq is not None else 0
    if 2 * half > d:
        raise ValueError(f"RoPE inverse frequencies cover {2 * half} dims but the head dim is {d}")
    vd_t = vd if vd is not None else vm
    return valid_t, pos_t, freq_t, half, vd_t


def hop_forward(q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, spec: HopSpec):
    """One hop. q: ``(B, HQ, L, D)``; k: ``(B, HKV, L, D)``; vm, vd: values ``(B, HV, L, D)``;
    lse_ci/lse_fi: ``(B, HQ, L)`` or None; valid: ``(B, L)`` bool or None; positions: ``(B, L)``
    or None; inv_freq: ``(r/2,)`` or None.
    Returns ``(C, lse_C, F, lse_F)``; F and lse_F are empty without ``spec.has_full``.
    """
    q, k, vm, vd = (_last_dim_contiguous(x) for x in (q, k, vm, vd))
    b, hq, length, d = q.shape
    valid_t, pos_t, freq_t, half, vd_t = _common(q, k, vm, vd, valid, positions, inv_freq)
    acc = acc_dtype(q.dtype)
    c_out = torch.empty(b, hq, length, d, device=q.device, dtype=acc)
    lse_c = torch.empty(b, hq, length, device=q.device, dtype=acc)
    if spec.has_full:
        f_out, lse_f = torch.empty_like(c_out), torch.empty_like(lse_c)
    else:
        f_out, lse_f = c_out.new_empty(0), lse_c.new_empty(0)
    block_m, block_n, block_d, warps = _tiles(spec.n_j, d)
    n_qt = triton.cdiv(spec.n_j, block_m)
    n_fibers = triton.cdiv(length, spec.n_j * spec.s_j) * spec.s_j
    grid = (n_fibers * n_qt, b * hq)
    hop_fwd_kernel[grid](
        q, k, vm, vd_t,
        lse_ci if lse_ci is not None else lse_c, lse_fi if lse_fi is not None else lse_c,
        valid_t, pos_t, freq_t,
        c_out, lse_c, f_out if spec.has_full else c_out, lse_f if spec.has_full else lse_c,
        *q.stride()[:3], *k.stride()[:3], *vm.stride()[:3], *vd_t.stride()[:3], *c_out.stride()[:3],
        length, d, hq, hq // k.shape[1], hq // vm.shape[1], spec.n_j, spec.s_j, n_qt, half,
        spec.scale, spec.softcap, spec.bias,
        **spec.flags(q, valid, positions),
        UPCAST=interpreting() and q.dtype == torch.bfloat16,  # the interpreter's bf16 tl.dot is wrong
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return c_out, lse_c, f_out, lse_f


def hop_backward(q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, c_out, lse_c, f_out, lse_f,
                 dc, dlse_c, df, dlse_f, spec: HopSpec):  # fmt: skip
    """Gradients of :func:`hop_forward` from the output grads (dlse_* may be None).

    Returns ``(dq, dk, dvm, dvd, dlse_ci, dlse_fi)`` in the accumulation dtype; dvd is None
    without ``split_diag``, dlse_* None without ``diag_lse``.
    """
    q, k, vm, vd = (_last_dim_contiguous(x) for x in (q, k, vm, vd))
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    valid_t, pos_t, freq_t, half, vd_t = _common(q, k, vm, vd, valid, positions, inv_freq)
    acc = acc_dtype(q.dtype)
    dc = dc.to(acc).contiguous()
    delta_c = (dc * c_out).sum(-1)  # (B, HQ, L): rowsum(dO * O)
    if dlse_c is not None:
        delta_c = delta_c - dlse_c.to(acc)
    if spec.has_full:
        df = df.to(acc).contiguous()
        delta_f = (df * f_out).sum(-1)
        if dlse_f is not None:
            delta_f = delta_f - dlse_f.to(acc)
    else:
        df, delta_f = dc, delta_c
    delta_c, delta_f = delta_c.contiguous(), delta_f.contiguous()
    dq = torch.empty(b, hq, length, d, device=q.device, dtype=acc)
    dk = torch.empty(b, hkv, length, d, device=q.device, dtype=acc)
    dvm = torch.empty(vm.shape, device=q.device, dtype=acc)
    dvd = torch.empty(b, hq, length, d, device=q.device, dtype=acc) if spec.split_diag else None
    dlse_ci = torch.zeros(b, hq, length, device=q.device, dtype=acc) if spec.diag_lse else None
    dlse_fi = torch.zeros(b, hq, length, device=q.device, dtype=acc) if spec.diag_lse and spec.has_full else None
    lse_ci_t = lse_ci if lse_ci is not None else lse_c
    lse_fi_t = lse_fi if lse_fi is not None else lse_c
    lse_f_t = lse_f if spec.has_full else lse_c
    block_m, block_n, block_d, warps = _tiles(spec.n_j, d, backward=True)
    n_fibers = triton.cdiv(length, spec.n_j * spec.s_j) * spec.s_j
    flags = spec.flags(q, valid, positions)
    strides = (*q.stride()[:3], *k.stride()[:3], *vm.stride()[:3], *vd_t.stride()[:3], *dq.stride()[:3])
    n_qt = triton.cdiv(spec.n_j, block_m)
    hop_dq_kernel[(n_fibers * n_qt, b * hq)](
        q, k, vm, vd_t, lse_ci_t, lse_fi_t, valid_t, pos_t, freq_t,
        lse_c, lse_f_t, dc, df, delta_c, delta_f,
        dq, dvd if dvd is not None else dq, dlse_ci if dlse_ci is not None else lse_c,
        dlse_fi if dlse_fi is not None else lse_c,
        *strides,
        length, d, hq, hq // hkv, hq // vm.shape[1], spec.n_j, spec.s_j, n_qt, half,
        spec.scale, spec.softcap, spec.bias,
        **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    n_kt = triton.cdiv(spec.n_j, block_n)
    g_v = hq // vm.shape[1]
    if g_v not in (1, hq // hkv):
        raise ValueError(f"values must have one head per query head or per key head; got {vm.shape[1]} heads")
    hop_dkdv_kernel[(n_fibers * n_kt, b * hkv)](
        q, k, vm, vd_t, lse_ci_t, lse_fi_t, valid_t, pos_t, freq_t,
        lse_c, lse_f_t, dc, df, delta_c, delta_f,
        dk, dvm,
        *strides, *dk.stride()[:3], *dvm.stride()[:3],
        length, d, hq, hkv, hq // hkv, g_v, spec.n_j, spec.s_j, n_kt, half,
        spec.scale, spec.softcap, spec.bias,
        **flags, VALS_PER_QHEAD=g_v == 1 and hq != hkv,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return dq, dk, dvm, dvd, dlse_ci, dlse_fi
