"""Tensorized attention on the fused Triton kernels: custom ops, autograd, the chain of hops.

Layers (STYLE.md): raw kernels (``ctxext/_kernels``) -> ``torch.library.custom_op``
``ctxext::ta_hop`` / ``ctxext::ta_hop_backward`` (with fake implementations, so
``torch.compile`` can trace) -> ``torch.library.register_autograd`` -> the chain of hops in
:func:`triton_tensorized_attention` (same signature and result as the torch backend).

One launch per hop (three in the backward of a hop: a cheap ``rowsum(dO * O)`` in PyTorch,
then the dq and dk/dv kernels). The local hop reads q, k, v; every outer hop reads q, k and
the previous streams; in ``complete`` mode both streams of a hop come from one read.
Streams between hops are float32 (float64 for float64 inputs); the result is cast to q's dtype.

Supported by the kernels: both causal modes, rope ``absolute`` and ``axis`` (re-rotation fused),
``merge`` ``score``, ``lse`` and ``mass``, ``local`` ``block`` and ``window``, ``long_range`` on
and off, GQA by index, padding (``valid``), any length, softcap, head dims up to 256,
float16/bfloat16/float32 (float64 too, meant for tests). Sinks and retrieved far blocks
(``sinks``, ``retrieve``) are side streams merged into the local hop's streams
(:mod:`ctxext.attention.side_streams`; retrieval on its own kernel, ``ctxext::ta_retrieve``);
the hops then run one ``ta_hop`` op each. ``summary`` other than ``token`` runs on the torch
backend (see :func:`unsupported_reason`).

Deliberately without ``from __future__ import annotations``: ``custom_op`` reads the annotations.
"""

import math
import warnings

import torch

from .layout import compact_axes
from .options import TensorizedOptions

Tensor = torch.Tensor
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256  # ctxext._kernels.launch.MAX_HEAD_DIM (kept here so this check needs no triton)


def unsupported_reason(
    options: TensorizedOptions, dtype: torch.dtype, head_dim: int, device: torch.device
) -> str | None:
    """Why the kernels cannot run these settings (None when they can). Needs no triton."""
    if options.summary != "token":
        return f"summary={options.summary!r} is not fused into the kernels yet"
    if options.merge not in ("score", "lse", "mass"):
        return f"merge={options.merge!r} is not implemented in the kernels"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not supported by the kernels (float16, bfloat16, float32)"
    if dtype == torch.float64 and device.type == "cuda":
        return "float64 inputs on CUDA are left to the PyTorch backend (the kernels are built for 16/32-bit)"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} is above the kernels' limit of {MAX_HEAD_DIM}"
    return None


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------


def _spec(n_j, s_j, split_diag, has_full, diag_lse, rope, scale, softcap, bias, window):
    from ctxext._kernels import HopSpec

    return HopSpec(n_j, s_j, split_diag, has_full, diag_lse, rope, scale, softcap, bias, window)


@torch.library.custom_op("ctxext::ta_hop", mutates_args=())
def ta_hop(
    q: Tensor,
    k: Tensor,
    vm: Tensor,
    vd: Tensor | None,
    lse_ci: Tensor | None,
    lse_fi: Tensor | None,
    valid: Tensor | None,
    positions: Tensor | None,
    inv_freq: Tensor | None,
    n_j: int,
    s_j: int,
    split_diag: bool,
    has_full: bool,
    diag_lse: bool,
    rope: bool,
    scale: float,
    softcap: float,
    bias: float,
    window: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One hop on every fiber of an axis of size ``n_j`` and stride ``s_j``.

    q: ``(B, Hq, L, D)``; k: ``(B, Hkv, L, D)``; vm: main values ``(B, Hv, L, D)`` (v for the
    local hop, the previous full stream in ``complete`` outer hops, the previous causal stream
    in ``dominance``); vd: diagonal values ``(B, Hq, L, D)`` (``split_diag``); lse_ci / lse_fi:
    ``(B, Hq, L)`` diagonal scores (``diag_lse``); valid: ``(B, L)`` bool; positions: ``(B, L)``;
    inv_freq: ``(r/2,)`` (``rope``). softcap 0 means none; bias is added to every score but the
    diagonal (``log(s_j)`` for ``merge="mass"``); window (local hop, ``local="window"``): the causal
    stream also sees the whole previous block.
    Returns ``(C, lse_C, F, lse_F)``: ``(B, Hq, L, D)`` / ``(B, Hq, L)`` float32 (float64 for
    float64 q); F and lse_F are empty tensors without ``has_full``.
    """
    from ctxext._kernels import hop_forward

    spec = _spec(n_j, s_j, split_diag, has_full, diag_lse, rope, scale, softcap, bias, window)
    return hop_forward(q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, spec)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@ta_hop.register_fake
def _(q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, n_j, s_j, split_diag, has_full, diag_lse, rope,
      scale, softcap, bias, window):  # fmt: skip
    b, hq, length, d = q.shape
    acc = _acc(q.dtype)
    c = q.new_empty(b, hq, length, d, dtype=acc)
    lse = q.new_empty(b, hq, length, dtype=acc)
    if has_full:
        return c, lse, torch.empty_like(c), torch.empty_like(lse)
    return c, lse, c.new_empty(0), lse.new_empty(0)


@torch.library.custom_op("ctxext::ta_hop_backward", mutates_args=())
def ta_hop_backward(
    q: Tensor,
    k: Tensor,
    vm: Tensor,
    vd: Tensor | None,
    lse_ci: Tensor | None,
    lse_fi: Tensor | None,
    valid: Tensor | None,
    positions: Tensor | None,
    inv_freq: Tensor | None,
    c_out: Tensor,
    lse_c: Tensor,
    f_out: Tensor,
    lse_f: Tensor,
    dc: Tensor,
    dlse_c: Tensor,
    df: Tensor,
    dlse_f: Tensor,
    n_j: int,
    s_j: int,
    split_diag: bool,
    has_full: bool,
    diag_lse: bool,
    rope: bool,
    scale: float,
    softcap: float,
    bias: float,
    window: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`ta_hop`: ``(dq, dk, dvm, dvd, dlse_ci, dlse_fi)`` in the accumulation
    dtype, same shapes as the inputs; the ones without a matching input are empty tensors."""
    from ctxext._kernels import hop_backward

    spec = _spec(n_j, s_j, split_diag, has_full, diag_lse, rope, scale, softcap, bias, window)
    grads = hop_backward(
        q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, c_out, lse_c, f_out, lse_f,
        dc, dlse_c, df if has_full else None, dlse_f if has_full else None, spec,
    )  # fmt: skip
    acc = _acc(q.dtype)
    return tuple(g if g is not None else q.new_empty(0, dtype=acc) for g in grads)  # never aliased


@ta_hop_backward.register_fake
def _(q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, c_out, lse_c, f_out, lse_f, dc, dlse_c, df,
      dlse_f, n_j, s_j, split_diag, has_full, diag_lse, rope, scale, softcap, bias, window):  # fmt: skip
    acc = _acc(q.dtype)
    lse_shape = q.shape[:3]
    return (
        torch.empty_like(q, dtype=acc),
        torch.empty_like(k, dtype=acc),
        torch.empty_like(vm, dtype=acc),
        torch.empty_like(q, dtype=acc) if split_diag else q.new_empty(0, dtype=acc),
        q.new_empty(lse_shape, dtype=acc) if diag_lse else q.new_empty(0, dtype=acc),
        q.new_empty(lse_shape, dtype=acc) if diag_lse and has_full else q.new_empty(0, dtype=acc),
    )


_STATIC = ("n_j", "s_j", "split_diag", "has_full", "diag_lse", "rope", "scale", "softcap", "bias", "window")


def _setup_context(ctx, inputs, output):
    q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, *static = inputs
    c_out, lse_c, f_out, lse_f = output
    ctx.static = dict(zip(_STATIC, static))
    ctx.dtypes = (q.dtype, k.dtype, vm.dtype, vd.dtype if vd is not None else None)
    ctx.save_for_backward(q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, c_out, lse_c, f_out, lse_f)


def _backward(ctx, dc, dlse_c, df, dlse_f):
    q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, c_out, lse_c, f_out, lse_f = ctx.saved_tensors
    zeros = torch.zeros_like
    dc = dc if dc is not None else zeros(c_out)
    dlse_c = dlse_c if dlse_c is not None else zeros(lse_c)
    df = df if df is not None else zeros(f_out)
    dlse_f = dlse_f if dlse_f is not None else zeros(lse_f)
    dq, dk, dvm, dvd, dlse_ci, dlse_fi = ta_hop_backward(
        q, k, vm, vd, lse_ci, lse_fi, valid, positions, inv_freq, c_out, lse_c, f_out, lse_f,
        dc, dlse_c, df, dlse_f, **ctx.static,
    )  # fmt: skip
    q_dt, k_dt, vm_dt, vd_dt = ctx.dtypes
    return (
        dq.to(q_dt),
        dk.to(k_dt),
        dvm.to(vm_dt),
        dvd.to(vd_dt) if vd is not None else None,
        dlse_ci if lse_ci is not None else None,
        dlse_fi if lse_fi is not None and dlse_fi.numel() else None,
        None,  # valid
        None,  # positions
        None,  # inv_freq
        *([None] * len(_STATIC)),
    )


ta_hop.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# the chain of hops
# ---------------------------------------------------------------------------------------------

_disabled: list[str] = []  # set once when the kernels fail to build on this machine


def kernels_disabled() -> str | None:
    """The error that made the kernels unusable in this process (None while they work)."""
    return _disabled[0] if _disabled else None


def triton_tensorized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    options: TensorizedOptions,
    *,
    valid: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    inv_freq: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tensorized attention on slots with the fused kernels; arguments and result as the torch backend.

    q: ``(B, Hq, L, D)``; k, v: ``(B, Hkv, L, D)`` (never repeated); valid: ``(B, L)`` or None;
    positions: ``(B, L)`` RoPE positions of the slots (None: ``arange(L)``); inv_freq: ``(r/2,)``
    for ``rope="axis"``. Returns ``(B, Hq, L, D)`` in q's dtype; padding slots get zeros.
    If the kernels fail to compile on this machine (compiler error, not enough shared memory),
    warns once and runs the torch backend from then on.
    """
    opts = options
    reason = unsupported_reason(opts, q.dtype, q.shape[-1], q.device)
    if reason is not None:
        raise ValueError(f"the Triton backend cannot run these settings: {reason}; use backend='torch'")
    if opts.rope == "axis" and inv_freq is None:
        raise ValueError("rope='axis' needs the model's RoPE inverse frequencies (inv_freq)")
    if not _disabled:
        try:
            return _run_hops(q, k, v, opts, valid, scaling, softcap, inv_freq, positions)
        except Exception as err:  # noqa: BLE001 - only build failures are swallowed, see below
            if not _is_build_failure(err):
                raise
            _disabled.append(f"{type(err).__name__}: {err}")
            warnings.warn(
                "ctxext: the tensorized-attention Triton kernels failed to build on this machine "
                f"({_disabled[0][:500]}); using the PyTorch backend for the rest of this process. Please report "
                "this with your GPU, triton and torch versions.",
                stacklevel=2,
            )
    from .torch_backend import torch_tensorized_attention

    return torch_tensorized_attention(
        q, k, v, opts, valid=valid, scaling=scaling, softcap=softcap, inv_freq=inv_freq, positions=positions
    )


def _is_build_failure(err: Exception) -> bool:
    """Compiler errors and resource limits (shared memory, registers), not numerical or shape bugs."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - layout of older triton releases
        return False
    return isinstance(err, (CompilationError, OutOfResources))


def _hop_plan(length: int, d: int, opts: TensorizedOptions, scaling, softcap) -> list[dict]:
    """The hops to run, local first: the static arguments of each ``ta_hop`` call."""
    scale = d**-0.5 if scaling is None else float(scaling)
    cap = float(softcap) if softcap else 0.0
    axes = compact_axes(length, opts.block_sizes)
    complete = opts.causal == "complete"
    long_range = opts.long_range and len(axes) > 1
    lse_merge = opts.merge in ("lse", "mass")  # the diagonal is scored by the lower hop's lse
    rope = opts.rope == "axis"
    common = dict(scale=scale, softcap=cap)
    plan = [  # local hop: blocks of n_m consecutive slots, values v (read by key head)
        dict(n_j=axes[-1], s_j=1, split_diag=False, has_full=complete and long_range, diag_lse=False, rope=False,
             bias=0.0, window=opts.local == "window", **common)
    ]  # fmt: skip
    for j in range(len(axes) - 2, -1, -1) if long_range else ():
        s_j = math.prod(axes[j + 1 :])
        plan.append(
            dict(
                n_j=axes[j], s_j=s_j,
                split_diag=complete,  # complete: earlier elements valued by F, the diagonal by C
                has_full=complete and j > 0,  # the last hop needs only the causal stream
                diag_lse=lse_merge, rope=rope,
                bias=math.log(s_j) if opts.merge == "mass" else 0.0,  # each entry summarises s_j slots
                window=False, **common,
            )
        )  # fmt: skip
    return plan


def _hop_inputs(hop: dict, v, streams):
    """(vm, vd, lse_ci, lse_fi) of a hop from the previous hop's (C, lse_C, F, lse_F) (None: local hop)."""
    if streams is None:
        return v, None, None, None
    C, lse_C, F, lse_F = streams
    lse_ci = lse_C if hop["diag_lse"] else None
    if hop["split_diag"]:
        return F, C, lse_ci, lse_F if hop["diag_lse"] and hop["has_full"] else None
    return C, None, lse_ci, None


class _TensorizedChain(torch.autograd.Function):
    """Every hop in order; the backward walks them back, summing dq and dk over hops in float32
    (one rounding to q's dtype at the end, as the torch backend does)."""

    @staticmethod
    def forward(ctx, q, k, v, valid, positions, inv_freq, plan):
        streams, saved = None, []
        for hop in plan:
            vm, vd, lse_ci, lse_fi = _hop_inputs(hop, v, streams)
            pos, freq = (positions, inv_freq) if hop["rope"] else (None, None)  # only the re-rotation reads them
            out = ta_hop(q, k, vm, vd, lse_ci, lse_fi, valid, pos, freq, *(hop[key] for key in _STATIC))
            saved += [vm, vd, lse_ci, lse_fi, *out]
            streams = out
        ctx.plan, ctx.v_dtype = plan, v.dtype
        ctx.save_for_backward(q, k, valid, positions, inv_freq, *saved)
        return streams[0].to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, valid, positions, inv_freq, *saved = ctx.saved_tensors
        acc = _acc(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        grads = [dout.to(acc), None, None, None]  # d(C, lse_C, F, lse_F) of the hop being walked back
        dv = None
        for h in range(len(ctx.plan) - 1, -1, -1):
            hop = ctx.plan[h]
            vm, vd, lse_ci, lse_fi, c_out, lse_c, f_out, lse_f = saved[8 * h : 8 * h + 8]
            outputs = saved[8 * h + 4 : 8 * h + 8]
            dc, dlse_c, df, dlse_f = (g if g is not None else torch.zeros_like(x) for g, x in zip(grads, outputs))
            pos, freq = (positions, inv_freq) if hop["rope"] else (None, None)
            dq_h, dk_h, dvm, dvd, dlse_ci, dlse_fi = ta_hop_backward(
                q, k, vm, vd, lse_ci, lse_fi, valid, pos, freq, c_out, lse_c, f_out, lse_f,
                dc, dlse_c, df, dlse_f, *(hop[key] for key in _STATIC),
            )  # fmt: skip
            dq += dq_h
            dk += dk_h
            if h == 0:
                dv = dvm  # the local hop's values are v
                break
            prev = ctx.plan[h - 1]
            if hop["split_diag"]:  # vm = previous F, vd = previous C
                grads = [dvd, dlse_ci if lse_ci is not None else None, dvm, dlse_fi if lse_fi is not None else None]
            else:  # vm = previous C
                grads = [dvm, dlse_ci if lse_ci is not None else None, None, None]
            if not prev["has_full"]:
                grads[2] = grads[3] = None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(ctx.v_dtype), None, None, None, None


def _run_hops(q, k, v, opts: TensorizedOptions, valid, scaling, softcap, inv_freq, positions) -> torch.Tensor:
    """The local hop, then the outer hops from axis m-1 to axis 1: one ``ta_hop`` launch each."""
    plan = _hop_plan(q.shape[-2], q.shape[-1], opts, scaling, softcap)
    axes = compact_axes(q.shape[-2], opts.block_sizes)
    retrieve = bool(opts.retrieve) and len(axes) > 1  # as the torch backend: no far block with one axis
    if opts.sinks > 0 or retrieve:
        return _run_with_side_streams(q, k, v, opts, valid, softcap, inv_freq, positions, plan, axes[-1], retrieve)
    return _TensorizedChain.apply(q, k, v, valid, positions, inv_freq, plan)


def _run_with_side_streams(q, k, v, opts: TensorizedOptions, valid, softcap, inv_freq, positions, plan, n, retrieve):
    """The chain with sinks and retrieved far blocks merged into the local hop's streams.

    Each hop is one ``ta_hop`` op (its own autograd); the side streams and the merges are PyTorch
    (retrieval on ``ctxext::ta_retrieve``), in the streams' float32. Returns ``(B, Hq, L, D)``.
    """
    from ctxext._kernels.launch import dot_precision

    from .retrieve import far_logit_bias, merge_far, merge_streams
    from .side_streams import block_start, local_range_start, retrieved_stream, sink_stream

    b, _, length, _ = q.shape
    local = plan[0]
    C, lse_C, Fs, lse_F = ta_hop(q, k, v, None, None, None, valid, None, None, *(local[key] for key in _STATIC))
    acc = C.dtype
    ok = valid if valid is not None else torch.ones(b, length, dtype=torch.bool, device=q.device)
    if valid is not None:  # padding queries: a finite lse (their outputs are zeroed at the end)
        lse_C = lse_C.masked_fill(~valid[:, None, :], 0.0)
        if local["has_full"]:
            lse_F = lse_F.masked_fill(~valid[:, None, :], 0.0)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    pos = positions.to(acc) if positions is not None else torch.arange(length, device=q.device, dtype=acc)[None]
    pos = pos.expand(b, length)
    slots = torch.arange(length, device=q.device)
    side = (ka, va, ok, pos)
    scale, cap = local["scale"], local["softcap"] or None
    if opts.sinks > 0:
        start = local_range_start(slots, n, opts.local == "window")
        C, lse_C = merge_streams(C, lse_C, *sink_stream(qa, *side, start, opts, scale, cap, inv_freq))
        if local["has_full"]:
            sinks_f = sink_stream(qa, *side, block_start(slots, n), opts, scale, cap, inv_freq)
            Fs, lse_F = merge_streams(Fs, lse_F, *sinks_f)
    if retrieve:
        prec = dot_precision(q.dtype)
        retrieved = retrieved_stream(qa, ka, va, ok, pos, opts, n, scale, cap, inv_freq, fused=True, precision=prec)
        far, lse_far = retrieved
        C, lse_C = merge_far(C, lse_C, far, lse_far, far_logit_bias(opts, slots))  # far logits lowered by the bias
    streams = (C, lse_C, Fs, lse_F)
    for hop in plan[1:]:
        vm, vd, lse_ci, lse_fi = _hop_inputs(hop, v, streams)
        pos_h, freq = (positions, inv_freq) if hop["rope"] else (None, None)
        streams = ta_hop(q, k, vm, vd, lse_ci, lse_fi, valid, pos_h, freq, *(hop[key] for key in _STATIC))
    out = streams[0]
    if valid is not None:
        out = out * valid[:, None, :, None].to(out.dtype)
    return out.to(q.dtype)
