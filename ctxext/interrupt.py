"""SIGTERM as Ctrl-C, so that long commands stopped by ``timeout``, a batch scheduler or ``kill``
keep what they finished: ``ctxext finetune`` saves a checkpoint, ``ctxext eval`` writes a partial
report, ``ctxext bench`` the cells it measured. They handle ``KeyboardInterrupt``; the default
SIGTERM ends Python without it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """A run stopped part-way that already wrote what it finished; ``result`` holds it (an eval
    report, a bench result), for the command line to print before it exits with 130."""

    def __init__(self, result: dict[str, Any], message: str):
        super().__init__(message)
        self.result = result


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
