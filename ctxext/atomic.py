"""Write a directory atomically: build it beside the target, then rename into place.

A crash or error mid-write leaves the old directory (or nothing) where the target was,
never a half-written model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    """The output directory exists and is not empty, and overwriting was not asked for."""


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless ``force``; refuse a file where a directory should go."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file, not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} exists and is not empty; pass --force to replace it, or choose another path")


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``.

    On any exception the temporary directory is removed and ``out`` is untouched.
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any new directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, backup)
    try:
        os.replace(tmp, out)
    except BaseException:
        if backup is not None:
            os.replace(backup, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
