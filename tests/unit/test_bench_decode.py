"""`ctxext bench --what decode`: per-token attention time, tokens/s and cache size, side by side."""

from __future__ import annotations

import json

from ctxext.bench import BenchSpec, run_bench


def test_decode_section_measures_both_caches(tmp_path):
    spec = BenchSpec(
        model="tiny-random:llama",
        lengths="64,100",
        what="decode",
        out=tmp_path / "bench",
        options={"block_sizes": (16,)},
        warmup=1,
    )
    run_bench(spec, log=lambda _: None)
    cells = json.loads((tmp_path / "bench" / "bench.json").read_text())["cells"]
    got = {(c["mode"], c["method"], c["n"]): c for c in cells if c["section"] == "decode"}
    for n in (64, 100):
        for mode in ("attention", "model"):
            sdpa, ta = got[(mode, "sdpa", n)], got[(mode, "ta-torch", n)]
            for cell in (sdpa, ta):
                assert cell["error"] is None and cell["tokens"] == 17  # one block of 16, plus one
                assert 0 < cell["median_s"] <= cell["worst_s"]
            assert sdpa["cache_vs_kv"] == 1.0
            # 4 query heads and 2 kv heads: the full streams add Hq * D = 2 * Hkv * D per token (2x),
            # plus the slot maps and the current block's queries.
            assert 2.0 < ta["cache_vs_kv"] < 2.4
            assert "speedup_vs_sdpa" in ta
        assert got[("model", "ta-torch", n)]["tokens_per_s"] > 0
