"""`ctxext finetune` on the tiny random model: resume reproduces an uninterrupted run, Ctrl-C and
NaN keep a good checkpoint, --merge reloads as tensorized, bad input fails before training."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ctxext.train as train_mod
from ctxext import checkpointing
from ctxext.cli import app
from ctxext.data import DataError
from ctxext.train import FinetuneError, NonFiniteLossError, finetune

from .interrupting import raising_on_call
from .tiny_recipe import TINY, tiny_recipe

runner = CliRunner()


def _recipe(tmp_path: Path, *overrides: str):
    return tiny_recipe(tmp_path, *overrides, steps=6, save_every=3)


def _interrupt_at(monkeypatch, call: int, exc: BaseException):
    monkeypatch.setattr(train_mod, "_micro_loss", raising_on_call(train_mod._micro_loss, call, exc))


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    straight = finetune(_recipe(tmp_path / "a"), log=lambda m: None)
    assert len(straight.losses) == 6 and all(map(torch.isfinite, torch.tensor(straight.losses)))

    # Ctrl-C during step 5 (grad_accum 2: micro-call 9) saves a checkpoint at step 4 and stops.
    _interrupt_at(monkeypatch, 9, KeyboardInterrupt())
    first = finetune(_recipe(tmp_path / "b"), log=lambda m: None)
    assert first.interrupted and first.steps == 4 and first.adapter_dir is None
    monkeypatch.undo()
    resumed = finetune(_recipe(tmp_path / "b", "train.resume=true"), log=lambda m: None)
    assert resumed.steps == 6
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)
    a = json.loads((tmp_path / "a" / "run" / "rank-0.json").read_text())["digest"]
    b = json.loads((tmp_path / "b" / "run" / "rank-0.json").read_text())["digest"]
    assert a == b, "resumed run ended with different weights"


def test_resume_after_a_hard_stop_logs_each_step_once(tmp_path, monkeypatch):
    # killed during step 5 (no Ctrl-C handler runs): the last checkpoint is step 3, but steps 1-4
    # were logged, and a half-written line may follow; resuming trains 4-6 again
    _interrupt_at(monkeypatch, 9, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        finetune(_recipe(tmp_path), log=lambda m: None)
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    with open(metrics, "a") as fh:
        fh.write('{"step": 5, "lo')
    monkeypatch.undo()
    messages = []
    finetune(_recipe(tmp_path, "train.resume=true"), log=messages.append)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert any("at step 3 (dropped 2 metrics.jsonl lines" in m for m in messages), messages


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = train_mod._micro_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss = original(model, batch)
        return loss * float("nan") if calls["n"] >= 9 else loss

    monkeypatch.setattr(train_mod, "_micro_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 5.*last good checkpoint"):
        finetune(_recipe(tmp_path), log=lambda m: None)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step-000003"]
    assert not (tmp_path / "run" / "adapter").exists()


def test_merge_writes_a_model_that_reloads_tensorized(tmp_path):
    from transformers import AutoModelForCausalLM

    import ctxext  # noqa: F401

    result = finetune(_recipe(tmp_path, "train.steps=2", "train.save_every=0"), merge=True, log=lambda m: None)
    config = json.loads((result.merged_dir / "config.json").read_text())
    assert config["attn_implementation"] == "tensorized"
    assert config["tensorized_attention"]["block_sizes"] == [16]
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    assert merged.config._attn_implementation == "tensorized"
    settings = json.loads((result.adapter_dir / "ctxext.json").read_text())
    assert settings["attn_implementation"] == "tensorized"
    assert (result.adapter_dir / "ctxext_trainable.safetensors").is_file()

    # The merged model equals base + adapter + fully trained tensors.
    from peft import PeftModel
    from safetensors.torch import load_file

    from ctxext.tiny import tiny_model

    base = tiny_model("llama")
    base.config.tensorized_attention = {"block_sizes": [16], "causal": "complete"}
    base.set_attn_implementation("tensorized")
    with checkpointing.renames_quiet():
        peft_model = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    extra = load_file(str(result.adapter_dir / "ctxext_trainable.safetensors"))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, tensor in extra.items():
            params[name].copy_(tensor)
        ids = torch.randint(0, 256, (1, 70))
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scaling", ["linear", "yarn"])
def test_rope_scaled_adapter_evaluates_with_its_scaling(tmp_path, scaling):
    """A full-attention baseline fine-tuned with rope scaling: loading its adapter for evaluation
    must rebuild the rotary modules (setting the config alone leaves the unscaled frequencies)."""
    from transformers import AutoModelForCausalLM

    from ctxext.evaluate.runner import ModelEntry, load_entry

    overrides = ("model.attention=sdpa", "model.tensorized={}", f"model.rope_scaling={scaling}", "model.rope_factor=4")
    result = finetune(
        _recipe(tmp_path, *overrides, "train.steps=1", "train.save_every=0"), merge=True, log=lambda m: None
    )
    assert json.loads((result.adapter_dir / "ctxext.json").read_text())["rope_parameters"]["rope_type"] == scaling
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    loaded, _ = load_entry(ModelEntry(label="a", source=str(result.adapter_dir)), torch.device("cpu"))
    assert loaded.config.max_position_embeddings == merged.config.max_position_embeddings == 4 * 4096
    ids = torch.randint(0, 256, (1, 200))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, atol=1e-4, rtol=1e-4)
        # the control: the same weights without the scaling predict differently
        unscaled = AutoModelForCausalLM.from_pretrained(
            result.merged_dir,
            rope_parameters={"rope_type": "default", "rope_theta": merged.config.rope_parameters["rope_theta"]},
        ).eval()
        assert (unscaled(ids).logits - merged(ids).logits).abs().max() > 1e-3


def test_output_dir_holding_another_run_is_refused(tmp_path):
    finetune(_recipe(tmp_path, "train.steps=1", "train.save_every=0"), log=lambda m: None)
    with pytest.raises(FinetuneError, match="holds another run.*train.resume=true"):
        finetune(_recipe(tmp_path, "train.steps=1"), log=lambda m: None)
    with pytest.raises(FinetuneError, match="different model/lora/data"):
        finetune(_recipe(tmp_path, "train.steps=2", "train.resume=true", "lora.rank=8"), log=lambda m: None)


def test_non_empty_foreign_output_dir_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="not empty"):
        finetune(_recipe(tmp_path), log=lambda m: None)


@pytest.mark.parametrize(
    "setup, overrides, error, match",
    [
        (None, ["data.source=./no/such/dir"], DataError, "does not exist"),
        ("empty-dir", [], DataError, "no usable files"),
        ("jsonl", ["data.text_field=body"], DataError, "no field 'body'.*text"),
        ("short", ["data.packing=false", "data.seq_len=512"], DataError, "shorter than data.seq_len=512"),
        ("tiny-text", ["data.seq_len=4096"], DataError, "fewer than one block"),
        (None, ["lora.target_modules=[attn_proj]"], FinetuneError, "attn_proj not found"),
    ],
)
def test_bad_data_and_adapter_settings_fail_before_training(tmp_path, setup, overrides, error, match):
    data = tmp_path / "data"
    data.mkdir()
    if setup == "jsonl":
        (data / "d.jsonl").write_text('{"text": "hello world"}\n{"text": "more text"}\n')
    elif setup in ("short", "tiny-text"):
        (data / "a.txt").write_text("short document")
    if setup is not None:
        overrides = [f"data.source={data}", *overrides]
    with pytest.raises(error, match=match):
        finetune(_recipe(tmp_path, *overrides), log=lambda m: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_reports_recipe_errors_and_dry_run(tmp_path):
    result = runner.invoke(app, ["finetune", "--recipe", str(TINY), "train.stpes=3"])
    assert result.exit_code == 2
    assert "did you mean 'steps'" in result.output + result.stderr
    result = runner.invoke(app, ["finetune", "--recipe", str(TINY), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "trainable parameters" in text and re.search(r"tokens per optimizer step\W+512\b", text)
    assert "estimated peak memory" in text


def test_data_is_cached_between_runs(tmp_path):
    from ctxext.data import build_blocks
    from ctxext.tiny import byte_tokenizer

    recipe = _recipe(tmp_path)
    first = build_blocks(recipe.data, byte_tokenizer(), tmp_path / "cache")
    assert first.cache_path is not None and first.cache_path.is_file()
    second = build_blocks(recipe.data, byte_tokenizer(), tmp_path / "cache")
    assert (second.blocks == first.blocks).all() and second.cache_path == first.cache_path
    assert first.blocks.shape[1] == recipe.data.seq_len


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_qlora_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(FinetuneError, match="lora.quantize=4bit.*CUDA GPU and bitsandbytes"):
        finetune(_recipe(tmp_path, "lora.quantize=4bit"), log=lambda m: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unsupported_model_fails_before_training(tmp_path):
    from ctxext.models import UnsupportedModelError
    from tests.unit.tiny_models import tiny_model

    tiny_model("bloom", "eager").save_pretrained(tmp_path / "bloom")
    from tests.unit.test_convert import _tiny_tokenizer

    _tiny_tokenizer().save_pretrained(tmp_path / "bloom")
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM"):
        finetune(_recipe(tmp_path, f"model.source={tmp_path / 'bloom'}"), log=lambda m: None)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(("keep", "left"), [(None, [2, 3]), (1, [3]), (0, [1, 2, 3])])
def test_keep_checkpoints_decides_what_is_left_when_the_run_ends(tmp_path, keep, left):
    extra = [] if keep is None else [f"train.keep_checkpoints={keep}"]
    finetune(_recipe(tmp_path, "train.steps=3", "train.save_every=1", *extra), log=lambda m: None)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == [f"step-{s:06d}" for s in left]


def test_a_negative_keep_checkpoints_is_named():
    from ctxext import config

    with pytest.raises(config.RecipeError, match="train.keep_checkpoints: must be >= 0"):
        config.load(TINY, ["train.keep_checkpoints=-1"])


def test_max_minutes_stops_saves_as_at_the_end_and_resumes_to_the_same_losses(tmp_path, monkeypatch):
    import types

    straight = finetune(_recipe(tmp_path / "a"), log=lambda m: None)
    clock = iter([0.0])  # the start, then every later reading is an hour on
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(time=lambda: next(clock, 3600.0)))
    messages = []
    cut = finetune(_recipe(tmp_path / "b", "train.max_minutes=1"), log=messages.append)
    assert cut.out_of_time and not cut.interrupted and cut.steps == 1
    assert cut.adapter_dir is not None and (cut.adapter_dir / "adapter_config.json").is_file()
    assert any("train.max_minutes=1 reached after step 1 of 6" in m for m in messages), messages
    assert "in 6 steps unless train.max_minutes=1 stops it sooner" in messages[0], messages
    read = json.loads((tmp_path / "b" / "run" / "data.json").read_text())
    assert (read["steps"], read["sequences"]) == (1, 4), "data.json says what the cut run read (batch 2 x accum 2)"
    monkeypatch.undo()
    resumed = finetune(_recipe(tmp_path / "b", "train.resume=true"), log=lambda m: None)
    assert resumed.steps == 6 and not resumed.out_of_time
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)


def test_a_run_saved_before_a_setting_existed_resumes(tmp_path):
    import yaml

    finetune(_recipe(tmp_path, "train.steps=3"), log=lambda m: None)
    saved = tmp_path / "run" / "recipe.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["data"]["retrieval_spread"]  # as written before data.retrieval_spread existed
    saved.write_text(yaml.safe_dump(old))
    resumed = finetune(_recipe(tmp_path, "train.resume=true"), log=lambda m: None)
    assert resumed.steps == 6
    old["data"]["seed"] = 1
    saved.write_text(yaml.safe_dump(old))
    with pytest.raises(FinetuneError, match="different model/lora/data settings"):
        finetune(_recipe(tmp_path, "train.resume=true", "train.steps=8"), log=lambda m: None)


def test_a_negative_max_minutes_is_named():
    from ctxext import config

    with pytest.raises(config.RecipeError, match="train.max_minutes: must be >= 0"):
        config.load(TINY, ["train.max_minutes=-2"])


def test_loading_an_adapter_for_evaluation_raises_no_checkpointing_rename_warning(tmp_path):
    """peft reads ``model.is_gradient_checkpointing``, deprecated in transformers 5.2x: every ``ctxext
    eval`` of an adapter printed a FutureWarning the user cannot act on."""
    from ctxext.evaluate.runner import ModelEntry, load_entry

    result = finetune(_recipe(tmp_path, "train.steps=1", "train.save_every=0"), log=lambda m: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_entry(ModelEntry(label="a", source=str(result.adapter_dir)), torch.device("cpu"))
    assert not [w for w in caught if "checkpointing" in str(w.message)]


def test_the_prepared_model_is_freed_before_the_process_group_is_destroyed(tmp_path, monkeypatch):
    """Under data parallelism the prepared model is a DDP wrapper holding the process group; freed only
    after ``end_training`` destroyed the group, it ran the group's destructor with the GIL held, which
    can deadlock with gloo's worker thread (a CI run hung after saving). Checked on one process: the
    wrapper ``prepare`` returned must be gone when ``end_training`` runs."""
    import weakref

    from accelerate import Accelerator

    monkeypatch.setattr(train_mod, "_has_tensorboard", lambda: True)  # end_training runs with trackers
    prepared, alive_at_end = [], []
    original_prepare, original_end = Accelerator.prepare, Accelerator.end_training

    def prepare(self, *objects):
        out = original_prepare(self, *objects)
        prepared.extend(weakref.ref(o) for o in out if isinstance(o, torch.nn.Module))
        return out

    def end_training(self):
        alive_at_end.extend(ref() is not None for ref in prepared)
        return original_end(self)

    monkeypatch.setattr(Accelerator, "prepare", prepare)
    monkeypatch.setattr(Accelerator, "end_training", end_training)
    result = finetune(_recipe(tmp_path, "train.steps=1", "train.save_every=0"), log=lambda m: None)
    assert result.adapter_dir is not None and prepared, "the run trained, saved and prepared a model"
    assert alive_at_end == [False] * len(prepared), "the prepared wrapper outlived the process group"
