"""The real `ctxext finetune` CLI: two data-parallel processes train the same model, and the
SmolLM2 demo recipe trains, merges and reloads as tensorized attention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..process_tree import run_process_tree

pytestmark = pytest.mark.integration
RECIPES = Path(__file__).parents[2] / "recipes"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ctxext.cli", "finetune", *args]
    proc = run_process_tree(cmd, timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_train_the_same_model(tmp_path):
    _run(
        "--recipe",
        str(RECIPES / "tiny-debug.yaml"),
        f"accelerate.config={RECIPES / 'accelerate' / 'cpu-2proc.yaml'}",
        f"train.output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.steps=3",
        "train.save_every=0",
    )
    ranks = [json.loads((tmp_path / "run" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    assert ranks[0]["digest"] == ranks[1]["digest"], "data-parallel ranks diverged"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["tokens"] == 3 * 2 * 2 * 128 * 2  # steps x batch x accum x seq_len x ranks


def test_smollm2_demo_recipe_trains_merges_and_reloads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    import ctxext  # noqa: F401

    out = tmp_path / "run"
    proc = _run(
        "--recipe",
        str(RECIPES / "smollm2-135m-demo.yaml"),
        f"train.output_dir={out}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.seq_len=256",
        "data.max_tokens=4096",
        "train.steps=2",
        "train.save_every=0",
        "--merge",
    )
    assert "Trained 2 steps" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(1.0 < m["loss"] < 8.0 for m in metrics)  # a real LM's loss on code
    model = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert model.config._attn_implementation == "tensorized"
    assert model.config.tensorized_attention["sinks"] == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(1, 300)[None]).logits).all()
