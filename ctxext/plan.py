"""``finetune --dry-run``: what a recipe will train, and a peak-memory estimate per device.

The model is built on the meta device from its config (no weights are read), so an 8B
recipe can be planned on a laptop once its config is available locally or from the Hub.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Recipe

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


@dataclass
class TrainingPlan:
    architecture: str
    total_params: int
    trainable_params: int
    lora_params: int
    extra_trainable_params: int
    tokens_per_step: int
    memory_gib: dict[str, float]

    @property
    def peak_gib(self) -> float:
        return sum(self.memory_gib.values())


def plan(recipe: Recipe, num_processes: int = 1) -> TrainingPlan:
    """Count parameters on a meta-device model and estimate peak training memory per device."""
    from transformers import AutoModelForCausalLM

    from .models import check_causal_lm, load_config, resolve_source
    from .train import add_adapter

    source = resolve_source(recipe.model.source)
    config = load_config(source)
    check_causal_lm(config, source.label)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        model = add_adapter(recipe, model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t, d = recipe.train, recipe.data
    dtype = recipe.model.dtype
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
    wbytes = BYTES.get(dtype, 4)
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    vocab = config.vocab_size
    tokens = t.batch_size * d.seq_len
    act_bytes = 2 if t.precision in ("bf16", "fp16") else wbytes
    if t.gradient_checkpointing:
        saved = layers * tokens * hidden * act_bytes  # one layer input per layer
        recompute = tokens * (10 * hidden + 3 * inter) * act_bytes  # one layer's activations during backward
    else:
        saved = layers * tokens * (16 * hidden + 3 * inter) * act_bytes
        recompute = 0
    if recipe.model.attention == "tensorized":
        opts = recipe.tensorized_options()
        keys = opts.inner_block * (2 if opts.local == "window" else 1) + opts.sinks
        attention = 3 * heads * tokens * keys * 4  # scores, probabilities, gradient of one hop (float32)
    else:
        attention = 4 * heads * tokens * 4 * 32  # fused SDPA kernels: O(N) per head, small
    memory = {
        "weights": total * wbytes,
        "trainable (grads + AdamW states)": trainable * (4 + 8),
        "activations": saved + recompute + attention,
        "loss chunk (logits)": 3 * t.batch_size * min(t.loss_chunk, d.seq_len) * vocab * 4,
    }
    return TrainingPlan(
        architecture=type(model.get_base_model()).__name__,
        total_params=total,
        trainable_params=trainable,
        lora_params=lora,
        extra_trainable_params=trainable - lora,
        tokens_per_step=tokens * t.grad_accum * num_processes,
        memory_gib={k: v / 2**30 for k, v in memory.items()},
    )
