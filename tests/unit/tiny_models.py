"""Tiny random-weight models of every architecture we support, built from configs (no download)."""

from __future__ import annotations

import torch

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
)


def tiny_config(arch: str, **overrides):
    """A tiny config of ``arch`` (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, bloom)."""
    import transformers as tf

    if arch == "llama":
        cfg = tf.LlamaConfig(**COMMON)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**COMMON, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**COMMON)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**COMMON, head_dim=16)
    elif arch == "gemma2":
        cfg = tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **COMMON,
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        )
    elif arch == "phi3":
        cfg = tf.Phi3Config(**COMMON, sliding_window=None)
    elif arch == "bloom":
        cfg = tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation=attn_implementation)
    return model.eval()
