"""Where a benchmark's model config comes from: no weights are ever read or downloaded.

``--model`` accepts a model directory, ``tiny-random:<arch>``, ``smollm2`` (the embedded
GGUF), a Hub id already in the local cache, a ``config.json``-style file, or the name of a
config shipped in ``ctxext/model_configs`` (``llama-3.1-8b``). The benchmark builds the
model from the config with random weights, so any architecture can be timed at any size.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED_DIR = "model_configs"


class BenchSourceError(ValueError):
    """The ``--model`` value names no usable config; the message says what to pass."""


def shipped_configs() -> dict[str, Any]:
    """``{name: path}`` of the configs shipped inside the package (``llama-3.1-8b``, ...)."""
    root = resources.files("ctxext") / SHIPPED_DIR
    if not root.is_dir():
        return {}
    return {p.name[: -len(".json")]: p for p in root.iterdir() if p.name.endswith(".json")}


def config_from_json(path, label: str):
    """A transformers config from a ``config.json``-style file (keys starting with ``_`` are comments)."""
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())  # a Path or an importlib Traversable
    except (OSError, json.JSONDecodeError) as err:
        raise BenchSourceError(f"--model {label}: cannot read the config file ({err})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise BenchSourceError(
            f"--model {label}: a config file must be a JSON object with a 'model_type' key (like a model's config.json)"
        )
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as err:
        raise BenchSourceError(f"--model {label}: transformers cannot build a {model_type!r} config: {err}") from None


def load_bench_config(spec: str):
    """``(config, label)`` for ``--model spec``; raises :class:`BenchSourceError` naming the fix."""
    from ..models import ModelSourceError, load_config, resolve_source
    from ..tiny import is_tiny

    shipped = shipped_configs()
    if spec in shipped:
        return config_from_json(shipped[spec], spec), f"{spec} (shipped config)"
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        return config_from_json(path, spec), f"{path.name}"
    local_ok = is_tiny(spec) or path.exists() or "/" in spec or spec.lower() in ("smollm2", "smollm2-135m", "embedded")
    if not local_ok:
        raise BenchSourceError(
            f"--model {spec}: unknown model or config name. Pass a shipped config ({', '.join(sorted(shipped))}), "
            "a config JSON file, a model directory, tiny-random:<arch>, smollm2, or a cached Hub id (user/name)."
        )
    try:
        return load_config(resolve_source(spec)), spec
    except (ModelSourceError, FileNotFoundError) as err:
        message = str(err) if str(err).startswith(spec) else f"{spec}: {err}"
        raise BenchSourceError(f"--model {message}") from None


def attention_shapes(config) -> tuple[int, int, int]:
    """``(Hq, Hkv, D)`` of the model's attention, from its config."""
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    d = getattr(config, "head_dim", None) or config.hidden_size // hq
    return hq, hkv, d
