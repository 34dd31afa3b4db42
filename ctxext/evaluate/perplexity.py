"""Perplexity against length: each document scored on its first L tokens, chunked loss.

Full-sequence logits never exist (DESIGN.md section 6): the final hidden states go through
the LM head ``chunk`` positions at a time under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..loss import sequence_nll


@dataclass
class PerplexityDocs:
    """Tokenised documents for perplexity; ``docs`` are token-id lists, longest first."""

    docs: list[list[int]]
    source: str
    read: int  # documents read

    def longest(self) -> int:
        return max((len(d) for d in self.docs), default=0)

    def select(self, length: int, n_docs: int) -> tuple[list[list[int]], int]:
        """The first ``n_docs`` documents with at least ``length`` tokens, and how many were too short."""
        long_enough = [d for d in self.docs if len(d) >= length]
        return long_enough[:n_docs], len(self.docs) - len(long_enough)


def load_docs(source: str, tokenizer, text_field: str = "text", max_docs: int = 200) -> PerplexityDocs:
    """Tokenise up to ``max_docs`` documents of a data source (see ``ctxext.data``)."""
    from ..data import iter_documents

    docs = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for text in iter_documents(source, text_field, max_samples=max_docs):
        docs.append(bos + tokenizer(text, add_special_tokens=False).input_ids)
    docs.sort(key=len, reverse=True)
    return PerplexityDocs(docs, source, len(docs))


@torch.no_grad()
def document_nll(model, ids: list[int], chunk: int = 2048, group=None) -> tuple[float, int]:
    """Summed NLL (nats) of tokens 2..L given their prefix, and the number of tokens scored.

    group: a ``torch.distributed`` group whose ranks all call this with the same ``ids`` to
    score one document context-parallel (each rank runs its shard of the tokens; tensorized
    attention only); None runs the whole document on this process.
    """
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    if group is not None:
        return _context_parallel_nll(model, x, chunk, group)
    nll = sequence_nll(model, x, chunk=chunk)
    return float(nll.sum().item()), nll.numel()


def _context_parallel_nll(model, x: torch.Tensor, chunk: int, group) -> tuple[float, int]:
    import torch.distributed as dist

    from ..attention.context_parallel import context_parallel
    from ..attention.hf import options_from_config
    from ..train import check_context_parallel_model, context_shard_nll

    if model.config._attn_implementation != "tensorized":
        raise ValueError(
            f"context-parallel perplexity needs attn_implementation='tensorized', got "
            f"{model.config._attn_implementation!r}: other attention would run each shard on its own"
        )
    block_sizes = options_from_config(model.config).block_sizes
    size = dist.get_world_size(group)
    check_context_parallel_model(model, size)
    with context_parallel(group):
        nll = context_shard_nll(model, x, dist.get_rank(group), size, block_sizes, chunk)
    total = torch.tensor([nll.sum().item(), nll.numel()], dtype=torch.float64, device=x.device)
    dist.all_reduce(total, group=group)
    return float(total[0]), int(total[1])


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens) if tokens else float("nan")
