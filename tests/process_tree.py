"""Run a command that may launch processes of its own, killing all of them if it runs too long.

torchrun (behind ``accelerate launch``) starts each rank in a session of its own, so on a timeout
``subprocess.run`` kills only the launcher it started and a hung rank lives on, holding the
launcher's port for the tests after it (seen once, round 26).
"""

from __future__ import annotations

import contextlib
import subprocess

import psutil  # accelerate's dependency
import pytest


def run_process_tree(cmd: list[str], *, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured (text); past ``timeout`` seconds the process and every
    descendant are killed and the test fails with the output so far."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            root = psutil.Process(child.pid)
            for member in [*root.children(recursive=True), root]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            stdout, stderr = child.communicate()
            pytest.fail(
                f"{' '.join(cmd[:6])} ... ran past {timeout} s and was killed:\n{stdout[-3000:]}{stderr[-3000:]}"
            )
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
