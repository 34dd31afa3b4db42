"""Teacher-forced scoring of retrieval tasks (passkey, needle, RULER-style).

One forward pass over prompt + answer; the sample is correct when the argmax prediction at
every answer position equals the answer token. Only the answer positions go through the LM
head, so a 128k prompt never materialises ``N x vocab`` logits.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def teacher_forced_correct(model, input_ids: list[int], answer_start: int) -> bool:
    device = next(model.parameters()).device
    x = torch.tensor([input_ids], device=device)
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = backbone(input_ids=x, use_cache=False).last_hidden_state  # (1, N, H)
    # Position t predicts token t+1: the answer tokens are predicted from answer_start-1 .. N-2.
    h = hidden[:, answer_start - 1 : -1]
    logits = model.get_output_embeddings()(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    predicted = logits.argmax(dim=-1)[0]
    return bool((predicted == x[0, answer_start:]).all().item())
