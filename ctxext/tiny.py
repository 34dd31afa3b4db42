"""Tiny random-weight models and a byte-level tokenizer, built locally (no download).

Source spec ``tiny-random:<arch>`` (llama, mistral, qwen2, qwen3, phi3) in recipes and CLI
commands: seconds to train, for debugging a pipeline end to end. Not a language model.
"""

from __future__ import annotations

TINY_PREFIX = "tiny-random:"
TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def is_tiny(spec: str) -> bool:
    return spec.startswith(TINY_PREFIX)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus ``<eos>`` (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_config(arch: str):
    import transformers as tf

    if arch not in TINY_ARCHS:
        raise ValueError(f"{TINY_PREFIX}{arch}: unknown tiny architecture; choose one of {', '.join(TINY_ARCHS)}")
    common = dict(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=256,
    )
    cls = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "phi3": tf.Phi3Config,
    }[arch]
    config = cls(**common)
    if hasattr(config, "sliding_window") and arch in ("mistral", "phi3"):
        config.sliding_window = None
    config.architectures = [cls.__name__.replace("Config", "ForCausalLM")]
    return config


def tiny_model(arch: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch))
