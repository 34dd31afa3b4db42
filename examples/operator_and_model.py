"""Tensorized attention in two ways: the operator alone, and a transformers model switched to it.

Run: python examples/operator_and_model.py   (CPU, a few seconds, no download)
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import ctxext

# 1. The operator: q (B, Hq, N, D), k and v (B, Hkv, N, D) -> (B, Hq, N, D).
torch.manual_seed(0)
q, k, v = torch.randn(1, 9, 1000, 64), torch.randn(1, 3, 1000, 64), torch.randn(1, 3, 1000, 64)
out = ctxext.tensorized_attention(q, k, v, block_sizes=[128], causal="complete", sinks=4, merge="lse")
print("operator output", tuple(out.shape))

# 2. A model: set the settings in its config and switch the attention implementation.
config = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
model = AutoModelForCausalLM.from_config(config).eval()
ids = torch.randint(0, 256, (1, 300))
with torch.no_grad():
    full = model(ids).logits
    model.config.tensorized_attention = {"block_sizes": [64], "causal": "complete"}
    model.set_attn_implementation("tensorized")
    tensorized = model(ids).logits
print("first block equal to full attention:", torch.allclose(full[:, :64], tensorized[:, :64], atol=1e-5))
print("later tokens differ by up to", f"{(full[:, 64:] - tensorized[:, 64:]).abs().max():.3f}")
