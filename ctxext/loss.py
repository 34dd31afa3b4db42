"""Next-token loss from final hidden states, in chunks: never ``N x vocab`` logits at once.

At 128k tokens and a 128k vocabulary, full logits alone take 67 GB (DESIGN.md section 6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _final_softcap(model) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None)


def chunked_token_nll(model, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood of ``labels`` given final ``hidden`` states.

    hidden: ``(B, N, H)`` final hidden states (after the last norm); labels: ``(B, N)``
    token ids aligned with hidden (the caller shifts). Returns ``(B, N)`` float32 NLL in
    nats. The LM head runs on ``chunk`` positions at a time; final-logit soft-capping is
    honoured.
    """
    head = model.get_output_embeddings()
    cap = _final_softcap(model)
    out = []
    for start in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, start : start + chunk]).float()  # (B, c, V)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        target = labels[:, start : start + chunk]
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        out.append(nll)
    return torch.cat(out, dim=1)


def sequence_nll(model, input_ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token NLL ``(B, N-1)`` of each next token of ``input_ids`` ``(B, N)``."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = backbone(input_ids=input_ids, use_cache=False).last_hidden_state
    return chunked_token_nll(model, hidden[:, :-1], input_ids[:, 1:], chunk=chunk)
