"""``benchmarks/retrieval_grid.py``: retrieval grids of several eval runs merged, plotted, tabled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..benchmark_script import load_benchmark

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "retrieval_grid.py"


def _module():
    return load_benchmark("retrieval_grid")


def _report(path: Path, tasks: dict) -> Path:
    path.mkdir(parents=True)
    (path / "report.json").write_text(json.dumps({"tasks": tasks}))
    return path


SHORT = {
    "passkey": {
        "ta": {"4096": {"0.1": 1.0, "0.9": 0.0}, "2048": {"0.1": 1.0, "0.9": 1.0}},
        "full": {"2048": {"0.1": 1.0, "0.9": 1.0}},
    },
    "needle": {"ta": {"2048": {"0.1": 0.5, "0.9": "oom"}}},
}
LONG = {"passkey": {"ta": {"16384": {"0.1": 1.0}, "4096": {"0.1": 0.0, "0.9": 0.0}}}}


def test_merge_orders_lengths_and_a_later_run_replaces_a_cell():
    merged = _module().merge_reports([{"tasks": SHORT}, {"tasks": LONG}])
    assert list(merged["passkey"]["ta"]) == ["2048", "4096", "16384"]
    assert merged["passkey"]["ta"]["4096"] == {"0.1": 0.0, "0.9": 0.0}, "the later run's cell wins"
    assert merged["passkey"]["full"] == {"2048": {"0.1": 1.0, "0.9": 1.0}}
    assert merged["needle"]["ta"]["2048"] == {"0.1": 0.5, "0.9": "oom"}
    assert merged["passkey"]["ta"]["16384"] == {"0.1": 1.0, "0.9": None}, "a depth not run is None, not OOM"
    renamed = _module().merge_reports([{"tasks": SHORT}], {"ta": "tensorized"})
    assert set(renamed["passkey"]) == {"tensorized", "full"}


def test_table_counts_cells_passed_and_skips_oom():
    table = _module().markdown_table(_module().merge_reports([{"tasks": SHORT}, {"tasks": LONG}]))
    lines = table.splitlines()
    assert lines[0] == "| task | model | 2,048 | 4,096 | 16,384 |"
    assert "| passkey | ta | 2 / 2 | 0 / 2 | 1 / 1 |" in lines
    assert "| passkey | full | 2 / 2 | - | - |" in lines
    assert "| needle | ta | 0.5 / 1 | - | - |" in lines


def test_cli_writes_the_figure_and_table_and_names_a_bad_run(tmp_path):
    a, b = _report(tmp_path / "a", SHORT), _report(tmp_path / "b", LONG)
    out, table = tmp_path / "grid.png", tmp_path / "grid.md"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(a), str(b), "--out", str(out), "--table", str(table), "--rename", "ta->t=a"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "| passkey | t=a |" in table.read_text()
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "missing"), "--out", str(out)], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "missing: no report.json" in bad.stderr
