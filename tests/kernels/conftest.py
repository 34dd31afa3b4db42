"""Kernel tests: the Triton backend in Triton's CPU interpreter (always) and compiled on CUDA (``gpu``).

Triton fixes interpreted vs compiled when its modules are first imported, and importing
transformers (so ``ctxext``) imports triton. So when nothing has imported triton yet and there
is no CUDA, this conftest imports triton and the kernels with ``TRITON_INTERPRET=1`` and then
restores the environment (the unit tests expect ``backend="triton"`` on CPU to fall back); the
``interpreter`` fixture sets the variable again while the interpreter tests run. When triton
was already imported compiled (a full-suite run), those tests skip here and
``test_interpreter_subprocess.py`` runs them in a child process.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

TRITON_MISSING = importlib.util.find_spec("triton") is None
NO_TRITON = 'triton is not installed: pip install "ctxext[triton]" (or the dev extra) to run the kernel tests'


def _prepare_interpreter() -> None:
    if TRITON_MISSING or torch.cuda.is_available() or "triton" in sys.modules:
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401

        import ctxext  # noqa: F401  (imports transformers, which imports more of triton)
        import ctxext._kernels  # noqa: F401
        import ctxext.attention.triton_backend  # noqa: F401
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


_prepare_interpreter()


def interpreted() -> bool:
    """Whether triton (and the kernels, if imported) run in the interpreter in this process."""
    if TRITON_MISSING:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.zeros, InterpretedFunction):
        return False
    mod = sys.modules.get("ctxext._kernels.hop_fwd")
    return mod is None or isinstance(mod.hop_fwd_kernel, InterpretedFunction)


@pytest.fixture(scope="module")
def interpreter():
    """Run this module's tests with the kernels in Triton's interpreter, on CPU tensors."""
    if TRITON_MISSING:
        pytest.skip(NO_TRITON)
    if not interpreted():
        pytest.skip("triton was imported compiled before these tests; test_interpreter_subprocess.py runs them")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # the interpreter's launch path and ops.resolve_backend read it
        import ctxext._kernels  # noqa: F401

        yield


@pytest.fixture(scope="module")
def compiled():
    """Run this module's tests with compiled kernels on CUDA tensors."""
    if TRITON_MISSING:
        pytest.skip(NO_TRITON)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if interpreted():
        pytest.skip("triton runs in interpreter mode in this process (TRITON_INTERPRET=1); run the gpu tests alone")
    import ctxext._kernels  # noqa: F401

    yield
