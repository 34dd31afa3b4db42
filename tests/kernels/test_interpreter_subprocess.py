"""Runs the interpreter tests in a child process when this process imported triton compiled.

A full-suite run imports transformers (and with it triton) before tests/kernels is collected,
which fixes triton in compiled mode; the interpreter needs ``TRITON_INTERPRET=1`` before that.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import NO_TRITON, TRITON_MISSING, interpreted

HERE = Path(__file__).resolve().parent


def test_interpreter_tests_in_a_child_process():
    if TRITON_MISSING:
        pytest.skip(NO_TRITON)
    if interpreted():
        pytest.skip("the interpreter tests run in this process (test_triton_interpreter.py)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "test_triton_interpreter.py")]
    proc = subprocess.run(cmd, cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreter tests failed in the child process:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
