"""Next-token loss from final hidden states, in chunks: never ``N x vocab`` logits at once.

At 128k tokens and a 128k vocabulary, full logits alone take 67 GB (DESIGN.md section 6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``(B, N, H)`` (after the last norm) without computing any logits."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return backbone(input_ids=input_ids, use_cache=False).last_hidden_state


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits of ``hidden`` ``(B, c, H)`` in float32, with final-logit soft-capping."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def chunked_token_nll(model, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token negative log-likelihood of ``labels`` given final ``hidden`` states.

    hidden: ``(B, N, H)`` final hidden states (after the last norm); labels: ``(B, N)``
    token ids aligned with hidden (the caller shifts). Returns ``(B, N)`` float32 NLL in
    nats. The LM head runs on ``chunk`` positions at a time; final-logit soft-capping is
    honoured.
    """

    def chunk_nll(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = lm_logits(model, h)  # (B, c, V)
        return F.cross_entropy(logits.transpose(1, 2), target, reduction="none")

    out = []
    for start in range(0, hidden.shape[1], chunk):
        h, target = hidden[:, start : start + chunk], labels[:, start : start + chunk]
        if torch.is_grad_enabled() and hidden.requires_grad:
            # Recompute the chunk's logits in backward: only (B, c, H) is kept, never (B, N, V).
            out.append(checkpoint(chunk_nll, h, target, use_reentrant=False))
        else:
            out.append(chunk_nll(h, target))
    return torch.cat(out, dim=1)


def sequence_nll(model, input_ids: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per-token NLL ``(B, N-1)`` of each next token of ``input_ids`` ``(B, N)``."""
    hidden = final_hidden(model, input_ids)
    return chunked_token_nll(model, hidden[:, :-1], input_ids[:, 1:], chunk=chunk)
