"""Time one call and its peak memory; turn any failure (OOM included) into an error string.

Time: the first call is untimed warm-up #1 and is the call whose peak memory is read;
``warmup - 1`` more untimed calls follow, then ``repeats`` timed calls; the cell's time is
their median, in seconds (CUDA is synchronised before and after each call).

Peak memory, MiB, above what was allocated just before the first call (so inputs and
weights are not counted):

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` minus
  ``torch.cuda.memory_allocated()`` before the call.
* CPU: the resident set size (``/proc/self/statm``, as ``benchmarks/attention.py`` reads
  it), sampled every millisecond by a background thread during the call, minus the RSS
  before it (after ``gc.collect()`` and ``malloc_trim(0)``). In one process this is a lower
  bound: memory the allocator reuses without returning it to the system is not seen. For
  isolated numbers run ``benchmarks/attention.py`` (one fresh process per case).
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

CPU_MEMORY_METHOD = (
    "CPU peak memory: RSS sampled every 1 ms during the first call minus the RSS before it (after gc and "
    "malloc_trim); a lower bound, since memory reused inside the process is not seen."
)
CUDA_MEMORY_METHOD = (
    "CUDA peak memory: torch.cuda.max_memory_allocated() during the first call minus memory_allocated() before "
    "it (inputs and weights excluded)."
)


def memory_method(device: torch.device) -> str:
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device, full: bool = False) -> None:
    """Give freed memory back: between cells (young generations only: a full collection
    costs ~0.4 s once transformers is loaded; tensors are freed by reference counting) and
    after an error (``full``: a traceback's reference cycles can hold large tensors)."""
    gc.collect(2 if full else 1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager: ``peak_mib`` after exit, or None where it cannot be measured."""

    def __init__(self, device: torch.device, interval_s: float = 0.001):
        self.device = device
        self.interval_s = interval_s
        self.peak_mib: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = _rss_bytes()
        self._max = self._base
        self._stop = threading.Event()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._max:
                self._max = rss
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        if self._base is None:
            return
        self._stop.set()
        self._thread.join()
        rss = _rss_bytes() or 0
        self.peak_mib = (max(self._max, rss) - self._base) / 2**20


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes spent busy so far (``/proc/stat``), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def foreign_cpu(start: tuple[float | None, float, float]) -> float | None:
    """Share of the machine's CPU that *other* processes used since ``start`` (a noise indicator)."""
    busy0, own0, wall0 = start
    busy1, own1, wall1 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    if busy0 is None or busy1 is None or wall1 <= wall0:
        return None
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))


def cpu_clock() -> tuple[float | None, float, float]:
    return _busy_cpu_s(), _own_cpu_s(), time.perf_counter()


def describe_error(err: BaseException) -> str:
    """One line: ``OutOfMemoryError: CUDA out of memory. Tried to allocate ...``."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:300]}"


def timed(call: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call, device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def measure(
    call: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 3,
    max_call_s: float | None = None,
) -> dict[str, Any]:
    """Measure ``call``; never raises (except KeyboardInterrupt): failures become ``error``.

    Returns ``median_s`` (seconds), ``times_s`` (the timed repeats), ``first_call_s``,
    ``peak_mib``, ``over_limit``, ``foreign_cpu_frac`` (CPU: the share of the machine's CPU
    other processes used during the timed calls; these timings are only as good as it is low)
    and ``error`` (None or one line). The first call is never a cell's time: it may hold
    one-off work (Triton compiling its kernels took about 6 s of one 0.35 s call on an H200).
    When it takes longer than ``max_call_s``, one more call is timed; if that one is over the
    limit too, it is the cell's time (``timed_calls`` 1) and ``over_limit`` is True, which
    tells the sections to skip the method's longer lengths.
    """
    release(device)
    try:
        with PeakMemory(device) as mem:
            first = timed(call, device)
        times, noise, over = [], None, False
        if max_call_s is not None and first > max_call_s:
            times = [timed(call, device)]  # the first call may have been compilation
            over = times[0] > max_call_s
        if not over:
            for _ in range(max(0, warmup - 1 - len(times))):
                timed(call, device)
            clock = cpu_clock()
            times = [timed(call, device) for _ in range(max(1, repeats))]
            noise = foreign_cpu(clock) if device.type == "cpu" else None
        return {
            "median_s": statistics.median(times),
            "times_s": times,
            "timed_calls": len(times),
            "first_call_s": first,
            "peak_mib": mem.peak_mib,
            "over_limit": over,
            "foreign_cpu_frac": noise,
            "error": None,
        }
    except Exception as err:  # noqa: BLE001 - OOM and any backend failure are a cell's result, not a crash
        error = describe_error(err)
    release(device, full=True)
    return {"median_s": None, "peak_mib": None, "error": error}
