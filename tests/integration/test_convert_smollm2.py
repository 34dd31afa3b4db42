"""The real CLI on the embedded SmolLM2-135M: convert, reload with plain from_pretrained, and
inside one block the logits equal the original GGUF model under full attention."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ctxext  # noqa: F401 - registers "tensorized" for from_pretrained

pytestmark = pytest.mark.integration


def test_convert_smollm2_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ctxext.models import load_causal_lm, resolve_source

    out = tmp_path / "smollm2-tensorized"
    proc = subprocess.run(
        [sys.executable, "-m", "ctxext.cli", "convert", "smollm2", str(out), "--check"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "Tensorized attention replaces 30 of 30 attention layers" in text
    assert "reloaded with attn_implementation = tensorized" in text
    assert "Perplexity before fine-tuning" in text

    config = json.loads((out / "config.json").read_text())
    assert config["attn_implementation"] == "tensorized"
    assert config["architectures"] == ["LlamaForCausalLM"]

    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert converted.config._attn_implementation == "tensorized"
    original, _ = load_causal_lm(resolve_source("smollm2"), attn_implementation="sdpa")
    original.eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("def fibonacci(n):\n    " * 12, return_tensors="pt").input_ids[:, :120]
    assert ids.shape[1] <= 128  # one block
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=1e-3, rtol=1e-3)
        # Past the window and the 8 far blocks of 64 it reads exactly (256 + 512 tokens), tensorized
        # attention differs from full attention (it is really in use).
        long_ids = torch.cat([ids] * 10, dim=1)
        assert (converted(long_ids).logits - original(long_ids).logits).abs().max() > 1e-2
