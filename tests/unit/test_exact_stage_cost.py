"""``benchmarks/exact_stage_cost.py``: both paths of the exact stage timed on the same candidates."""

from __future__ import annotations

import json

from ctxext.attention import retrieve

from ..benchmark_script import load_benchmark


def test_both_paths_agree_and_the_path_taken_follows_the_dispatch(tmp_path, capsys):
    out, png = tmp_path / "exact.json", tmp_path / "exact.png"
    script = load_benchmark("exact_stage_cost")
    args = ["--lengths", "512,1024", "--candidates", "4", "--repeats", "1", "--threads", "1", "--out", str(out)]
    result = script.main([*args, "--plot", str(png)])
    rows = result["rows"]
    assert [(r["tokens"], r["far_blocks"]) for r in rows] == [(512, 8), (1024, 16)]
    assert retrieve.UNION_MAX_RATIO == 2, "the paths below assume union up to twice the candidates"
    assert [r["path"] for r in rows] == ["over the union", "by block"]
    assert all(r["union_s"] > 0 and r["by_block_s"] > 0 and r["max_abs_diff"] < 1e-4 for r in rows)
    assert json.loads(out.read_text())["rows"][1]["far_blocks"] == 16
    assert "| 1024 | 16 | 4 |" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp_path / "again.png"
    assert script.main(["--replot", str(out), "--plot", str(again)]) == json.loads(out.read_text())
    assert again.stat().st_size > 1000
