"""Exact causal attention, chunked over queries: the path for sliding-window layers.

Models such as Gemma 2 or Qwen with sliding layers keep exact windowed attention on those
layers (tensorized attention replaces full-attention layers only). Memory per chunk is
``O(Hq * chunk * (chunk + window))``; soft-capping and O(N) padding masks are supported.
"""

from __future__ import annotations

import torch

from .softmax import masked_softmax


def exact_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    padding_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Causal softmax attention, optionally windowed, without an ``N x N`` matrix.

    q: ``(B, Hq, N, D)``; k, v: ``(B, Hkv, K, D)`` with ``K >= N``: the queries are the last N
    of the K positions (a cached decode step when ``K > N``); padding_mask: ``(B, K)`` (True =
    token). Query i (position ``i + K - N``) sees keys j with ``pos - window < j <= pos``
    (transformers' convention) that are real tokens. Returns ``(B, Hq, N, D)`` in q's dtype;
    queries with no key get zeros.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    offset = k.shape[2] - n  # keys before the first query (cached decoding)
    g = hq // hkv
    scaling = d**-0.5 if scaling is None else scaling
    compute = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(compute).view(b, hkv, g, n, d)
    kc, vc = k.to(compute), v.to(compute)
    outs = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        k_start = max(0, start + offset - window + 1) if window else 0
        k_stop = stop + offset
        s = torch.einsum("bhgqd,bhkd->bhgqk", qg[:, :, :, start:stop], kc[:, :, k_start:k_stop]) * scaling
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        qi = torch.arange(start + offset, k_stop, device=q.device)[:, None]
        kj = torch.arange(k_start, k_stop, device=q.device)[None, :]
        mask = kj <= qi
        if window:
            mask = mask & (kj > qi - window)
        mask = mask[None, None, None]
        if padding_mask is not None:
            mask = mask & padding_mask[:, None, None, None, k_start:k_stop].to(torch.bool)
        probs, _ = masked_softmax(s, mask)
        outs.append(torch.einsum("bhgqk,bhkd->bhgqd", probs, vc[:, :, k_start:k_stop]))
    return torch.cat(outs, dim=3).reshape(b, hq, n, d).to(q.dtype)
