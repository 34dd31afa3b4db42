"""The attention implementations a benchmark compares, and whether each can run here.

``sdpa`` (PyTorch causal SDPA, the baseline of every ratio), ``flash2`` (FlashAttention-2,
only where ``flash_attn`` is importable and the device is CUDA; never required) and one
``ta-<backend>`` per tensorized backend (``ta-torch``, ``ta-triton``, ``ta-reference``).
A method that cannot run gets an error string in each of its cells, never a crash and
never a silent fallback to another implementation.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from dataclasses import dataclass

import torch

BASELINE = "sdpa"
BASELINES = ("sdpa", "flash2")
TA_BACKENDS = ("torch", "triton", "reference")


@dataclass(frozen=True)
class Method:
    """name: label in tables; kind: ``sdpa`` | ``flash2`` | ``tensorized``; backend for ``tensorized``."""

    name: str
    kind: str
    backend: str | None = None


def flash_problem(device: torch.device) -> str | None:
    """Why FlashAttention-2 cannot run here, or None."""
    if device.type != "cuda":
        return f"FlashAttention-2 needs a CUDA device, got {device.type}"
    if importlib.util.find_spec("flash_attn") is None:
        return (
            "flash_attn is not installed: pip install flash-attn --no-build-isolation (or pip install 'ctxext[flash]')"
        )
    return None


def backend_problem(
    backend: str, device: torch.device, options=None, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> str | None:
    """Why tensorized backend ``backend`` would not run as asked, or None.

    Asks :func:`ctxext.attention.ops.resolve_backend` which backend would run for these
    settings, dtype and head dim: a request it would serve with another backend is reported
    (with the reason from its warning) instead of timing the fallback.
    """
    from ..attention import ops

    takes_settings = len(inspect.signature(ops.resolve_backend).parameters) > 2
    args = (options, dtype, head_dim) if takes_settings and options is not None else ()
    warned = getattr(ops, "_warned", set())  # its warnings fire once per process: see them here, keep the state
    saved = set(warned)
    warned.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = ops.resolve_backend(backend, device, *args)
    finally:
        warned.clear()
        warned.update(saved)
    if chosen == backend:
        return None
    why = " ".join(str(w.message) for w in caught).removeprefix("ctxext: ")
    return f"backend {backend} not available on {device.type}: resolve_backend would run {chosen}" + (
        f" ({why})" if why else ""
    )


def default_backends(device: torch.device) -> tuple[str, ...]:
    """``torch`` everywhere, plus ``triton`` on CUDA (its cells say why if the kernels are missing)."""
    return ("torch", "triton") if device.type == "cuda" else ("torch",)


def default_baselines(device: torch.device) -> tuple[str, ...]:
    """``sdpa`` always; ``flash2`` where it can run."""
    return ("sdpa", "flash2") if flash_problem(device) is None else ("sdpa",)


def build_methods(baselines, backends) -> list[Method]:
    """Baselines first (``sdpa`` always first: the ratios' reference), then ``ta-<backend>``."""
    methods = [Method(b, b) for b in sorted(set(baselines), key=BASELINES.index)]
    methods += [Method(f"ta-{b}", "tensorized", b) for b in dict.fromkeys(backends)]
    return methods


def method_problem(method: Method, device: torch.device, options=None, dtype=None, head_dim=None) -> str | None:
    """Why ``method`` cannot run on ``device`` (with these tensorized settings, dtype, head dim), or None."""
    if method.kind == "flash2":
        return flash_problem(device)
    if method.kind == "tensorized":
        return backend_problem(method.backend, device, options, dtype, head_dim)
    return None
