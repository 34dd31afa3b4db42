"""Teacher-forced scoring of retrieval tasks (passkey, needle, RULER-style).

One forward pass over prompt + answer; the sample is correct when the argmax prediction at
every answer position equals the answer token. Only the answer positions go through the LM
head, so a 128k prompt never materialises ``N x vocab`` logits.
"""

from __future__ import annotations

import torch

from ..loss import final_hidden, lm_logits


@torch.no_grad()
def teacher_forced_logprobs(model, input_ids: list[int], answer_start: int) -> torch.Tensor:
    """``(A, V)`` float32 log-probabilities of the next token at every answer position (``A``
    answer tokens, ``V`` the vocabulary), each predicted from the true tokens before it."""
    device = next(model.parameters()).device
    x = torch.tensor([input_ids], device=device)
    hidden = final_hidden(model, x)  # (1, N, H)
    # Position t predicts token t+1: the answer tokens are predicted from answer_start-1 .. N-2.
    return lm_logits(model, hidden[:, answer_start - 1 : -1])[0].float().log_softmax(dim=-1)


def teacher_forced_prediction(model, input_ids: list[int], answer_start: int) -> list[int]:
    """The argmax token at every answer position, each predicted from the true tokens before it."""
    return teacher_forced_logprobs(model, input_ids, answer_start).argmax(dim=-1).tolist()


def teacher_forced_correct(model, input_ids: list[int], answer_start: int) -> bool:
    """True when :func:`teacher_forced_prediction` equals the answer tokens."""
    return teacher_forced_prediction(model, input_ids, answer_start) == list(input_ids[answer_start:])
