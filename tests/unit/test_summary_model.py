"""Learned summary queries through the whole loop: convert, plain reload, fine-tune, adapter,
merged model, the eval loader; and the clear errors when they are missing or unsupported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import ctxext  # noqa: F401 - registers the attention implementation
from ctxext.attention import summary
from ctxext.cli import app
from ctxext.config import load
from ctxext.evaluate.runner import ModelEntry, load_entry
from ctxext.train import finetune
from tests.unit.test_convert import _save_source

TINY = Path(__file__).parents[2] / "recipes" / "tiny-debug.yaml"
LEARNED = "{block_sizes: [8], causal: complete, sinks: 2, local: window, merge: mass, summary: learned}"
runner = CliRunner()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_convert_writes_zero_queries_that_a_plain_reload_picks_up(tmp_path):
    src = _save_source(tmp_path / "src")
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), "--block-sizes", "8", "--sinks", "2", "--local", "window"]
    result = runner.invoke(app, [*args, "--merge", "mass", "--summary", "learned"])
    assert result.exit_code == 0, result.output
    state = load_file(str(out / summary.SUMMARY_FILE))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    layers = range(model.config.num_hidden_layers)
    assert set(state) == {f"layers.{i}.{part}" for i in layers for part in ("query", "gate")}
    assert all(t.abs().max() == 0 for t in state.values()), "a converted model starts at zero"
    weights = load_file(str(out / "model.safetensors"))
    assert not [k for k in weights if "ctxext_summary" in k], "summary parameters stay out of the transformers weights"
    ids = torch.randint(0, 127, (1, 40))
    token = AutoModelForCausalLM.from_pretrained(out).eval()
    token.config.tensorized_attention = {**token.config.tensorized_attention, "summary": "token"}
    torch.testing.assert_close(_logits(model, ids), _logits(token, ids), atol=1e-6, rtol=0)

    (out / summary.SUMMARY_FILE).unlink()
    broken = AutoModelForCausalLM.from_pretrained(out).eval()
    with pytest.raises(summary.SummaryQueryError, match="no ctxext_summary.safetensors in"):
        _logits(broken, ids)


def test_finetune_trains_saves_and_reloads_the_queries(tmp_path):
    recipe = load(
        TINY,
        [
            f"train.output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_tokens=16384",
            "train.steps=3",
            "train.save_every=0",
            f"model.tensorized={LEARNED}",
        ],
    )
    result = finetune(recipe, merge=True, log=lambda m: None)
    adapter_state = load_file(str(result.adapter_dir / summary.SUMMARY_FILE))
    merged_state = load_file(str(result.merged_dir / summary.SUMMARY_FILE))
    assert any(t.abs().max() > 0 for t in adapter_state.values()), "training must move the summary queries"
    for key, tensor in adapter_state.items():
        torch.testing.assert_close(merged_state[key], tensor)
    ids = torch.randint(0, 256, (1, 70))
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    from_adapter, _ = load_entry(ModelEntry(label="a", source=str(result.adapter_dir)), torch.device("cpu"))
    from_dir, _ = load_entry(ModelEntry(label="m", source=str(result.merged_dir)), torch.device("cpu"))
    want = _logits(merged, ids)
    torch.testing.assert_close(_logits(from_adapter, ids), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_logits(from_dir, ids), want, atol=1e-6, rtol=0)
    for p in summary.parameters(from_dir):
        p.data.zero_()
    assert (_logits(from_dir, ids) - want).abs().max() > 1e-6, "the trained queries must matter"
    settings = json.loads((result.adapter_dir / "ctxext.json").read_text())
    assert settings["tensorized_attention"]["summary"] == "learned"


def test_decode_cache_refuses_learned_summaries_clearly(tmp_path):
    src = _save_source(tmp_path / "src")
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), "--block-sizes", "8", "--merge", "lse", "--summary", "pooled"]
    assert runner.invoke(app, args).exit_code == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 127, (1, 20))
    model(ids)  # a first forward with a cache is the plain operator
    with pytest.raises(NotImplementedError, match="summary='pooled' is not supported by the decode cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False).shape == (1, 22)


def test_a_hub_model_fetches_its_summary_file(tmp_path, monkeypatch):
    import huggingface_hub

    src = _save_source(tmp_path / "src")
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), "--block-sizes", "8", "--merge", "mass", "--summary", "learned"]
    assert runner.invoke(app, args).exit_code == 0
    ids = torch.randint(0, 127, (1, 40))
    want = _logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        if repo_id != "alice/ta-model":
            raise huggingface_hub.errors.RepositoryNotFoundError("no such repository")
        return str(out / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for repo, ok in (("alice/ta-model", True), ("bob/missing", False)):
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        model.config._name_or_path = repo  # as if it came from the Hub
        if ok:
            torch.testing.assert_close(_logits(model, ids), want, atol=1e-6, rtol=0)
        else:
            with pytest.raises(summary.SummaryQueryError, match="no ctxext_summary.safetensors in bob/missing"):
                _logits(model, ids)
    assert ("alice/ta-model", summary.SUMMARY_FILE) in asked
