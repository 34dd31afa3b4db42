"""A stand-in that fails on one chosen call: how the tests stop a run part-way (Ctrl-C, a kill)."""

from __future__ import annotations

from collections.abc import Callable


def raising_on_call(fn: Callable, call: int, exc: BaseException) -> Callable:
    """``fn``, except that its ``call``-th call (1-based) raises ``exc`` instead of running."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc
        return fn(*args, **kwargs)

    return wrapped
