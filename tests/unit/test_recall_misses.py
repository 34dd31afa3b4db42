"""``benchmarks/recall_misses.py``: the far-block choice recorded at the query that recalls a record.

With ``retrieve`` at least the number of far blocks every eligible block is chosen, so every far
record's statement must show a chosen share of exactly 1; with one far block per query it cannot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ..benchmark_script import load_benchmark

ROOT = Path(__file__).parents[2]


def _module():
    return load_benchmark("recall_misses")


def _run_dir(tmp_path: Path, retrieve: int) -> Path:
    from ctxext import config

    run = tmp_path / f"run-r{retrieve}"
    run.mkdir()
    attention = (
        f"{{block_sizes: [16], retrieve: {retrieve}, retrieve_block: 8, local: window, sinks: 2, long_range: false}}"
    )
    overrides = [f"train.output_dir={run}", f"model.tensorized={attention}"]
    recipe = config.load(ROOT / "recipes" / "tiny-debug.yaml", overrides)
    (run / "recipe.yaml").write_text(config.dump(recipe))
    return run


ARGS = ["--steps", "0", "--length", "512", "--recall-blocks", "1", "--recall-records", "6", "--threads", "1"]


def test_every_eligible_block_chosen_gives_share_one_and_one_block_does_not(tmp_path):
    misses = _module()
    import ctxext.attention.torch_backend as tb

    original = tb.far_block_index
    all_blocks = misses.main([str(_run_dir(tmp_path, 64)), *ARGS, "--out", str(tmp_path / "all.json")])
    assert tb.far_block_index is original, "the recorder is removed afterwards"
    far = all_blocks["steps"]["0"]["rows"]
    assert far, "records stated beyond the window of 2 x 16 tokens"

    for row in far:
        assert row["chosen_share"] == 1.0 and all(x == 1.0 for x in row["per_layer"])
    one = misses.main(
        [str(_run_dir(tmp_path, 1)), *ARGS, "--out", str(tmp_path / "one.json"), "--plot", str(tmp_path / "p.png")]
    )
    shares = [r["chosen_share"] for r in one["steps"]["0"]["rows"]]
    assert len(shares) == len(far) and all(0.0 <= s <= 1.0 for s in shares) and min(shares) < 1.0
    assert len(one["steps"]["0"]["rows"][0]["per_layer"]) == one["steps"]["0"]["layers"] > 0
    summary = json.loads((tmp_path / "one.json").read_text())["steps"]["0"]["summary"]
    assert summary["recalled"]["n"] + summary["missed"]["n"] == len(far)
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_spans_and_eligibility():
    misses = _module()
    assert misses.far_blocks_of((60, 70), 64) == [0, 1] and misses.far_blocks_of((64, 70), 64) == [1]
    # query 300, blocks of 128 with a window: the local range starts at 128; block [64, 128) ends there
    assert misses.is_far((64, 70), 300, 128, 64, True) and not misses.is_far((100, 130), 300, 128, 64, True)
    calls = [torch.zeros(2, 4, 3, dtype=torch.bool) for _ in range(2)]
    calls[0][0, 3, 1] = True  # layer 0, head 0 chose block 1 for query 3
    share, per_layer = misses.chosen_share(calls, 3, [1, 2])
    assert per_layer == [0.5, 0.0] and share == pytest.approx(0.25)


def test_a_run_without_retrieval_is_refused(tmp_path):
    misses = _module()
    with pytest.raises(SystemExit, match="no far-block retrieval"):
        misses.main([str(_run_dir(tmp_path, 0)), *ARGS, "--out", str(tmp_path / "x.json")])
