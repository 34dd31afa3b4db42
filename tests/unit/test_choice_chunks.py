"""``benchmarks/choice_chunks.py``: the far-block choice's operator calls and time against its chunk size."""

from __future__ import annotations

import json

from ctxext.attention import retrieve

from ..benchmark_script import load_benchmark


def test_larger_chunks_mean_fewer_operator_calls_and_the_same_choice(tmp_path, capsys, monkeypatch):
    module = load_benchmark("choice_chunks")
    monkeypatch.setattr(retrieve, "SELECT_SCORE_BUDGET", 1 << 14)  # several chunks at 1,024 tokens
    monkeypatch.setattr(retrieve, "EXACT_SCORE_BUDGET", 1 << 15)
    out = tmp_path / "chunks.json"
    rows = module.main(["--lengths", "1k", "--scales", "1,4", "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert [(r["n"], r["scale"]) for r in rows] == [(1024, 1), (1024, 4)]
    assert rows[1]["op_calls"] < rows[0]["op_calls"] and all(r["choices_as_scale_1"] == 1.0 for r in rows)
    assert all(r["median_s"] > 0 for r in rows)
    assert json.loads(out.read_text())["rows"][1]["op_calls"] == rows[1]["op_calls"]
    assert "| 1024 | 4 |" in capsys.readouterr().out


def test_the_fused_choice_is_two_launches_at_any_length(capsys):
    """Without CUDA the fused row is counted, not run: the same operator calls and three launches at any length."""
    module = load_benchmark("choice_chunks")
    rows = module.main(["--lengths", "1k,2k", "--scales", "1", "--repeats", "1", "--device", "cpu", "--fused"])
    torch_rows = [r for r in rows if r["scale"] == 1]
    fused = [r for r in rows if r["scale"] == "fused"]
    assert [r["n"] for r in fused] == [1024, 2048] and all(r["launches"] == 3 for r in fused)
    assert fused[0]["op_calls"] == fused[1]["op_calls"] < torch_rows[0]["op_calls"] < torch_rows[1]["op_calls"]
    assert all(r["median_s"] is None and "choices_as_scale_1" not in r for r in fused)
    assert "| 2048 | fused | " in capsys.readouterr().out
