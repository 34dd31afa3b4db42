"""SIGTERM as Ctrl-C, so that long commands stopped by ``timeout``, a batch scheduler or ``kill``
keep what they finished: ``ctxext finetune`` saves a checkpoint, ``ctxext eval`` writes a partial
report. Both already handle ``KeyboardInterrupt``; the default SIGTERM ends Python without it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``KeyboardInterrupt`` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
