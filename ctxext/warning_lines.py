"""ctxext's own warnings on the command line: one ``warning: ...`` line, printed above any progress bar.

Python shows a warning as ``path:line: UserWarning: message`` plus the source line, written into the
middle of a tqdm bar. The commands wrap their long work in :func:`as_lines`; warnings from other
packages keep Python's form (their location helps their reports), and tests that record warnings
(``pytest.warns``) see them unchanged.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def is_ours(filename: str) -> bool:
    """Whether a warning was attributed to a file of this package."""
    try:
        return Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def as_lines() -> Iterator[None]:
    """Show ctxext's UserWarnings as ``warning: message`` lines on stderr while the block runs."""
    from tqdm.auto import tqdm

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and is_ours(filename):
            tqdm.write(f"warning: {message}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original
