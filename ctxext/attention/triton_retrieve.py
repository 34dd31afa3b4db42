"""The fused retrieval kernels as custom ops: ``ctxext::ta_retrieve`` (with autograd) and ``ctxext::ta_choose``.

Layers as in :mod:`ctxext.attention.triton_backend`: raw kernels (``ctxext/_kernels/retrieve.py``,
``ctxext/_kernels/choose.py``) -> ``torch.library.custom_op`` (with fake implementations, so
``torch.compile`` can trace) -> ``register_autograd``. The choice of blocks (``index``, made by
``ta_choose``) is an input without gradient.

Deliberately without ``from __future__ import annotations``: ``custom_op`` reads the annotations.
"""

import torch

from .triton_backend import _acc  # the accumulation dtype of the hop ops, shared

Tensor = torch.Tensor


@torch.library.custom_op("ctxext::ta_retrieve", mutates_args=())
def ta_retrieve(
    q: Tensor, k: Tensor, v: Tensor, index: Tensor, key_ok: Tensor, m: int, scale: float, softcap: float
) -> tuple[Tensor, Tensor]:
    """Each query over the far blocks it chose.

    q: ``(B, Hq, L, D)`` and k, v: ``(B, Hkv, L, D)`` in the selection frame, unscaled; index:
    ``(B, Hq, L, k)`` int32 block numbers (``-1``: none), blocks of ``m`` slots; key_ok:
    ``(B, L)`` bool; softcap 0 means none. Returns the output ``(B, Hq, L, D)`` and its
    log-sum-exp ``(B, Hq, L)`` in float32 (float64 for float64 q); ``-inf`` for no key.
    """
    from ctxext._kernels.retrieve import retrieve_forward

    return retrieve_forward(q, k, v, index, key_ok, m, scale, softcap)


@ta_retrieve.register_fake
def _(q, k, v, index, key_ok, m, scale, softcap):
    acc = _acc(q.dtype)
    return q.new_empty(q.shape, dtype=acc), q.new_empty(q.shape[:3], dtype=acc)


@torch.library.custom_op("ctxext::ta_retrieve_backward", mutates_args=())
def ta_retrieve_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    index: Tensor,
    key_ok: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    dlse: Tensor,
    m: int,
    scale: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`ta_retrieve`: ``(dq, dk, dv)`` in the accumulation dtype."""
    from ctxext._kernels.retrieve import retrieve_backward

    return retrieve_backward(q, k, v, index, key_ok, out, lse, dout, dlse, m, scale, softcap)


@ta_retrieve_backward.register_fake
def _(q, k, v, index, key_ok, out, lse, dout, dlse, m, scale, softcap):
    acc = _acc(q.dtype)
    return torch.empty_like(q, dtype=acc), torch.empty_like(k, dtype=acc), torch.empty_like(v, dtype=acc)


def _setup_context(ctx, inputs, output):
    q, k, v, index, key_ok, m, scale, softcap = inputs
    ctx.static = (m, scale, softcap)
    ctx.dtypes = (q.dtype, k.dtype, v.dtype)
    ctx.save_for_backward(q, k, v, index, key_ok, *output)


def _backward(ctx, dout, dlse):
    q, k, v, index, key_ok, out, lse = ctx.saved_tensors
    dout = dout if dout is not None else torch.zeros_like(out)
    dlse = dlse if dlse is not None else torch.zeros_like(lse)
    dq, dk, dv = ta_retrieve_backward(q, k, v, index, key_ok, out, lse, dout, dlse, *ctx.static)
    q_dt, k_dt, v_dt = ctx.dtypes
    return dq.to(q_dt), dk.to(k_dt), dv.to(v_dt), None, None, None, None, None


ta_retrieve.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ctxext::ta_choose", mutates_args=())
def ta_choose(
    qs: Tensor,
    ks: Tensor,
    key_ok: Tensor,
    kmax: Tensor,
    kmin: Tensor,
    sub_keys: Tensor,
    m: int,
    n: int,
    window: bool,
    top: int,
    candidates: int,
    precision: str,
) -> Tensor:
    """Each query's ``top`` far blocks, ``(B, Hq, L, top)`` int32 (``-1``: none): see
    :func:`ctxext._kernels.choose.choose_far_blocks` for the arguments."""
    from ctxext._kernels.choose import choose_far_blocks

    return choose_far_blocks(qs, ks, key_ok, kmax, kmin, sub_keys, m, n, window, top, candidates, precision)


@ta_choose.register_fake
def _(qs, ks, key_ok, kmax, kmin, sub_keys, m, n, window, top, candidates, precision):
    return qs.new_empty((*qs.shape[:3], top), dtype=torch.int32)
