"""The Triton backend's far-block choice: :func:`ctxext.attention.retrieve.far_block_index` on fused kernels.

The PyTorch choice scores queries in memory-bounded chunks, each a dozen or so operator calls
(at 131,072 tokens and 32 query heads, about 2,000 chunks a layer); the fused kernels
(``ctxext/_kernels/choose.py``) make the same choice in three launches (one for the bound alone)
and a few dozen operator calls (the per-block key bounds, the exact stage's lists of pairs),
whatever the length. Same blocks as the PyTorch choice up to rounding of the scores
(tested against it in the interpreter, ``tests/kernels``); a choice with ties may differ in which
of the tied blocks it takes.

:data:`ENABLED` switches it (``ctxext bench --no-fused-choice``); settings it does not cover
(:func:`unsupported_reason`) take the PyTorch choice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from .options import TensorizedOptions
from .retrieve import far_block_index, far_block_keys

ENABLED = True

MAX_CANDIDATES = 64  # the bound kernel keeps each query's candidates in registers (and shared memory)


def kernels_run_on(device: torch.device) -> bool:
    """Whether the fused kernels can run on ``device``: CUDA, or any device in Triton's interpreter.

    ``ctxext.bench.launches.counted_launches(run=False)`` answers True for every device while it
    counts launches without running them.
    """
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(opts: TensorizedOptions, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the fused choice cannot serve these settings (None: it can)."""
    if not ENABLED:
        return "switched off (fused_choice.ENABLED)"
    if not kernels_run_on(device):
        return f"the fused kernels run on CUDA or in Triton's interpreter (TRITON_INTERPRET=1), not on {device.type}"
    if dtype != torch.float32:
        return f"the fused choice scores in float32, got {dtype}"
    if opts.retrieve_candidate_share:
        return "retrieve_candidate_share: the fused kernels take one candidate count for every query"
    if max(opts.retrieve, opts.retrieve_candidates) > MAX_CANDIDATES:
        return f"more than {MAX_CANDIDATES} candidates"
    return None


def choose(
    qs: torch.Tensor, ks: torch.Tensor, key_ok: torch.Tensor, opts: TensorizedOptions, n: int, precision: str
) -> torch.Tensor:
    """``(B, Hq, L, top)`` int32 block numbers (``-1``: none), as ``far_block_index(...).to(int32)``.

    qs: ``(B, Hq, L, D)``, ks: ``(B, Hkv, L, D)`` in the selection frame; key_ok: ``(B, L)``;
    n: the inner block; precision: ``tl.dot``'s for the bound (``launch.dot_precision`` of the
    model's dtype). Takes the PyTorch choice where :func:`unsupported_reason` says so.
    """
    if unsupported_reason(opts, qs.dtype, qs.device) is not None:
        return far_block_index(qs, ks, key_ok, opts, n).to(torch.int32)
    from .triton_retrieve import ta_choose

    m = opts.retrieval_block
    with torch.no_grad():
        keys = far_block_keys(ks, key_ok, m, opts.retrieval_score_block)
        return ta_choose(
            qs, ks, key_ok, keys.kmax, keys.kmin, keys.sub_keys, m, n, opts.local == "window",
            min(opts.retrieve, keys.has_keys.shape[1]), opts.retrieve_candidates, precision,
        )  # fmt: skip


@contextlib.contextmanager
def switched(enabled: bool) -> Iterator[None]:
    """Run a block with :data:`ENABLED` = ``enabled``, restored afterwards."""
    global ENABLED
    old, ENABLED = ENABLED, bool(enabled)
    try:
        yield
    finally:
        ENABLED = old
