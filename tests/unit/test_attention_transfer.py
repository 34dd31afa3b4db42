"""Attention transfer (``distill.attention_transfer``): the model runs as exact attention, each
tensorized layer records its error, and training moves only the learned summary parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ctxext.attention import summary, transfer
from ctxext.attention.options import TensorizedOptions
from ctxext.config import RecipeError
from ctxext.models import apply_tensorized
from ctxext.tiny import byte_tokenizer, tiny_model
from ctxext.train import finetune

from ..benchmark_script import load_benchmark
from .tiny_recipe import tiny_recipe

LEARNED = "{block_sizes: [8], causal: complete, sinks: 2, local: window, merge: mass, summary: learned}"


def _models():
    exact = tiny_model("llama").float().eval()
    exact.set_attn_implementation("sdpa")
    ta = tiny_model("llama").float().eval()
    apply_tensorized(ta, TensorizedOptions.from_dict(yaml.safe_load(LEARNED)))
    return exact, ta


def test_inside_transfer_the_model_runs_exact_attention_and_records_each_layer():
    exact, ta = _models()
    ids = torch.randint(0, exact.config.vocab_size, (2, 45))
    with torch.no_grad():
        want = exact(ids).logits
        plain = ta(ids).logits
        with transfer.attention_transfer() as errors:
            got = ta(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (plain - want).abs().max() > 1e-3  # outside, the tensorized model differs
    assert len(errors) == exact.config.num_hidden_layers
    assert all(0 < e < 1 for e in errors)
    assert not transfer.collecting()


def test_within_the_exact_window_the_error_is_zero():
    _, ta = _models()
    ids = torch.randint(0, ta.config.vocab_size, (1, 8))  # one block: tensorized attention is exact
    with torch.no_grad(), transfer.attention_transfer() as errors:
        ta(ids)
    assert max(errors) < 1e-10


def test_relative_error_ignores_padding():
    target = torch.randn(2, 3, 5, 4)
    out = target.clone()
    out[1, :, 4] += 10.0  # garbage at a padded slot
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    assert transfer.relative_error(out, target, valid) == 0
    assert transfer.relative_error(out, target) > 0


def _recipe(tmp_path: Path, *overrides: str):
    transfer_stage = [
        f"model.tensorized={LEARNED}",
        "distill.attention_transfer=true",
        "train.gradient_checkpointing=false",
        "train.lr=2e-2",
        "train.warmup_steps=0",
        "train.schedule=constant",
    ]
    return tiny_recipe(tmp_path, *transfer_stage, *overrides, steps=12, save_every=0)


def _mean_error(state, ids: list[int]) -> float:
    _, ta = _models()
    if state is not None:
        summary.attach(ta, state)
    with torch.no_grad(), transfer.attention_transfer() as errors:
        ta(torch.tensor([ids]))
    return float(torch.stack(errors).mean())


def test_transfer_training_lowers_the_error_and_moves_only_the_summary(tmp_path):
    result = finetune(_recipe(tmp_path), merge=True)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    errors = [r["transfer_error"] for r in rows]
    assert [r["loss"] for r in rows] == pytest.approx(errors)
    state = load_file(str(result.adapter_dir / summary.SUMMARY_FILE))
    # on held-out text of the same kind, the trained summaries fit exact attention better than zeros
    ids = byte_tokenizer()(Path(json.__file__).read_text()[:3000]).input_ids[:256]
    before, after = _mean_error(None, ids), _mean_error(state, ids)
    assert after < 0.9 * before, (before, after)
    assert any(t.abs().max() > 0 for t in state.values()), "the summary parts must move"
    lora = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(t.abs().max() == 0 for n, t in lora.items() if "lora_B" in n), "LoRA must stay at zero"
    base = tiny_model("llama")
    merged = load_file(str(result.merged_dir / "model.safetensors"))
    for name, tensor in base.state_dict().items():
        if name in merged:
            torch.testing.assert_close(merged[name], tensor, msg=name)  # the model's own weights are untouched


def test_transfer_settings_are_checked(tmp_path):
    with pytest.raises(RecipeError) as err:
        _recipe(
            tmp_path,
            "model.tensorized={block_sizes: [8], summary: token}",
            "distill.weight=0.5",
            "train.gradient_checkpointing=true",
        )
    text = str(err.value)
    assert "summary=learned" in text and "set distill.weight=0" in text and "gradient_checkpointing=false" in text


def test_the_transfer_error_diagnostic_reports_per_document_and_layer():
    script = load_benchmark("transfer_error")
    _, ta = _models()
    docs = [torch.randint(0, ta.config.vocab_size, (n,)) for n in (8, 40)]
    errors = script.layer_errors(ta, docs)
    assert errors.shape == (2, ta.config.num_hidden_layers)
    assert errors[0].max() < 1e-10 and errors[1].min() > 1e-4  # one block is exact; five blocks are not
