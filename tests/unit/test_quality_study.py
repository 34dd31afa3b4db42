"""``benchmarks/quality_study.py`` end to end on the tiny model: train, evaluate, recall, report;
a second run resumes (skips finished work)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..benchmark_script import load_benchmark

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "quality_study.py"


def test_study_trains_evaluates_and_reports_on_the_tiny_model(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-debug.yaml").read_text())
    recipe["model"]["tensorized"] = {
        "block_sizes": [16],
        "causal": "complete",
        "sinks": 2,
        "local": "window",
        "merge": "mass",
        "summary": "learned",
    }
    recipe["data"].update(
        seq_len=512, retrieval=0.5, retrieval_records=2, max_tokens=8192, cache_dir=str(tmp_path / "c")
    )
    recipe["train"].update(output_dir=str(tmp_path / "run" / "tiny"), steps=2, save_every=0)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    args = [sys.executable, str(SCRIPT), "--recipes", str(tmp_path / "recipes"), "--out", str(tmp_path / "study")]
    args += ["--report-dir", str(tmp_path / "report"), "--only", "tiny", "--ppl-lengths", "256,512"]
    args += ["--passkey-lengths", "512", "--recall-blocks", "1", "--recall-length", "512", "--recall-records", "2"]
    args += ["--recall-window", "32"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    for heading in ("Perplexity against length", "Passkey", "Recall of held-out retrieval blocks"):
        assert heading in report
    assert "| tiny | block_sizes=[16]" in report and "summary=learned" in report
    for png in ("ppl_vs_length.png", "passkey.png", "recall.png", "train_loss.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000, png
    study = json.loads((tmp_path / "report" / "study.json").read_text())
    assert set(study["ppl"]["tiny"]) == {"256", "512"} and all(v > 1 for v in study["ppl"]["tiny"].values())
    recall = json.loads((tmp_path / "study" / "recall" / "tiny.json").read_text())
    assert recall["within"]["n"] + recall["beyond"]["n"] == 2

    assert f"recipes in `{tmp_path / 'recipes'}/`" in report and "| 2 | 4,096 |" in report

    again = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "ctxext finetune" not in again.stdout and "ctxext eval" not in again.stdout, "finished work is skipped"

    # a run stopped by train.max_minutes after step 1: the table shows the steps and tokens it trained
    metrics = tmp_path / "run" / "tiny" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    cut = subprocess.run([*args, "--stage", "report"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert cut.returncode == 0, cut.stderr
    assert "| 1 (of 2: train.max_minutes) | 2,048 |" in (tmp_path / "report" / "report.md").read_text()


def _study_module():
    return load_benchmark("quality_study")


def test_a_second_stage_trains_after_the_run_it_starts_from(tmp_path):
    study = _study_module()

    def recipe(name, source):
        return {"output_dir": tmp_path / name, "raw": {"model": {"source": source}}}

    recipes = {
        "stage2": recipe("stage2", str(tmp_path / "stage1" / "merged")),
        "stage1": recipe("stage1", "smollm2"),
        "other": recipe("other", "smollm2"),
    }
    waves = study.training_waves(recipes)
    assert [sorted(w) for w in waves] == [["other", "stage1"], ["stage2"]]
    recipes["stage1"]["raw"]["model"]["source"] = str(tmp_path / "stage2" / "merged")
    with pytest.raises(SystemExit, match="cycle"):
        study.training_waves(recipes)


def test_the_loss_curve_is_the_language_model_loss_of_a_distilled_run(tmp_path):
    study = _study_module()
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 1.5, "lm_loss": 2.5, "kl": 0.5}) + "\n" + json.dumps({"step": 2, "loss": 2.0})
    )
    assert study._loss_curve({"output_dir": tmp_path}) == [(1, 2.5), (2, 2.0)]
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.1, "transfer_error": 0.1}) + "\n")
    assert study._loss_curve({"output_dir": tmp_path}) == [], "an attention-transfer run has no LM loss"


def test_recall_runs_in_each_models_own_window_and_eval_settings(tmp_path):
    import argparse

    study = _study_module()

    def recipe(block, local="window", attention="tensorized"):
        ta = {"block_sizes": [block], "local": local}
        return {"output_dir": tmp_path, "raw": {"model": {"attention": attention, "tensorized": ta}}}

    recipes = {"retrieve": recipe(64), "blocky": recipe(32, local="block"), "window": recipe(128)}
    recipes["full"] = {"output_dir": tmp_path, "raw": {"model": {"attention": "sdpa"}}}
    assert [study.recall_window(recipes[k], 256) for k in ("retrieve", "blocky", "full")] == [128, 32, 256]
    models_ = study.models(recipes, with_baselines=False)
    args = argparse.Namespace(recall_blocks=1, recall_length=512, recall_records=2, recall_window=256)
    jobs = {log.stem: cmd for cmd, log in study.recall_jobs(models_, tmp_path, args, recipes)}
    assert "recall-window" in jobs and "recall-window--rope-axis-at-eval" not in jobs, "no 'recall' task, no job"
    plain = jobs["recall-retrieve"]
    assert plain[plain.index("--recall-window") + 1] == "128" and "--recall-set" not in plain
    assert jobs["recall-retrieve--rope-axis-at-eval"][-2:] == ["--recall-set", "rope=axis"]
    ordered = jobs["recall-retrieve--ordered-axis-frame-at-eval"]
    sets = [ordered[i + 1] for i, x in enumerate(ordered) if x == "--recall-set"]
    assert sets == ["rope=axis", "retrieve_frame=ordered"]
    assert study._recall_settings(sets) == {"rope": "axis", "retrieve_frame": "ordered"}
    assert study._recall_settings([]) is None
