"""Tensorized attention, batched PyTorch: every fiber of a hop in one matmul. The CPU path.

Same semantics as ``reference.py`` (tested against it). Grouped-query heads are handled by
stacking the ``g`` query heads of a key-value head as extra query rows, so k and v are
never repeated. Half-precision inputs are computed in float32 and cast back.

Memory per hop is ``O(Hq * N * n_j)`` for the scores (never ``N x N``) plus ``O(N * D)``
for the streams.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import compact_axes, multi_index
from .options import TensorizedOptions
from .rope import rerotate
from .softmax import masked_softmax


def _to_fibers(x: torch.Tensor, n_kv: int, axes: tuple[int, ...], j: int) -> torch.Tensor:
    """``(B, H, Lp, D)`` -> ``(B, Hkv, A, C, g, n_j, D)``: fibers of axis j, g query heads stacked."""
    b, h, _, d = x.shape
    a, n_j, c = math.prod(axes[:j]), axes[j], math.prod(axes[j + 1 :])
    return x.view(b, n_kv, h // n_kv, a, n_j, c, d).permute(0, 1, 3, 5, 2, 4, 6)


def _from_fibers(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_fibers`: ``(B, Hkv, A, C, g, n_j, D)`` -> ``(B, H, Lp, D)``."""
    b, hkv, a, c, g, n_j, d = x.shape
    return x.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hkv * g, a * n_j * c, d)


def _lse_to_fibers(lse: torch.Tensor, n_kv: int, axes: tuple[int, ...], j: int) -> torch.Tensor:
    """``(B, H, Lp)`` -> ``(B, Hkv, A, C, g, n_j)``."""
    return _to_fibers(lse[..., None], n_kv, axes, j)[..., 0]


def _lse_from_fibers(lse: torch.Tensor) -> torch.Tensor:
    return _from_fibers(lse[..., None])[..., 0]


def _softcap(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return softcap * torch.tanh(s / softcap) if softcap else s


def _local_hop(q, k, v, valid, positions, opts: TensorizedOptions, scaling, softcap, inv_freq, n: int):
    """Hop along the innermost axis (blocks of n slots), with window and sinks.

    q: ``(B, Hq, Lp, D)``; k, v: ``(B, Hkv, Lp, D)``; valid, positions: ``(B, Lp)``.
    Returns causal stream and lse, full stream and lse (None for ``dominance`` or when
    there is no outer hop), each ``(B, Hq, Lp, D)`` / ``(B, Hq, Lp)``.
    """
    b, hq, lp, d = q.shape
    hkv = k.shape[1]
    g, nb = hq // hkv, lp // n
    dev = q.device
    qb = q.view(b, hkv, g, nb, n, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nb, g * n, d)
    kb, vb = k.view(b, hkv, nb, n, d), v.view(b, hkv, nb, n, d)
    valid_b = valid.view(b, nb, n)
    window = opts.local == "window"
    need_full = opts.causal == "complete" and opts.long_range

    # Keys per block: [sinks] + [previous block] + [own block].
    key_parts, val_parts = [kb], [vb]
    ok_parts = [valid_b]
    if window:
        key_parts.insert(0, F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :nb])  # block b-1 (zeros for b = 0)
        val_parts.insert(0, F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :nb])
        ok_parts.insert(0, F.pad(valid_b, (0, 0, 1, 0))[:, :nb])
    keys, vals = torch.cat(key_parts, dim=-2), torch.cat(val_parts, dim=-2)  # (B, Hkv, nb, K, D)
    key_ok = torch.cat(ok_parts, dim=-1)  # (B, nb, K)
    scores = _softcap(qb @ keys.transpose(-1, -2) * scaling, softcap)  # (B, Hkv, nb, g*n, K)
    scores = scores.view(b, hkv, nb, g, n, -1)

    i = torch.arange(n, device=dev)
    own_causal = i[None, :] <= i[:, None]  # (n, n): key i' <= query i
    structure = torch.cat([torch.ones(n, n, dtype=torch.bool, device=dev), own_causal], -1) if window else own_causal
    query_ok = valid_b[:, None, :, None, :, None]  # (B, 1, nb, 1, n, 1)
    causal_mask = structure[None, None, None, None] & key_ok[:, None, :, None, None, :] & query_ok

    block_start = torch.arange(nb, device=dev) * n
    n_sinks = min(opts.sinks, lp)

    def with_sinks(s, mask, vals_blocks, range_start):
        """Prepend the sinks that lie before each block's key range (start: (nb,))."""
        if n_sinks == 0:
            return s, mask, vals_blocks
        qs, sink_k = qb, k[:, :, None, :n_sinks]  # sink_k: (B, Hkv, 1, s, D)
        if opts.rope == "axis":  # query to coordinate p - start, sink t to coordinate t
            local = (torch.arange(lp, device=dev).view(nb, n) - range_start.view(nb, 1)).to(q.dtype)
            delta = (local[None] - positions.view(b, nb, n))[:, None, :, None, :]  # (B, 1, nb, 1, n)
            qs = rerotate(qb, delta.expand(b, 1, nb, g, n).reshape(b, 1, nb, g * n), inv_freq)
            t = torch.arange(n_sinks, device=dev, dtype=q.dtype)
            sink_k = rerotate(sink_k, (t[None] - positions[:, :n_sinks])[:, None, None, :], inv_freq)
        s_sink = _softcap(qs @ sink_k.transpose(-1, -2) * scaling, softcap).view(b, hkv, nb, g, n, n_sinks)
        t = torch.arange(n_sinks, device=dev)
        sink_ok = (t[None, :] < range_start[:, None])[None] & valid[:, None, :n_sinks]  # (B, nb, s)
        sink_mask = sink_ok[:, None, :, None, None, :] & query_ok
        sink_v = v[:, :, None, :n_sinks].expand(b, hkv, nb, n_sinks, d)
        return (
            torch.cat([s_sink, s], -1),
            torch.cat([sink_mask, mask], -1),
            torch.cat([sink_v, vals_blocks], -2),
        )

    def attend(s, mask, vals_blocks):
        probs, lse = masked_softmax(s, mask)  # (B, Hkv, nb, g, n, K)
        out = probs.view(b, hkv, nb, g * n, -1) @ vals_blocks  # (B, Hkv, nb, g*n, D)
        out = out.view(b, hkv, nb, g, n, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, lp, d)
        lse = lse.permute(0, 1, 3, 2, 4).reshape(b, hq, lp)
        return out, lse

    causal_start = torch.clamp(block_start - n, min=0) if window else block_start
    C, lse_C = attend(*with_sinks(scores, causal_mask, vals, causal_start))
    if not need_full:
        return C, lse_C, None, None
    own_scores = scores[..., -n:]
    full_mask = valid_b[:, None, :, None, None, :] & query_ok
    Fs, lse_F = attend(*with_sinks(own_scores, full_mask, vb, block_start))
    return C, lse_C, Fs, lse_F


def _outer_hop(q, k, C, lse_C, Fs, lse_F, valid, axes, j, opts: TensorizedOptions, scaling, softcap, last: bool):
    """Hop along outer axis j of ``axes`` (0-based). Streams ``(B, Hq, Lp, D)``, lse ``(B, Hq, Lp)``."""
    b, hq, lp, d = q.shape
    hkv = k.shape[1]
    a, n_j, c = math.prod(axes[:j]), axes[j], math.prod(axes[j + 1 :])
    g = hq // hkv
    qf = _to_fibers(q, hkv, axes, j).reshape(b, hkv, a, c, g * n_j, d)
    kf = k.view(b, hkv, a, n_j, c, d).permute(0, 1, 2, 4, 3, 5)  # (B, Hkv, A, C, n_j, D)
    s = _softcap(qf @ kf.transpose(-1, -2) * scaling, softcap).view(b, hkv, a, c, g, n_j, n_j)
    ok = valid.view(b, a, n_j, c).permute(0, 1, 3, 2)  # (B, A, C, n_j)
    key_ok = ok[:, None, :, :, None, None, :]
    query_ok = ok[:, None, :, :, None, :, None]
    i = torch.arange(n_j, device=q.device)
    eye = i[:, None] == i[None, :]

    def with_diag(lse_in):
        if opts.merge == "lse":
            return torch.where(eye, _lse_to_fibers(lse_in, hkv, axes, j)[..., None], s)
        return s

    def finish(out, lse):
        return _from_fibers(out), _lse_from_fibers(lse)

    if opts.causal == "dominance":
        probs, lse = masked_softmax(with_diag(lse_C), (i[None, :] <= i[:, None]) & key_ok & query_ok)
        return (*finish(probs @ _to_fibers(C, hkv, axes, j), lse), None, None)

    F_in = _to_fibers(Fs, hkv, axes, j)  # (B, Hkv, A, C, g, n_j, D)
    C_in = _to_fibers(C, hkv, axes, j)
    diag = with_diag(lse_C).diagonal(dim1=-2, dim2=-1)  # (B, Hkv, A, C, g, n_j)
    logits = torch.cat([s, diag[..., None]], dim=-1)  # last column: the diagonal, valued by C_in
    mask = torch.cat([(i[None, :] < i[:, None]) & key_ok, query_ok.expand(b, 1, a, c, 1, n_j, 1)], -1) & query_ok
    probs, lse = masked_softmax(logits, mask)
    C_out, lse_C_out = finish(probs[..., :n_j] @ F_in + probs[..., n_j:] * C_in, lse)
    if last:
        return C_out, lse_C_out, None, None
    probs, lse = masked_softmax(with_diag(lse_F), key_ok & query_ok)
    F_out, lse_F_out = finish(probs @ F_in, lse)
    return C_out, lse_C_out, F_out, lse_F_out


def torch_tensorized_attention(
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
    """Tensorized attention on slots; arguments and result as in the reference.

    q: ``(B, Hq, L, D)``; k, v: ``(B, Hkv, L, D)``; valid: ``(B, L)`` or None;
    positions: ``(B, L)`` RoPE positions of the slots, None for ``arange(L)``.
    Returns ``(B, Hq, L, D)`` in q's dtype.
    """
    opts = options
    b, hq, length, d = q.shape
    scaling = d**-0.5 if scaling is None else scaling
    in_dtype = q.dtype
    compute = torch.promote_types(q.dtype, torch.float32)
    axes = compact_axes(length, opts.block_sizes)
    lp = math.prod(axes)
    pad = lp - length
    if valid is None:
        valid = torch.ones(b, length, dtype=torch.bool, device=q.device)
    q, k, v = (F.pad(x.to(compute), (0, 0, 0, pad)) for x in (q, k, v))  # (B, H, Lp, D)
    valid = F.pad(valid, (0, pad))
    slots = torch.arange(lp, device=q.device)
    if positions is None:
        positions = slots[None].expand(b, lp)
    else:  # padded slots continue the row's positions (they are masked keys)
        positions = torch.cat([positions, positions[:, -1:] + 1 + slots[None, :pad]], dim=1)
    positions = positions.to(compute)

    C, lse_C, Fs, lse_F = _local_hop(q, k, v, valid, positions, opts, scaling, softcap, inv_freq, axes[-1])
    if opts.long_range:
        idx = multi_index(lp, axes, device=q.device) if opts.rope == "axis" else None
        for j in range(len(axes) - 2, -1, -1):
            qj, kj = q, k
            if idx is not None:  # move each slot from its RoPE position to coordinate i_j
                delta = (idx[:, j].to(compute)[None] - positions)[:, None, :]  # (B, 1, Lp)
                qj, kj = rerotate(q, delta, inv_freq), rerotate(k, delta, inv_freq)
            C, lse_C, Fs, lse_F = _outer_hop(
                qj, kj, C, lse_C, Fs, lse_F, valid, axes, j, opts, scaling, softcap, j == 0
            )
    return C[:, :, :length].to(in_dtype)
