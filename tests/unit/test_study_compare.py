"""``benchmarks/study_compare.py``: one perplexity plot across study rounds, extra eval points, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "study_compare.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_plots_models_from_several_rounds_and_extra_reports(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"ppl": {"full": {"2048": 7.7, "4096": 7.4}}}))
    (tmp_path / "b.json").write_text(json.dumps({"ppl": {"x, rope=axis at eval": {"2048": 8.3}}}))
    report = {"models": [{"label": "adapter"}], "perplexity": {"adapter": {"32768": {"ppl": 7.9}}}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    out = tmp_path / "plot.png"
    done = _run(
        str(tmp_path / "a.json"),
        str(tmp_path / "b.json"),
        "--models",
        "full;x, rope=axis at eval",
        "--extra",
        f"x, rope=axis at eval={tmp_path / 'r.json'}",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"


def test_an_unknown_model_is_named_with_the_known_ones(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"ppl": {"full": {"2048": 7.7}}}))
    done = _run(str(tmp_path / "a.json"), "--models", "full;fool", "--out", str(tmp_path / "p.png"))
    assert done.returncode != 0
    assert "['fool']" in done.stderr and "full" in done.stderr and not (tmp_path / "p.png").exists()


def test_reports_alone_make_a_plot_and_nothing_at_all_is_refused(tmp_path):
    report = {"models": [{"label": "adapter"}], "perplexity": {"adapter": {"2048": {"ppl": 8.2}, "8192": {"ppl": 7.4}}}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    out = tmp_path / "plot.png"
    done = _run("--models", "8k", "--extra", f"8k={tmp_path / 'r.json'}", "--title", "by length", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    refused = _run("--models", "8k", "--out", str(tmp_path / "none.png"))
    assert refused.returncode != 0 and "--extra" in refused.stderr and not (tmp_path / "none.png").exists()
