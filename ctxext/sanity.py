"""A one-minute check of a converted model: it reloads, matches full attention inside one block,
and how much perplexity tensorized attention costs before fine-tuning at a few lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention.hf import ATTN_IMPLEMENTATION, options_from_config
from .data import local_text
from .loss import sequence_nll


@dataclass
class QuickCheck:
    reloaded_attention: str
    block_tokens: int
    max_logit_diff_in_block: float
    perplexity: dict[int, tuple[float, float]]  # length -> (full attention, tensorized)


def quick_check(model_dir: Path, lengths: tuple[int, ...] = (512, 1024)) -> QuickCheck:
    """Reload ``model_dir`` twice (tensorized as saved, and with SDPA) and compare on local text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ta = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    full = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    block = options_from_config(ta.config).inner_block
    need = max(max(lengths), block)
    ids = tokenizer(local_text(need * 8), return_tensors="pt").input_ids[:, :need]
    with torch.no_grad():
        n = min(block, ids.shape[1])
        diff = (ta(ids[:, :n]).logits - full(ids[:, :n]).logits).abs().max().item()
        ppl = {}
        for length in lengths:
            x = ids[:, :length]
            ppl[length] = (
                math.exp(sequence_nll(full, x).mean().item()),
                math.exp(sequence_nll(ta, x).mean().item()),
            )
    return QuickCheck(
        reloaded_attention=ta.config._attn_implementation,
        block_tokens=n,
        max_logit_diff_in_block=diff,
        perplexity=ppl,
    )


def check_passed(result: QuickCheck, tolerance: float = 1e-3) -> bool:
    return result.reloaded_attention == ATTN_IMPLEMENTATION and result.max_logit_diff_in_block <= tolerance
