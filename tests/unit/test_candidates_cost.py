"""``benchmarks/candidates_cost.py``: the two-stage choice's attention call timed at several candidate counts."""

from __future__ import annotations

import json

import pytest

from ..benchmark_script import load_benchmark


def test_each_candidate_count_is_timed_beside_sdpa_and_saved(tmp_path, capsys):
    module = load_benchmark("candidates_cost")
    out, png = tmp_path / "cost.json", tmp_path / "cost.png"
    rows = module.main(
        ["--lengths", "1k", "--candidates", "0,32,8", "--shares", "0.5", "--score-blocks", "16", "--repeats", "1",
         "--threads", "1", "--out", str(out), "--plot", str(png)]
    )  # fmt: skip
    assert [(r["n"], r["far_blocks"]) for r in rows] == [(1024, 16)]
    assert min(rows[0][k] for k in ("sdpa_s", "c0_s", "c32_s", "c8_s", "s0.5_s", "g16_s")) > 0
    saved = json.loads(out.read_text())
    assert saved["candidates"] == [0, 32, 8] and saved["shares"] == [0.5] and saved["score_blocks"] == [16]
    assert saved["command"].endswith("--plot " + str(png))
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    ratios = "| C = 0 / C = 32 | C = 8 / C = 32 | s = 0.5 / C = 32 | g = 16 / C = 32 |"
    assert ratios in printed  # ratios against the shipped 32
    header, rule = printed.splitlines()[-3:-1]
    assert header.count("|") == rule.count("|"), "one rule cell per column"
    assert "| 1,024 | 16 |" in printed


@pytest.mark.parametrize(("flag", "value", "named"), [("--candidates", "32,4", "below retrieve"),
                                                      ("--shares", "0.25,2", "--shares"),
                                                      ("--score-blocks", "16,24", "--score-blocks"),
                                                      ("--score-blocks", "64", "--score-blocks")])  # fmt: skip
def test_a_bad_choice_is_named(capsys, flag, value, named):
    with pytest.raises(SystemExit):
        load_benchmark("candidates_cost").main([flag, value])
    assert named in capsys.readouterr().err
