"""``benchmarks/checkpoint_curve.py`` on a tiny run: every checkpoint is scored with its own
weights (the last one scores exactly as the saved adapter), step 0 is the model before training,
a rerun scores only new checkpoints, and another protocol is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ..benchmark_script import load_benchmark

ROOT = Path(__file__).parents[2]


def _curve_module():
    return load_benchmark("checkpoint_curve")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from ctxext import config
    from ctxext.train import finetune

    out = tmp_path_factory.mktemp("curve") / "run"
    overrides = [f"train.output_dir={out}", "train.steps=4", "train.save_every=2", "train.lr=0.01"]
    overrides += ["data.seq_len=256", "data.max_tokens=16384", f"data.cache_dir={out.parent / 'cache'}"]
    finetune(config.load(ROOT / "recipes" / "tiny-debug.yaml", overrides), log=lambda m: None)
    return out


ARGS = ["--every", "2", "--seqs", "2", "--length", "512", "--recall-blocks", "1", "--recall-records", "2"]


def test_each_checkpoint_is_scored_with_its_own_weights(tiny_run, tmp_path, capsys):
    curve = _curve_module()
    out, png = tmp_path / "curve.json", tmp_path / "curve.png"
    curve.main([str(tiny_run), *ARGS, "--out", str(out), "--plot", str(png)])
    result = json.loads(out.read_text())
    scores = result["scores"]
    assert sorted(scores, key=int) == ["0", "2", "4"]
    assert result["window"] == 16 and result["tokens_per_step"] == 256 * 2 * 2
    assert [s for s, _ in result["train_loss"]] == [1, 2, 3, 4]
    assert png.stat().st_size > 1000

    # the last checkpoint is the final adapter: the same held-out loss through `ctxext eval`'s loader
    from ctxext.evaluate.runner import ModelEntry, load_entry

    model, tok = load_entry(ModelEntry(label="a", source=str(tiny_run / "adapter")), torch.device("cpu"))
    from quality_study import held_out_tokens  # benchmarks/ is on sys.path once the script is loaded

    seqs = curve.held_out_sequences(held_out_tokens(tok, 512 + 2 * 512), 2, 512, skip=512)
    assert curve.held_out_loss(model, seqs) == pytest.approx(scores["4"]["loss"], rel=1e-5)
    # step 0 is the model before training (LoRA's B = 0, norms untouched)
    recipe = curve.load_run_recipe(tiny_run)
    before, _ = curve.build_model(recipe, None)
    assert curve.held_out_loss(before, seqs) == pytest.approx(scores["0"]["loss"], rel=1e-5)
    assert len({round(scores[s]["loss"], 4) for s in scores}) == 3, "training at lr 0.01 moves the loss"
    for row in scores.values():
        assert row["within"]["n"] + row["beyond"]["n"] == 2

    capsys.readouterr()
    curve.main([str(tiny_run), *ARGS, "--out", str(out)])
    assert "step " not in capsys.readouterr().out, "scored steps are kept, not rescored"
    with pytest.raises(SystemExit, match="another protocol"):
        curve.main([str(tiny_run), *ARGS[:-1], "3", "--out", str(out)])


def test_no_step0_scores_only_the_checkpoints(tiny_run, tmp_path):
    curve = _curve_module()
    out = tmp_path / "curve.json"
    curve.main([str(tiny_run), *ARGS, "--no-step0", "--out", str(out)])
    assert sorted(json.loads(out.read_text())["scores"], key=int) == ["2", "4"]


def test_a_directory_that_is_not_a_run_is_named(tmp_path):
    curve = _curve_module()
    with pytest.raises(SystemExit, match="no recipe.yaml"):
        curve.main([str(tmp_path), "--out", str(tmp_path / "c.json")])
