"""The tiny-debug recipe with a run's paths under ``tmp_path``, for tests that fine-tune."""

from __future__ import annotations

from pathlib import Path

from ctxext.config import Recipe, load

TINY = Path(__file__).parents[2] / "recipes" / "tiny-debug.yaml"


def tiny_recipe(tmp_path: Path, *overrides: str, steps: int, save_every: int) -> Recipe:
    """``recipes/tiny-debug.yaml`` writing to ``tmp_path/run`` (data cache in ``tmp_path/cache``),
    16,384 tokens of data, ``steps`` optimizer steps, then ``overrides`` (which win)."""
    base = [
        f"train.output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_tokens=16384",
        f"train.steps={steps}",
        f"train.save_every={save_every}",
    ]
    return load(TINY, [*base, *overrides])
