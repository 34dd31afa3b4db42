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

from . import score_budget
from .layout import compact_axes, multi_index
from .options import TensorizedOptions
from .retrieve import (
    far_block_index,
    far_logit_bias,
    merge_far,
    ordered_frame_freq,
    read_chosen_blocks,
    retrievable_keys,
    selection_frame,
)
from .rope import rerotate
from .softmax import softmax_rows


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


def _local_hop(
    q, k, v, valid, positions, opts: TensorizedOptions, softcap, inv_freq, n: int, need_lse: bool, summary_q=None
):
    """Hop along the innermost axis (blocks of n slots), with window and sinks.

    q: ``(B, Hq, Lp, D)``, already multiplied by the score scale; k, v: ``(B, Hkv, Lp, D)``;
    valid: ``(B, Lp)`` or None (every slot real); positions: ``(B, Lp)``; summary_q:
    ``(B, Hq, Lp, D)`` pre-scaled queries of the full stream (``summary="learned"``) or None.
    Returns causal stream and lse, full stream and lse (None for ``dominance`` or when
    there is no outer hop; lse None unless ``need_lse``), ``(B, Hq, Lp, D)`` / ``(B, Hq, Lp)``.
    With ``summary`` other than ``token`` the full stream has ``2 D`` channels: the values,
    then the position-free keys (RoPE undone) it pooled.
    Every softmax row keeps at least its own key (padding queries attend to themselves and
    are zeroed at the end), so no row is empty.
    """
    b, hq, lp, d = q.shape
    hkv = k.shape[1]
    g, nb = hq // hkv, lp // n
    dev = q.device
    window = opts.local == "window"
    need_full = opts.causal == "complete" and opts.long_range
    pooled = need_full and opts.summary != "token"
    if valid is None and not window and opts.sinks == 0 and not softcap and not need_lse and not pooled:
        return _local_hop_sdpa(q, k, v, n, need_full)

    qb = q.view(b, hkv, g, nb, n, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nb, g * n, d)
    kb, vb = k.view(b, hkv, nb, n, d), v.view(b, hkv, nb, n, d)
    ones = torch.ones(b, lp, dtype=torch.bool, device=dev)
    valid_b = (valid if valid is not None else ones).view(b, nb, n)

    # Keys per block: [sinks] + [previous block] + [own block].
    key_parts, val_parts = [kb], [vb]
    ok_parts = [valid_b]
    if window:
        key_parts.insert(0, F.pad(kb, (0, 0, 0, 0, 1, 0))[:, :, :nb])  # block b-1 (zeros for b = 0)
        val_parts.insert(0, F.pad(vb, (0, 0, 0, 0, 1, 0))[:, :, :nb])
        ok_parts.insert(0, F.pad(valid_b, (0, 0, 1, 0))[:, :nb])
    keys, vals = torch.cat(key_parts, dim=-2), torch.cat(val_parts, dim=-2)  # (B, Hkv, nb, K, D)
    key_ok = torch.cat(ok_parts, dim=-1)  # (B, nb, K)
    scores = _softcap(qb @ keys.transpose(-1, -2), softcap)  # (B, Hkv, nb, g*n, K)
    scores = scores.view(b, hkv, nb, g, n, -1)

    i = torch.arange(n, device=dev)
    own_causal = i[None, :] <= i[:, None]  # (n, n): key i' <= query i
    own_self = i[None, :] == i[:, None]
    before = torch.zeros(n, n, dtype=torch.bool, device=dev)
    structure = torch.cat([~before, own_causal], -1) if window else own_causal
    self_col = torch.cat([before, own_self], -1) if window else own_self
    query_bad = ~valid_b[:, None, :, None, :, None]  # (B, 1, nb, 1, n, 1)
    causal_mask = (structure & key_ok[:, None, :, None, None, :]) | (self_col & query_bad)

    block_start = torch.arange(nb, device=dev) * n
    n_sinks = min(opts.sinks, lp)

    def with_sinks(s, mask, vals_blocks, range_start, queries=qb, values=v):
        """Prepend the sinks that lie before each block's key range (start: (nb,)).

        queries: blocked queries ``(B, Hkv, nb, g*n, D)``; values: ``(B, Hkv, Lp, D')``."""
        if n_sinks == 0:
            return s, mask, vals_blocks
        qs, sink_k = queries, k[:, :, None, :n_sinks]  # sink_k: (B, Hkv, 1, s, D)
        if opts.rope == "axis":  # query to coordinate p - start, sink t to coordinate t
            local = (torch.arange(lp, device=dev).view(nb, n) - range_start.view(nb, 1)).to(q.dtype)
            delta = (local[None] - positions.view(b, nb, n))[:, None, :, None, :]  # (B, 1, nb, 1, n)
            qs = rerotate(queries, delta.expand(b, 1, nb, g, n).reshape(b, 1, nb, g * n), inv_freq)
            t = torch.arange(n_sinks, device=dev, dtype=q.dtype)
            sink_k = rerotate(sink_k, (t[None] - positions[:, :n_sinks])[:, None, None, :], inv_freq)
        s_sink = _softcap(qs @ sink_k.transpose(-1, -2), softcap).view(b, hkv, nb, g, n, n_sinks)
        t = torch.arange(n_sinks, device=dev)
        sink_ok = (t[None, :] < range_start[:, None])[None] & valid_b.reshape(b, lp)[:, None, :n_sinks]  # (B, nb, s)
        sink_mask = sink_ok[:, None, :, None, None, :].expand(b, 1, nb, 1, n, n_sinks)
        sink_v = values[:, :, None, :n_sinks].expand(b, hkv, nb, n_sinks, values.shape[-1])
        return (
            torch.cat([s_sink, s], -1),
            torch.cat([sink_mask, mask.expand(b, 1, nb, 1, n, mask.shape[-1])], -1),
            torch.cat([sink_v, vals_blocks], -2),
        )

    def attend(s, mask, vals_blocks):
        probs, lse = softmax_rows(s, mask, need_lse)  # (B, Hkv, nb, g, n, K)
        out = probs.view(b, hkv, nb, g * n, -1) @ vals_blocks  # (B, Hkv, nb, g*n, D')
        width = out.shape[-1]
        out = out.view(b, hkv, nb, g, n, width).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, lp, width)
        if lse is not None:
            lse = lse.permute(0, 1, 3, 2, 4).reshape(b, hq, lp)
        return out, lse

    causal_start = torch.clamp(block_start - n, min=0) if window else block_start
    C, lse_C = attend(*with_sinks(scores, causal_mask, vals, causal_start))
    if not need_full:
        return C, lse_C, None, None
    own_scores, full_q, full_v = scores[..., -n:], qb, v
    if summary_q is not None:  # the full stream asks its own (learned) question of the block
        full_q = summary_q.view(b, hkv, g, nb, n, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nb, g * n, d)
        own_scores = _softcap(full_q @ kb.transpose(-1, -2), softcap).view(b, hkv, nb, g, n, n)
    if pooled:  # pool the position-free keys beside the values: (B, Hkv, Lp, 2D)
        full_v = torch.cat([v, rerotate(k, -positions[:, None, :], inv_freq)], dim=-1)
    full_vb = full_v.view(b, hkv, nb, n, -1)
    full_mask = valid_b[:, None, :, None, None, :] | (own_self & query_bad)
    Fs, lse_F = attend(*with_sinks(own_scores, full_mask, full_vb, block_start, full_q, full_v))
    return C, lse_C, Fs, lse_F


def _local_hop_sdpa(q, k, v, n: int, need_full: bool):
    """The local hop with default options and no padding: fused SDPA per block (GQA by index).

    q: ``(B, Hq, Lp, D)`` pre-scaled; k, v: ``(B, Hkv, Lp, D)``. Returns ``(C, None, F, None)``.
    """
    b, hq, lp, d = q.shape
    hkv = k.shape[1]
    nb = lp // n

    def blocks(x, h):  # (B, H, Lp, D) -> (B * nb, H, n, D): 4-D so SDPA takes its fused kernel
        return x.view(b, h, nb, n, d).transpose(1, 2).reshape(b * nb, h, n, d)

    def back(x):  # (B * nb, Hq, n, D) -> (B, Hq, Lp, D)
        return x.view(b, nb, hq, n, d).transpose(1, 2).reshape(b, hq, lp, d)

    qb, kb, vb = blocks(q, hq), blocks(k, hkv), blocks(v, hkv)
    gqa = {"enable_gqa": True} if hq != hkv else {}
    C = back(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=1.0, **gqa))
    Fs = back(F.scaled_dot_product_attention(qb, kb, vb, scale=1.0, **gqa)) if need_full else None
    return C, None, Fs, None


# Without autograd, an outer hop runs over groups of fibers so that its score tensor stays
# below this many elements (times score_budget.SCALE): peak memory then grows linearly with N
# (16 MiB in float32).
NO_GRAD_SCORE_BUDGET = 1 << 22


def _outer_hop(
    q, k, C, lse_C, Fs, lse_F, valid, axes, j, opts: TensorizedOptions, softcap, last: bool, need_lse, pooled_k=None
):
    """Hop along outer axis j of ``axes`` (0-based). Streams ``(B, Hq, Lp, D)``, lse ``(B, Hq, Lp)``.

    q is pre-scaled; valid is ``(B, Lp)`` or None; pooled_k: ``(B, Hq, Lp, D)`` keys of the
    far entries (their full streams' pooled keys at the hop's coordinates; ``summary`` other
    than ``token``), None to key them by k. Every row keeps at least one key. Under
    ``torch.no_grad`` the fibers are processed in groups (bounded memory).
    """
    b, hq, lp, d = q.shape
    hkv = k.shape[1]
    a, n_j, c = math.prod(axes[:j]), axes[j], math.prod(axes[j + 1 :])
    qf = _to_fibers(q, hkv, axes, j)  # (B, Hkv, A, C, g, n_j, D)
    kf = k.view(b, hkv, a, n_j, c, d).permute(0, 1, 2, 4, 3, 5)  # (B, Hkv, A, C, n_j, D)
    if pooled_k is not None:
        kf = _to_fibers(pooled_k, hkv, axes, j)  # (B, Hkv, A, C, g, n_j, D): one key per query head
    ok = None if valid is None else valid.view(b, a, n_j, c).permute(0, 1, 3, 2)  # (B, A, C, n_j)
    complete = opts.causal == "complete"
    fibered = {
        "C": _to_fibers(C, hkv, axes, j),
        "F": _to_fibers(Fs, hkv, axes, j) if complete else None,
        "lse_C": _lse_to_fibers(lse_C, hkv, axes, j) if opts.merge != "score" else None,
        "lse_F": _lse_to_fibers(lse_F, hkv, axes, j) if opts.merge != "score" and complete else None,
    }
    step = c
    tracked = [x for x in (qf, kf, *fibered.values()) if x is not None]
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in tracked)):
        step = max(1, min(c, score_budget.budget(NO_GRAD_SCORE_BUDGET) // max(1, b * hq * a * n_j * (n_j + 1))))
    outs = []
    for c0 in range(0, c, step):
        part = slice(c0, c0 + step)
        outs.append(
            _outer_fibers(
                qf[:, :, :, part],
                kf[:, :, :, part],
                {key: (x[:, :, :, part] if x is not None else None) for key, x in fibered.items()},
                ok[:, :, part] if ok is not None else None,
                opts,
                softcap,
                last,
                need_lse,
                math.log(c) if opts.merge == "mass" else 0.0,
            )
        )
    results = []
    for idx in range(4):
        pieces = [o[idx] for o in outs]
        if pieces[0] is None:
            results.append(None)
            continue
        whole = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=3)
        results.append(_from_fibers(whole) if whole.dim() == 7 else _lse_from_fibers(whole))
    return tuple(results)


def _outer_fibers(qf, kf, streams, ok, opts: TensorizedOptions, softcap, last: bool, need_lse, far_bias: float = 0.0):
    """One group of fibers. qf: ``(B, Hkv, A, c, g, n, D)``; kf: ``(B, Hkv, A, c, n, D)``;
    streams: fibered C, F ``(B, Hkv, A, c, g, n, D)`` and lse ``(B, Hkv, A, c, g, n)``;
    ok: ``(B, A, c, n)`` or None. Returns fibered (C, lse_C, F, lse_F)."""
    b, hkv, a, c, g, n, d = qf.shape
    if kf.dim() == 7:  # pooled keys, one per query head
        s = _softcap(qf @ kf.transpose(-1, -2), softcap)
    else:
        s = _softcap(qf.reshape(b, hkv, a, c, g * n, d) @ kf.transpose(-1, -2), softcap).view(b, hkv, a, c, g, n, n)
    if far_bias:
        s = s + far_bias  # merge="mass": each entry summarises far_bias = log(s_j) slots (diagonal replaced below)
    i = torch.arange(n, device=qf.device)
    eye = i[:, None] == i[None, :]
    key_ok = None if ok is None else ok[:, None, :, :, None, None, :]
    query_bad = None if ok is None else ~ok[:, None, :, :, None, :, None]

    def keys(structure):
        """Structure mask & key validity, plus the own key for padding queries (no empty row)."""
        if key_ok is None:
            return structure
        mask = key_ok if structure is None else structure & key_ok
        return mask | (eye & query_bad)

    def with_diag(lse_in):
        return torch.where(eye, lse_in[..., None], s) if opts.merge != "score" else s

    if opts.causal == "dominance":
        probs, lse = softmax_rows(with_diag(streams["lse_C"]), keys(i[None, :] <= i[:, None]), need_lse and not last)
        return probs @ streams["C"], lse, None, None

    F_in, C_in = streams["F"], streams["C"]
    diag = with_diag(streams["lse_C"]).diagonal(dim1=-2, dim2=-1)  # (B, Hkv, A, c, g, n)
    logits = torch.cat([s, diag[..., None]], dim=-1)  # last column: the diagonal, valued by C_in
    off = keys(i[None, :] < i[:, None])  # strictly earlier fiber elements
    if query_bad is not None:
        off = off & ~eye  # the diagonal lives in the last column
    mask = torch.cat([off.expand(*logits.shape[:-1], n), torch.ones_like(logits[..., :1], dtype=torch.bool)], -1)
    probs, lse_c = softmax_rows(logits, mask, need_lse and not last)
    C_out = probs[..., :n] @ F_in[..., :d] + probs[..., n:] * C_in  # F_in may carry pooled keys after d
    if last:
        return C_out, lse_c, None, None
    probs, lse_f = softmax_rows(with_diag(streams["lse_F"]), keys(None), need_lse)
    return C_out, lse_c, probs @ F_in, lse_f


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
    summary_query: torch.Tensor | None = None,
    summary_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tensorized attention on slots; arguments and result as in the reference.

    q: ``(B, Hq, L, D)``; k, v: ``(B, Hkv, L, D)``; valid: ``(B, L)`` or None;
    positions: ``(B, L)`` RoPE positions of the slots, None for ``arange(L)``;
    summary_query: ``(Hq, D)`` learned summary query (``summary="learned"``), unrotated;
    summary_gate: ``(Hq,)`` share of the pooled key in a far entry's key (the rest is the
    entry's own key), None for 1 (pure pooled keys).
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
    all_valid = valid is None and pad == 0
    if valid is None:
        valid = torch.ones(b, length, dtype=torch.bool, device=q.device)
    q, k, v = (F.pad(x.to(compute), (0, 0, 0, pad)) for x in (q, k, v))  # (B, H, Lp, D)
    valid_slots = F.pad(valid, (0, pad))  # (B, Lp)
    valid = None if all_valid else valid_slots
    slots = torch.arange(lp, device=q.device)
    if positions is None:
        positions = slots[None].expand(b, lp)
    else:  # padded slots continue the row's positions (they are masked keys)
        positions = torch.cat([positions, positions[:, -1:] + 1 + slots[None, :pad]], dim=1)
    positions = positions.to(compute)
    retrieval = None
    if opts.retrieve and len(axes) > 1:  # far blocks read exactly: chosen before the score scale
        qs, ks = selection_frame(q, k, positions, opts, inv_freq, axes[-1])
        key_ok = retrievable_keys(valid_slots, opts.sinks)
        index = far_block_index(qs, ks, key_ok, opts, axes[-1])
        order = ordered_frame_freq(opts, inv_freq)
        retrieval = read_chosen_blocks(qs * scaling, ks, v, index, key_ok, opts.retrieval_block, softcap, order)
    q = q * scaling  # fold the score scale into q once: O(N D), not O(N n)
    need_lse = (opts.merge != "score" and opts.long_range) or retrieval is not None

    pooled = opts.summary != "token" and opts.causal == "complete" and opts.long_range and len(axes) > 1
    if pooled and inv_freq is None:
        raise ValueError(f"summary={opts.summary!r} needs the model's RoPE inverse frequencies (inv_freq)")
    summary_q = None
    if pooled and summary_query is not None:  # (Hq, D) at each slot's RoPE position, pre-scaled
        sq = summary_query.to(compute)[None, :, None, :].expand(b, hq, lp, d)
        summary_q = q + rerotate(sq, positions[:, None, :], inv_freq) * scaling
    C, lse_C, Fs, lse_F = _local_hop(q, k, v, valid, positions, opts, softcap, inv_freq, axes[-1], need_lse, summary_q)
    if retrieval is not None:  # one softmax over window, sinks and the retrieved blocks (far logits - bias)
        far, lse_far = retrieval
        C, lse_C = merge_far(C, lse_C, far, lse_far, far_logit_bias(opts, slots))
    if opts.long_range:
        idx = multi_index(lp, axes, device=q.device) if opts.rope == "axis" else None
        for j in range(len(axes) - 2, -1, -1):
            qj, kj = q, k
            if idx is not None:  # move each slot from its RoPE position to coordinate i_j
                delta = (idx[:, j].to(compute)[None] - positions)[:, None, :]  # (B, 1, Lp)
                qj, kj = rerotate(q, delta, inv_freq), rerotate(k, delta, inv_freq)
            pooled_k = None
            if pooled:  # far entries keyed by their pooled keys, rotated to coordinate i_j (axis) or p
                coord = idx[:, j].to(compute)[None].expand(b, lp) if idx is not None else positions
                pooled_k = rerotate(Fs[..., d:], coord[:, None, :], inv_freq)  # (B, Hq, Lp, D)
                if summary_gate is not None:  # blend with the entry's own key: gate 0 is summary="token"
                    own = kj.repeat_interleave(hq // kj.shape[1], dim=1)
                    pooled_k = own + summary_gate.to(compute)[None, :, None, None] * (pooled_k - own)
            C, lse_C, Fs, lse_F = _outer_hop(
                qj, kj, C, lse_C, Fs, lse_F, valid, axes, j, opts, softcap, j == 0, need_lse, pooled_k
            )
    C = C[:, :, :length]
    if valid is not None:  # padding queries attended to themselves: zero them
        C = C * valid[:, None, :length, None].to(C.dtype)
    return C.to(in_dtype)
