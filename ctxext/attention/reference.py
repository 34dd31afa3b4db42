"""Tensorized attention in plain PyTorch, one query position at a time: the executable spec.

Slow (a Python loop over positions and hops) and written for reading. Every fast path is
tested against it. Input is already folded onto slots (see ``layout.py``).

Semantics (DESIGN.md section 1, with the choices this implementation makes explicit):

* The sequence of L slots has axes ``(n_1, ..., n_m)``, ``n_1 = ceil(L / prod(block_sizes))``.
* **Local hop** (axis m, the inner block of ``n = n_m`` consecutive slots containing p):
  - causal key set: slots of p's block that are ``<= p``; with ``local="window"`` also the
    whole previous block; with ``sinks = s`` also every slot ``t < s`` that lies before the
    start of that range (so a sink is never counted twice);
  - full key set (``complete`` only): the whole block, plus the sinks before the block.
  Values are v. Scores ``q_p . k_p' * scaling`` (soft-capped if ``softcap``).
* **Outer hops** (axis ``j = m-1, ..., 1``), within the fiber of p along axis j:
  - ``dominance``: keys with ``i_j' <= i_j``, values = previous hop output;
  - ``complete`` full stream: all fiber keys, values = previous full stream;
  - ``complete`` causal stream: keys with ``i_j' < i_j`` valued by the previous *full*
    stream, plus the diagonal valued by the previous *causal* stream.
  With ``merge="lse"`` the diagonal's score is the log-sum-exp of the scores the lower
  hop's stream summarised (the mass of its summary) instead of ``q_p . k_p``. With
  ``merge="mass"`` (``complete`` only) the diagonal is scored so too, and every other fiber
  entry, whose full stream summarises the ``s_j`` slots of its sub-block, gets
  ``q . k + log(s_j)``: as if each of those slots had its representative's score.
* ``summary="pooled"``/``"learned"`` (``complete``, merge ``lse``/``mass``): the full stream of
  the local hop also pools the keys it attends to, with RoPE undone (rotated back by their
  position), and in outer hop j every fiber entry other than the diagonal is scored by that
  pooled key rotated to the entry's coordinate (``i_j`` with ``rope="axis"``, else the
  entry's RoPE position) instead of by the entry's own key; outer full streams carry the
  pooled keys on to the next hop. ``"learned"`` also adds the learned summary query
  ``summary_query[h]``, rotated to the slot's RoPE position, to the query of every full
  stream of the local hop (causal streams keep the token's own query), and, with
  ``summary_gate[h]``, keys a far entry by ``own key + gate * (pooled key - own key)``: both
  start at zero, so a freshly converted ``learned`` model computes ``summary="token"``.
* ``retrieve = r > 0``: the causal key set of the local hop also holds every real, non-sink slot
  of the ``r`` far blocks p chose (blocks of ``m = retrieve_block or n`` slots ending before its
  causal range; chosen per query head by :func:`ctxext.attention.retrieve.select_far_blocks`),
  one softmax with the rest. With ``rope="axis"`` those scores use the query at coordinate
  ``p - start`` and a retrieved slot at ``(slot mod m) - m`` (``retrieve_frame="stacked"``) or,
  ``"ordered"``, at ``(slot mod m) - (r + 1) m`` with r the number of blocks p chose after the
  slot's block. ``retrieve_bias`` is subtracted from every far slot's score (after the softcap),
  plus ``retrieve_bias_growth * max(0, log2((p + 1) / retrieve_bias_from))`` when the bias grows.
* ``long_range=False`` stops after the local hop.
* ``rope="axis"``: in outer hop j, q and k are re-rotated from their RoPE position to
  coordinate ``i_j`` so offsets along axis j are ``i_j - i_j'``. The local hop needs no
  re-rotation (along a stride-1 axis the offset is already ``p - p'``) except for sinks
  outside the local range: the query is moved to coordinate ``p - start`` (start of its
  key range), sink t to coordinate ``t``.
* Padding slots (``valid`` False) are masked keys; their outputs are zero. A query whose
  key set is empty gets zero output and lse ``-inf``, never NaN.
"""

from __future__ import annotations

import math

import torch

from .layout import full_axes, multi_index
from .options import TensorizedOptions
from .retrieve import chosen_rank, ordered_frame_freq, retrievable_keys, select_far_blocks, selection_frame
from .rope import rerotate
from .softmax import masked_softmax


def _combine(scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax-weighted sum.

    scores: ``(B, H, K)``; values: ``(B, H, K, D)``; mask: ``(B, K)``, or ``(B, H, K)`` when it
    differs per head (True = key present).
    Returns ``(B, H, D)`` and the log-sum-exp ``(B, H)`` (``-inf`` and zeros when no key).
    """
    probs, lse = masked_softmax(scores, mask[:, None, :] if mask.dim() == 2 else mask)
    return torch.einsum("bhk,bhkd->bhd", probs, values), lse


def reference_tensorized_attention(
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
    return_full_stream: bool = False,
    summary_query: torch.Tensor | None = None,
    summary_gate: torch.Tensor | None = None,
):
    """Tensorized attention on slots.

    q: ``(B, Hq, L, D)``; k, v: ``(B, Hkv, L, D)`` with ``Hq = g * Hkv``;
    valid: ``(B, L)`` bool, None when every slot holds a real token;
    inv_freq: ``(r/2,)`` RoPE inverse frequencies, required for ``rope="axis"``;
    positions: ``(B, L)`` RoPE position q and k of each slot were rotated at, None when
    slot s was rotated at position s.
    summary_query: ``(Hq, D)`` learned summary query, unrotated (``summary="learned"``);
    summary_gate: ``(Hq,)`` share of the pooled key in a far entry's key, None for 1.
    Returns ``(B, Hq, L, D)`` (and the full stream after the last hop, ``complete`` only,
    when ``return_full_stream``).
    """
    opts = options
    batch, n_heads, length, dim = q.shape
    group = n_heads // k.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scaling = dim**-0.5 if scaling is None else scaling
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device)
    if opts.rope == "axis" and inv_freq is None:
        raise ValueError("rope='axis' needs the model's RoPE inverse frequencies (inv_freq)")
    slots = torch.arange(length, device=q.device)
    pos = (positions if positions is not None else slots[None].expand(batch, length)).to(compute)  # (B, L)
    n = opts.block_sizes[-1]
    if opts.retrieve:  # far blocks each query reads exactly: (B, Hq, L, nb), and the frame they are read in
        q_far, k_far = selection_frame(q, k, pos, opts, inv_freq, n)
        far_ok = retrievable_keys(valid, opts.sinks)
        chosen = select_far_blocks(q_far, k_far, far_ok, opts, n)
        k_far = k_far.repeat_interleave(group, dim=1)
        order_freq = ordered_frame_freq(opts, inv_freq)  # None: every chosen block at (slot mod m) - m
        m = opts.retrieval_block  # slots per retrieved block
        rank = chosen_rank(chosen)  # (B, Hq, L, nb)
    k = k.repeat_interleave(group, dim=1)  # the reference may repeat k/v: (B, Hq, L, D)
    v = v.repeat_interleave(group, dim=1)

    axes = full_axes(length, opts.block_sizes)
    idx = multi_index(length, axes).tolist()  # per slot: [i_1, ..., i_m]
    strides = [math.prod(axes[j + 1 :]) for j in range(len(axes))]
    complete = opts.causal == "complete"
    pooled = complete and opts.summary != "token"
    if pooled and inv_freq is None:
        raise ValueError(f"summary={opts.summary!r} needs the model's RoPE inverse frequencies (inv_freq)")
    q_full, v_full = q, v  # the full stream's queries and values (values + pooled position-free keys)
    if pooled:
        v_full = torch.cat([v, rerotate(k, -pos[:, None, :], inv_freq)], dim=-1)
        if summary_query is not None:
            sq = summary_query.to(compute)[None, :, None, :].expand(batch, n_heads, length, dim)
            q_full = q + rerotate(sq, pos[:, None, :], inv_freq)

    def score(qp: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """qp: (B, H, D), keys: (B, H, K, D) -> (B, H, K)."""
        s = torch.einsum("bhd,bhkd->bhk", qp, keys) * scaling
        return softcap * torch.tanh(s / softcap) if softcap else s

    def sink_scores(p: int, start: int, sinks: list[int], queries: torch.Tensor) -> torch.Tensor:
        qp, ks = queries[:, :, p], k[:, :, sinks]
        if opts.rope == "axis":  # query to coordinate p - start, sink t to coordinate t
            qp = rerotate(qp[:, :, None], (p - start - pos[:, p])[:, None, None], inv_freq)[:, :, 0]
            ks = rerotate(ks, (torch.tensor(sinks, dtype=compute) - pos[:, sinks])[:, None, :], inv_freq)
        return score(qp, ks)

    def far_logit_bias(p: int) -> float:
        """Nats off query p's far scores: the fixed bias, and the growth per doubling of p + 1 past its start,
        at most the cap."""
        if not opts.retrieve_bias_growth:
            return opts.retrieve_bias
        bias = opts.retrieve_bias + opts.retrieve_bias_growth * max(0.0, math.log2((p + 1) / opts.retrieve_bias_from))
        return min(bias, opts.retrieve_bias_cap) if opts.retrieve_bias_cap else bias

    def local_stream(p: int, keys: list[int], queries=q, values=v, far=False) -> tuple[torch.Tensor, torch.Tensor]:
        start = keys[0]
        sinks = [t for t in range(min(opts.sinks, length)) if t < start]
        s = score(queries[:, :, p], k[:, :, keys])
        vals = values[:, :, keys]
        mask = valid[:, keys][:, None].expand(s.shape)  # (B, H, K): per head once far blocks enter
        if sinks:
            s = torch.cat([sink_scores(p, start, sinks, queries), s], dim=-1)
            vals = torch.cat([values[:, :, sinks], vals], dim=2)
            mask = torch.cat([valid[:, sinks][:, None].expand(batch, n_heads, len(sinks)), mask], dim=-1)
        far_slots = list(range(start // n * n)) if far else []  # every slot of a block ending before start
        if far_slots:
            far_blocks = [t // m for t in far_slots]
            keys_far = k_far[:, :, far_slots]  # (B, H, F, D)
            if order_freq is not None:  # a block with r later chosen blocks moves back by r m
                keys_far = rerotate(keys_far, -(rank[:, :, p, far_blocks] * m).to(compute), order_freq)
            s = torch.cat([s, score(q_far[:, :, p], keys_far) - far_logit_bias(p)], dim=-1)
            vals = torch.cat([vals, values[:, :, far_slots]], dim=2)
            picked = chosen[:, :, p, far_blocks] & far_ok[:, None, far_slots]  # (B, H, F)
            mask = torch.cat([mask, picked], dim=-1)
        mask = mask & valid[:, None, p : p + 1]  # padding queries attend to nothing
        return _combine(s, vals, mask)

    # ---- local hop (axis m) ----
    causal_out, causal_lse, full_out, full_lse = [], [], [], []
    for p in range(length):
        block_start = (p // n) * n
        own = list(range(block_start, min(block_start + n, length)))
        causal_keys = [t for t in own if t <= p]
        if opts.local == "window" and block_start > 0:
            causal_keys = list(range(block_start - n, block_start)) + causal_keys
        out, lse = local_stream(p, causal_keys, far=opts.retrieve > 0)
        causal_out.append(out)
        causal_lse.append(lse)
        if complete:
            out, lse = local_stream(p, own, q_full, v_full)
            full_out.append(out)
            full_lse.append(lse)
    C, lse_C = torch.stack(causal_out, 2), torch.stack(causal_lse, 2)  # (B, H, L, D), (B, H, L)
    F = torch.stack(full_out, 2) if complete else None
    lse_F = torch.stack(full_lse, 2) if complete else None

    # ---- outer hops (axes m-1, ..., 1) ----
    hops = range(len(axes) - 2, -1, -1) if opts.long_range else range(0)
    for j in hops:
        if opts.rope == "axis":
            coord = torch.tensor([row[j] for row in idx], dtype=compute, device=q.device)
            delta = (coord[None] - pos)[:, None, :]  # (B, 1, L): from RoPE position to coordinate i_j
            qj, kj = rerotate(q, delta, inv_freq), rerotate(k, delta, inv_freq)
        else:
            qj, kj = q, k
        far_k = kj  # keys of the far (non-diagonal) entries
        if pooled:  # each entry's pooled key, rotated to its coordinate i_j (axis) or its position
            coord = coord[None].expand(batch, length) if opts.rope == "axis" else pos
            far_k = rerotate(F[..., dim:], coord[:, None, :], inv_freq)
            if summary_gate is not None:  # key = own + gate * (pooled - own)
                far_k = kj + summary_gate.to(compute)[None, :, None, None] * (far_k - kj)
        last_hop = j == 0
        new_C, new_lse_C, new_F, new_lse_F = [], [], [], []
        for p in range(length):
            i = idx[p][j]
            fiber = [p + (t - i) * strides[j] for t in range(axes[j])]
            fiber = [(t, pp) for t, pp in enumerate(fiber) if pp < length]
            s_all = score(qj[:, :, p], far_k[:, :, [pp for _, pp in fiber]])  # (B, H, K)
            diag = [c for c, (t, _) in enumerate(fiber) if t == i][0]
            query_ok = valid[:, p : p + 1]

            def diag_score(lse_in: torch.Tensor) -> torch.Tensor:
                if opts.merge != "score":
                    return lse_in[:, :, p : p + 1]
                return s_all[..., diag : diag + 1]

            if opts.merge == "mass":  # every other entry summarises the s_j slots of its sub-block
                s_all = s_all + math.log(strides[j])

            if complete:
                earlier = [c for c, (t, _) in enumerate(fiber) if t < i]
                keys = [fiber[c][1] for c in earlier]
                s = torch.cat([s_all[..., earlier], diag_score(lse_C)], dim=-1)
                vals = torch.cat([F[:, :, keys, :dim], C[:, :, p : p + 1]], dim=2)
                mask = torch.cat([valid[:, keys], valid[:, p : p + 1]], dim=-1) & query_ok
                out, lse = _combine(s, vals, mask)
                new_C.append(out)
                new_lse_C.append(lse)
                if not last_hop or return_full_stream:
                    keys = [pp for _, pp in fiber]
                    s = torch.cat([s_all[..., :diag], diag_score(lse_F), s_all[..., diag + 1 :]], dim=-1)
                    out, lse = _combine(s, F[:, :, keys], valid[:, keys] & query_ok)
                    new_F.append(out)
                    new_lse_F.append(lse)
            else:
                upto = [c for c, (t, _) in enumerate(fiber) if t <= i]
                keys = [fiber[c][1] for c in upto]
                s = torch.cat([s_all[..., : len(upto) - 1], diag_score(lse_C)], dim=-1)
                out, lse = _combine(s, C[:, :, keys], valid[:, keys] & query_ok)
                new_C.append(out)
                new_lse_C.append(lse)
        C, lse_C = torch.stack(new_C, 2), torch.stack(new_lse_C, 2)
        if new_F:
            F, lse_F = torch.stack(new_F, 2), torch.stack(new_lse_F, 2)
    if return_full_stream:
        return C, F[..., :dim]
    return C
