"""The kernels compile for an H100 (sm_90) down to a cubin, on any machine with triton (no GPU needed).

Runs ``gpu_compile.py`` in a child process: compiling needs triton imported in compiled mode,
which the interpreter tests of this process may have prevented.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import NO_TRITON, TRITON_MISSING

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90():
    if TRITON_MISSING:
        pytest.skip(NO_TRITON)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; the 3.x default
    cmd = [sys.executable, "-m", "tests.kernels.gpu_compile", "90"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"kernels failed to compile for sm_90:\n{out[-8000:]}"
    assert ", 0 failures" in proc.stdout, out[-3000:]
