"""Retrieval of far blocks (``retrieve=k``): each query also reads its k best far inner blocks exactly.

The long-range hops of tensorized attention reach a far block only through one summary per
fiber, and a summary made without knowing the later query cannot keep an arbitrary span
(the quality study, docs/RESULTS.md). With ``retrieve = k > 0`` the causal stream of the local
hop adds, for every query, the tokens of the ``k`` far inner blocks (blocks of ``n = n_m`` slots
that end before the query's local range starts) with the highest score bound, in the same
softmax as the window and the sinks; the outer hops then run as before, so every earlier token
stays reachable. The block score is the upper bound of ``q . k`` over the block's keys from
their per-channel minimum and maximum (Quest, Tang et al. 2024):
``sum_d max(q_d * kmin_d, q_d * kmax_d)``, one score per query head and far block, so the
choice costs ``O(N * N / n * D)`` multiply-adds (like one outer hop) and reading the chosen
blocks ``O(N * k * n * D)``.

Positions: with ``rope="absolute"`` the retrieved keys keep the model's rotation (offsets as
far as the block lies). With ``rope="axis"`` the query is moved to coordinate ``p - start``
(as for the sinks) and a retrieved slot at offset ``o`` in its block to coordinate ``o - n``:
every retrieved block sits just before the local range, so no offset exceeds ``3 n``, at any
length.

The choice uses only the query itself and blocks entirely in its past, so it is causal.
Sink slots (``t < sinks``) are never retrieved (the sinks already enter every softmax exactly).
Both the reference and the torch backend call :func:`select_far_blocks`, so they agree on
the choice even at ties; they compute the attention independently.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .options import TensorizedOptions
from .rope import rerotate
from .softmax import masked_softmax


def local_range_start(length: int, n: int, window: bool, device: torch.device) -> torch.Tensor:
    """``(L,)`` first slot of each slot's causal local range: its block start (minus n with a window)."""
    start = torch.arange(length, device=device) // n * n
    return (start - n).clamp_min(0) if window else start


def selection_frame(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, opts: TensorizedOptions, inv_freq, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the retrieval path scores them: ``(B, Hq, L, D)``, ``(B, Hkv, L, D)``.

    positions: ``(B, L)`` RoPE positions of the slots (float). With ``rope="axis"`` q moves to
    coordinate ``p - start`` and k to ``(slot mod n) - n``; with ``absolute`` both are unchanged.
    """
    if opts.rope != "axis":
        return q, k
    length = q.shape[-2]
    slots = torch.arange(length, device=q.device)
    start = local_range_start(length, n, opts.local == "window", q.device)
    q_coord = (slots - start).to(positions.dtype)
    k_coord = (slots % n - n).to(positions.dtype)
    return (
        rerotate(q, (q_coord[None] - positions)[:, None, :], inv_freq),
        rerotate(k, (k_coord[None] - positions)[:, None, :], inv_freq),
    )


def retrievable_keys(valid: torch.Tensor, sinks: int) -> torch.Tensor:
    """``(B, L)`` slots a query may retrieve: real tokens that are not sinks."""
    ok = valid.clone()
    ok[:, : min(sinks, ok.shape[1])] = False
    return ok


@torch.no_grad()
def select_far_blocks(
    qs: torch.Tensor, ks: torch.Tensor, key_ok: torch.Tensor, opts: TensorizedOptions, n: int
) -> torch.Tensor:
    """Which far blocks each query reads exactly.

    qs: ``(B, Hq, L, D)``, ks: ``(B, Hkv, L, D)`` in the selection frame (any positive score
    scale); key_ok: ``(B, L)`` from :func:`retrievable_keys`. Returns ``(B, Hq, L, nb)`` bool,
    ``nb = ceil(L / n)``: True for the (at most) ``opts.retrieve`` eligible blocks with the
    highest bound. A block is eligible when it ends before the query's local range starts and
    holds at least one retrievable key.
    """
    b, hq, length, d = qs.shape
    hkv = ks.shape[1]
    nb = math.ceil(length / n)
    pad = nb * n - length
    kb = F.pad(ks, (0, 0, 0, pad)).view(b, hkv, nb, n, d)
    ok = F.pad(key_ok, (0, pad)).view(b, 1, nb, n, 1)
    big = torch.finfo(kb.dtype).max
    kmax = kb.masked_fill(~ok, -big).amax(dim=-2)  # (B, Hkv, nb, D)
    kmin = kb.masked_fill(~ok, big).amin(dim=-2)
    has_keys = ok.any(dim=-2)[:, 0, :, 0]  # (B, nb)
    kmax, kmin = kmax.masked_fill(~has_keys[:, None, :, None], 0), kmin.masked_fill(~has_keys[:, None, :, None], 0)
    g = hq // hkv
    qg = qs.reshape(b, hkv, g * length, d)
    bound = qg.clamp_min(0) @ kmax.transpose(-1, -2) + qg.clamp_max(0) @ kmin.transpose(-1, -2)
    bound = bound.view(b, hq, length, nb)  # (B, Hq, L, nb): max over the block of q . k, bounded
    start = local_range_start(length, n, opts.local == "window", qs.device)
    block_end = (torch.arange(nb, device=qs.device) + 1) * n
    eligible = (block_end[None, :] <= start[:, None])[None, None] & has_keys[:, None, None, :]  # (B, 1, L, nb)
    bound = bound.masked_fill(~eligible, float("-inf"))
    top = min(opts.retrieve, nb)
    values, index = bound.topk(top, dim=-1)
    chosen = torch.zeros(b, hq, length, nb, dtype=torch.bool, device=qs.device)
    return chosen.scatter(-1, index, torch.isfinite(values))


def retrieved_attention(
    qs: torch.Tensor,
    ks: torch.Tensor,
    v: torch.Tensor,
    chosen: torch.Tensor,
    key_ok: torch.Tensor,
    n: int,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the tokens of its chosen far blocks (the torch backend).

    qs: ``(B, Hq, L, D)`` pre-scaled queries and ks ``(B, Hkv, L, D)`` keys in the selection
    frame; v: ``(B, Hkv, L, D)``; chosen: ``(B, Hq, L, nb)`` from :func:`select_far_blocks`;
    key_ok: ``(B, L)``; L a multiple of n. Returns the output ``(B, Hq, L, D)`` and its
    log-sum-exp ``(B, Hq, L)`` (zeros and ``-inf`` for a query that chose nothing).

    Runs one query block at a time over the union of the blocks its queries chose (GQA by
    index: k and v are never repeated); each query's softmax is masked to its own choice.
    """
    b, hq, length, d = qs.shape
    hkv = ks.shape[1]
    g, nb = hq // hkv, length // n
    offsets = torch.arange(n, device=qs.device)
    outs, lses = [], []
    for block in range(nb):
        rows = slice(block * n, (block + 1) * n)
        pick = chosen[:, :, rows]  # (B, Hq, n, nb)
        used = pick.flatten(0, 2).any(dim=0).nonzero().flatten()  # (U,) blocks any query here chose
        if used.numel() == 0:
            outs.append(qs.new_zeros(b, hq, n, d))
            lses.append(qs.new_full((b, hq, n), float("-inf")))
            continue
        slots = (used[:, None] * n + offsets).flatten()  # (U * n,)
        q_blk = qs[:, :, rows].reshape(b, hkv, g * n, d)
        scores = q_blk @ ks[:, :, slots].transpose(-1, -2)  # (B, Hkv, g * n, U * n)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        mask = pick[..., used].repeat_interleave(n, dim=-1) & key_ok[:, None, None, slots]  # (B, Hq, n, U * n)
        probs, lse = masked_softmax(scores.view(b, hq, n, -1), mask)
        out = probs.view(b, hkv, g * n, -1) @ v[:, :, slots]  # (B, Hkv, g * n, D)
        outs.append(out.view(b, hq, n, d))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_streams(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over two disjoint key sets from their partial results.

    out: ``(..., D)``, lse: ``(...)``; ``lse_a`` is finite everywhere, ``lse_b`` may be ``-inf``
    (an empty set: weight 0). Returns the merged output and log-sum-exp.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return wa * out_a + wb * out_b, lse
