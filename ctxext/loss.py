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


def check_same_vocabulary(teacher, model) -> None:
    """Raise ``ValueError`` unless ``teacher`` and ``model`` have output heads of the same size."""
    theirs, ours = (m.get_output_embeddings().weight.shape[0] for m in (teacher, model))
    if theirs != ours:
        raise ValueError(
            f"distillation needs the teacher's vocabulary: teacher has {theirs} output tokens, the student {ours}"
        )


def chunked_distill_terms(
    model,
    teacher,
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 2048,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL and KL to a teacher, from final hidden states, in chunks.

    hidden: ``(B, N, H)`` student final hidden states; teacher_hidden: ``(B, N, H_t)`` the
    teacher's on the same tokens (no grad); labels: ``(B, N)`` aligned targets. Returns
    ``(nll, kl)``, each ``(B, N)`` float32 in nats: ``nll`` of the labels under the student,
    ``kl = T^2 * KL(teacher_T || student_T)`` with both distributions softened by temperature
    ``T`` (the ``T^2`` keeps gradient scale independent of ``T``, as in Hinton et al.). Neither
    model's ``N x vocab`` logits exist at once: each chunk's logits are recomputed in backward.
    """

    def chunk_terms(h: torch.Tensor, h_teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = lm_logits(model, h)  # (B, c, V)
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, c)
        with torch.no_grad():
            teacher_logp = F.log_softmax(lm_logits(teacher, h_teacher) / temperature, dim=-1)  # (B, c, V)
        student_logp = F.log_softmax(logits / temperature, dim=-1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1) * temperature**2  # (B, c)
        return torch.stack([nll, kl])  # (2, B, c)

    check_same_vocabulary(teacher, model)
    out = []
    for start in range(0, hidden.shape[1], chunk):
        args = (
            hidden[:, start : start + chunk],
            teacher_hidden[:, start : start + chunk],
            labels[:, start : start + chunk],
        )
        if torch.is_grad_enabled() and hidden.requires_grad:
            out.append(checkpoint(chunk_terms, *args, use_reentrant=False))
        else:
            out.append(chunk_terms(*args))
    terms = torch.cat(out, dim=2)  # (2, B, N)
    return terms[0], terms[1]


def sequence_distill_terms(
    model, teacher, input_ids: torch.Tensor, chunk: int = 2048, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(nll, kl)`` ``(B, N-1)`` of each next token of ``input_ids`` ``(B, N)``
    (see :func:`chunked_distill_terms`); the teacher runs under ``torch.no_grad``."""
    with torch.no_grad():
        teacher_hidden = final_hidden(teacher, input_ids)
    hidden = final_hidden(model, input_ids)
    return chunked_distill_terms(
        model, teacher, hidden[:, :-1], teacher_hidden[:, :-1], input_ids[:, 1:], chunk=chunk, temperature=temperature
    )
