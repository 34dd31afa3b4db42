"""``benchmarks/select_memory.py``: the far-block choice in chunks against one chunk, in fresh processes."""

from __future__ import annotations

import json

from ..benchmark_script import load_benchmark


def test_cells_compare_the_same_choice_and_write_json(tmp_path, capsys):
    module = load_benchmark("select_memory")
    out = tmp_path / "sel.json"
    result = module.main(["--lengths", "1024", "--heads", "2,1,8", "--out", str(out)])
    row = result["rows"][0]
    assert row["length"] == 1024
    # 1024 slots, window of 2 x 128: queries from slot 256 on have far blocks of 64; 8 chosen at most
    assert 0 < row["chunked"]["chosen"] == row["one_chunk"]["chosen"] <= 2 * 1024 * 8
    assert row["chunked"]["peak_mib"] >= 0 and row["one_chunk"]["seconds"] > 0
    assert json.loads(out.read_text())["rows"][0]["chunked"]["chosen"] == row["chunked"]["chosen"]
    assert "| 1024 |" in capsys.readouterr().out
