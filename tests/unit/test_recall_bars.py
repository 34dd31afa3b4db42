"""``benchmarks/recall_bars.py``: recall beyond the window with Wilson intervals, a chart, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..benchmark_script import load_benchmark

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "recall_bars.py"


def _module():
    return load_benchmark("recall_bars")


def _recall(path: Path, hits_beyond: int, n_beyond: int) -> Path:
    rows = [{"distance": 100, "correct": True}]  # within the window: not counted
    rows += [{"distance": 300 + i, "correct": i < hits_beyond} for i in range(n_beyond)]
    path.write_text(json.dumps({"window": 256, "rows": rows}))
    return path


def test_wilson_interval_matches_a_hand_computation():
    wilson = _module().wilson
    low, high = wilson(21, 126)  # by hand: centre 0.17653, half-width 0.06486
    assert low == pytest.approx(0.1117, abs=2e-4) and high == pytest.approx(0.2414, abs=2e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_table_and_chart_count_only_records_beyond_the_window(tmp_path):
    a, b = _recall(tmp_path / "a.json", 3, 10), _recall(tmp_path / "b.json", 0, 4)
    out = tmp_path / "bars.png"
    cmd = [sys.executable, str(SCRIPT), f"first=run={a}", f"second={b}", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| first=run | 30.0% (3 / 10) |" in done.stdout and "| second | 0.0% (0 / 4) |" in done.stdout
    assert out.stat().st_size > 1000
    assert "| second | - | - | not the same records" in done.stdout  # 10 records against 4: no pairing


def test_a_run_without_a_label_is_refused(tmp_path):
    a = _recall(tmp_path / "a.json", 1, 2)
    done = subprocess.run([sys.executable, str(SCRIPT), str(a), "--out", str(tmp_path / "x.png")], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode != 0 and "expected LABEL=path/to/recall.json" in done.stderr


def test_beyond_compares_runs_with_different_windows_on_the_same_records(tmp_path):
    path = tmp_path / "r.json"  # window 128: records at 200 count, unless --beyond 256 drops them
    rows = [{"distance": 100, "correct": True}, {"distance": 200, "correct": True}, {"distance": 200, "correct": False}]
    rows += [{"distance": 400, "correct": True}, {"distance": 500, "correct": False}]
    path.write_text(json.dumps({"window": 128, "rows": rows}))
    beyond = _module().beyond
    assert beyond(path) == (2, 4)
    assert beyond(path, 256) == (1, 2)
    assert beyond(path, 64) == (2, 4)  # never nearer than the run's own window
    out = tmp_path / "bars.png"
    cmd = [sys.executable, str(SCRIPT), f"r={path}", "--beyond", "256", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "recalled beyond the window and 256 tokens" in done.stdout and "| r | 50.0% (1 / 2) |" in done.stdout


def _paired(correct: list[bool]) -> list[dict]:
    return [{"distance": 300 + i, "correct": c} for i, c in enumerate(correct)]


def test_mcnemar_counts_discordant_records_and_gives_the_exact_p():
    mcnemar = _module().mcnemar
    first = _paired([True] * 7 + [False] * 3 + [True, False])
    other = _paired([False] * 6 + [True] + [True] * 3 + [True, False])
    # discordant: 6 only in first, 3 only in other; p = 2 * P(X <= 3), X ~ Bin(9, 1/2) = 2 * 130 / 512
    only_first, only_other, p = mcnemar(first, other)
    assert (only_first, only_other) == (6, 3)
    assert p == pytest.approx(260 / 512)
    assert mcnemar(first, first) == (0, 0, 1.0)
    assert mcnemar(_paired([True] * 10), _paired([False] * 10))[2] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="not scored on the same records"):
        mcnemar(first, first[:-1])


def test_paths_with_an_equals_sign_and_the_paired_table(tmp_path):
    folder = tmp_path / "recall"
    folder.mkdir()
    a = folder / "m, rope=axis at eval.json"
    a.write_text(json.dumps({"window": 256, "rows": _paired([True, True, True, False])}))
    b = _recall(folder / "b.json", 1, 4)  # records at 300..303: the same distances as a
    cmd = [sys.executable, str(SCRIPT), f"axis={a}", f"abs={b}", "--out", str(tmp_path / "x.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| axis | 75.0% (3 / 4) |" in done.stdout
    assert "| abs | 2 | 0 | 0.5 |" in done.stdout  # 2 records only in the first; p = 2 * 1/4
    missing = subprocess.run([sys.executable, str(SCRIPT), f"x={folder}/none.json", "--out", str(tmp_path / "y.png")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode != 0 and "no recall JSON found" in missing.stderr
