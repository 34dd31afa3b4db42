"""The device-call scripts (benchmarks/gpu/*.sh) parse, and what they run exists: a typo there
costs a whole GPU session, which is rare and short (they were dry-run on the CPU with
CTXEXT_GPU_DRY=1 when written; that takes minutes and the real SmolLM2, so it is not repeated here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ctxext.cli import app
from ctxext.config import load

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "benchmarks" / "gpu").glob("*.sh"))


def test_there_are_scripts():
    assert {p.name for p in SCRIPTS} >= {"common.sh", "kernels_and_speed.sh", "train_16k.sh"}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_training_script_runs_a_valid_recipe():
    text = (ROOT / "benchmarks" / "gpu" / "train_16k.sh").read_text()
    recipe = re.search(r"RECIPE=\$\{RECIPE:-(\S+)\}", text).group(1)
    r = load(ROOT / recipe, ["train.max_minutes=3.5"])
    assert r.data.seq_len == 16384 and r.train.schedule == "constant" and r.tensorized_options().rope == "axis"


def test_the_matched_control_differs_from_the_16k_run_only_in_length():
    """Same attention, data density, lr and tokens; T = 2k instead of 16k."""
    long = load(ROOT / "recipes" / "study-gpu" / "retrieve-b64-c32-16k.yaml")
    short = load(ROOT / "recipes" / "study-gpu" / "retrieve-b64-c32-2k-matched.yaml")
    assert short.tensorized_options() == long.tensorized_options() and short.lora == long.lora
    assert (short.data.seq_len, long.data.seq_len) == (2048, 16384)
    density = [d.seq_len // d.retrieval_records for d in (short.data, long.data)]
    assert density[0] == density[1] and short.data.retrieval == long.data.retrieval
    assert short.train.steps * short.data.seq_len == 77 * long.data.seq_len  # the 16k run's 77 steps
    assert (short.train.lr, short.train.schedule) == (long.train.lr, long.train.schedule)


def test_every_bench_flag_of_the_kernel_script_exists():
    text = (ROOT / "benchmarks" / "gpu" / "kernels_and_speed.sh").read_text()
    bench_text = re.sub(r"\n[^\n]*choice_chunks\.py[^\n]*\\\n[^\n]*", "", text[text.index("SHIPPED=") :])
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", bench_text))
    usage = " ".join(CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "300"}).output.split())  # no "…"
    missing = sorted(f for f in flags if f not in usage)
    assert not missing, f"ctxext bench has no {missing}"


def test_every_flag_of_the_choice_benchmark_in_the_kernel_script_exists():
    text = (ROOT / "benchmarks" / "gpu" / "kernels_and_speed.sh").read_text()
    call = re.search(r"choice_chunks\.py([^\n]*\\\n[^\n]*)", text).group(1)
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", call))
    assert flags >= {"--lengths", "--scales", "--out"}
    usage = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "choice_chunks.py"), "--help"], capture_output=True, text=True
    ).stdout
    assert not sorted(f for f in flags if f not in usage), usage
