"""``benchmarks/read_paths.py``: the two ways to read the chosen far blocks, timed side by side."""

from __future__ import annotations

import json

from ctxext.attention import retrieve

from ..benchmark_script import load_benchmark


def test_both_readings_agree_and_the_shipped_path_follows_the_far_blocks(tmp_path, capsys, monkeypatch):
    module = load_benchmark("read_paths")
    monkeypatch.setattr(retrieve, "READ_UNION_MAX_RATIO", 1)  # 8 far blocks at 512 tokens: by block past 8
    out = tmp_path / "read.json"
    rows = module.main(["--lengths", "512,1024", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert [(r["n"], r["far_blocks"], r["path"]) for r in rows] == [(512, 8, "union"), (1024, 16, "by block")]
    for r in rows:
        assert r["max_abs_diff"] < 1e-5 and r["lse_max_abs_diff"] < 1e-5
        assert min(r["union_s"], r["by_block_s"], r["attention_union_s"], r["attention_default_s"]) > 0
    saved = json.loads(out.read_text())
    assert saved["rows"][1]["path"] == "by block" and saved["command"].endswith("--out " + str(out))
    assert "| 1,024 | 16 | by block |" in capsys.readouterr().out
