"""``ctxext bench --profile``: where a cell's time goes, one extra call under ``torch.profiler``.

For each measured cell the operators and kernels of one more call, sorted by their own device
time (CPU time on a CPU), go to ``<out>/profile/<section>-<mode>-<method>-<N>.txt``. The call
runs after the timed ones (kernels compiled, caches warm) and is never part of a cell's time.
Profiling adds overhead per operator, so the table's shares are what to read, not its total.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .measure import describe_error, sync

ROWS = 30


def profile_path(out: Path, cell: dict[str, Any]) -> Path:
    return Path(out) / "profile" / f"{cell['section']}-{cell['mode']}-{cell['method']}-{cell['n']}.txt"


def profile_call(call: Callable[[], Any], device: torch.device, path: Path, title: str) -> str | None:
    """Profile one ``call`` and write its table to ``path``; returns None, or the error in one line."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        sync(device)
        with profile(activities=activities) as prof:
            call()
            sync(device)
        table = prof.key_averages().table(sort_by=sort_by, row_limit=ROWS)
    except Exception as err:  # noqa: BLE001 - a profile that fails must not lose the benchmark
        return describe_error(err)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{title}\nSorted by {sort_by}; one call after the timed ones.\n\n{table}\n")
    return None


def profile_cell(ctx, cell: dict[str, Any], call: Callable[[], Any]) -> None:
    """With ``--profile``, profile a cell that measured a time; notes the table's path in the cell."""
    if not ctx.spec.profile or not cell.get("median_s"):
        return
    path = profile_path(ctx.spec.out, cell)
    title = f"{ctx.model_label}: {cell['section']} {cell['mode']}, {cell['method']}, N={cell['n']}"
    error = profile_call(call, ctx.device, path, title)
    cell["profile"] = str(path) if error is None else f"failed: {error}"
