"""Text data. Today: the default local long-text corpus (the Python standard library's sources).

It exists on any machine with Python, so the demo and the tests never need a network.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def local_text_files() -> list[Path]:
    """The Python standard library's ``.py`` files, sorted (deterministic across runs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.glob("*.py") if p.is_file()]
    if not files:
        raise FileNotFoundError(f"no Python source files found under {root}; pass your own text files instead")
    return sorted(files)


def local_text(min_chars: int) -> str:
    """At least ``min_chars`` characters of local text (standard-library sources, concatenated)."""
    parts, total = [], 0
    for path in local_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    text = "\n\n".join(parts)
    if len(text) < min_chars:
        raise ValueError(f"the local corpus holds only {len(text)} characters, fewer than the {min_chars} requested")
    return text
