"""Load a causal LM from any source (Hub id, directory, ``.gguf``), convert it, save it.

Never loads pickled weights or remote code unless asked (``allow_pickle``); a converted
model directory is written atomically and reloads with plain ``from_pretrained`` after
``import ctxext``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_directory, check_output_dir
from .attention.hf import ATTN_IMPLEMENTATION, CONFIG_KEY, with_bias_start
from .attention.options import TensorizedOptions
from .embedded import is_embedded_alias, smollm2_gguf_path
from .tiny import TINY_ARCHS, TINY_PREFIX, is_tiny

ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class ModelSourceError(ValueError):
    """The model source cannot be used; the message says why and what to do."""


class UnsupportedModelError(ValueError):
    """The architecture cannot run tensorized attention."""


@dataclass
class ModelSource:
    """Where a model comes from. kind: ``hub``, ``dir`` or ``gguf``."""

    kind: str  # hub | dir | gguf | tiny
    location: str  # Hub id, directory, or tiny architecture
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else self.location

    def pretrained_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"{path} is not a GGUF file (its header is {magic!r}, expected b'GGUF')")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except ImportError:
        raise ModelSourceError("reading .gguf files needs the gguf package: pip install gguf") from None
    except Exception as err:  # noqa: BLE001 - any parse failure means a corrupt file
        raise ModelSourceError(f"{path} is a corrupt or truncated GGUF file ({type(err).__name__}: {err})") from None


def resolve_source(spec: str) -> ModelSource:
    """Classify a model source string; raises :class:`ModelSourceError` with a fix."""
    if is_tiny(spec):
        arch = spec[len(TINY_PREFIX) :]
        if arch not in TINY_ARCHS:
            raise ModelSourceError(f"{spec}: unknown tiny architecture; choose one of {', '.join(TINY_ARCHS)}")
        return ModelSource("tiny", arch)
    if is_embedded_alias(spec):
        path = smollm2_gguf_path()
        return ModelSource("gguf", str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelSourceError(
                f"{path} is a file but not a model: pass a model directory (with config.json), a .gguf file "
                "or a Hub id such as meta-llama/Llama-3.1-8B"
            )
        _check_gguf(path)
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; it holds GGUF files ({', '.join(ggufs)}): pass one of them" if ggufs else ""
            raise ModelSourceError(f"{path} is a directory without config.json, so it is not a model directory{hint}")
        return ModelSource("dir", str(path))
    looks_like_path = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1
    if looks_like_path or not _HUB_ID.match(spec):
        raise ModelSourceError(
            f"{spec}: no such file or directory. Pass an existing model directory, a .gguf file, a Hub id "
            "(user/name) or 'smollm2' for the embedded SmolLM2-135M."
        )
    return ModelSource("hub", spec)


def load_config(source: ModelSource):
    from transformers import AutoConfig

    if source.kind == "tiny":
        from .tiny import tiny_config

        return tiny_config(source.location)
    try:
        return AutoConfig.from_pretrained(source.location, trust_remote_code=False, **source.pretrained_kwargs())
    except OSError as err:
        raise ModelSourceError(f"cannot read the model config of {source.label}: {err}") from None
    except ValueError as err:
        raise ModelSourceError(f"{source.label}: {err}") from None


def check_causal_lm(config, label: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{label} is a {config.model_type!r} model, not a causal language model; ctxext extends decoder-only "
            "causal LMs such as Llama, Mistral, Qwen2/3, Gemma or Phi-3"
        )


def load_causal_lm(
    source: ModelSource,
    *,
    dtype: str = "auto",
    attn_implementation: str | None = None,
    allow_pickle: bool = False,
    quantization_config=None,
):
    """Load ``(model, tokenizer)``; the tokenizer is None if the source has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(source)
    check_causal_lm(config, source.label)
    if source.kind == "tiny":
        from .tiny import byte_tokenizer, tiny_model

        model = tiny_model(source.location)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        if dtype != "auto":
            model = model.to(DTYPES[dtype])
        return model, byte_tokenizer()
    kwargs: dict[str, Any] = dict(source.pretrained_kwargs(), trust_remote_code=False)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if source.kind != "gguf":
        kwargs["dtype"] = DTYPES[dtype]
        if not allow_pickle:
            kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except OSError as err:
        if not allow_pickle and "safetensors" in str(err).lower():
            raise ModelSourceError(
                f"{source.label} has no safetensors weights; ctxext does not load pickled (.bin) weights unless "
                "you ask for it with --allow-pickle (only for sources you trust)"
            ) from None
        raise ModelSourceError(f"cannot load {source.label}: {err}") from None
    if source.kind == "dir":
        from .attention import summary

        summary.load(model, Path(source.location))  # learned summary queries saved beside the weights
    if source.kind == "gguf":
        _detach_dequantized_gguf(model)
        if dtype != "auto":
            model = model.to(DTYPES[dtype])
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.location, trust_remote_code=False, **source.pretrained_kwargs()
        )
    except (OSError, ValueError, KeyError):
        tokenizer = None
    return model, tokenizer


def _detach_dequantized_gguf(model) -> None:
    """A GGUF checkpoint loaded into plain float tensors is an ordinary model: drop the quantizer.

    transformers keeps a GGUF quantizer on the model (even when it dequantized every weight)
    and then refuses ``save_pretrained``. Quantized (non-float) weights are left alone.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or "gguf" not in type(quantizer).__name__.lower():
        return
    if not all(p.dtype.is_floating_point for p in model.parameters()):
        return
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "is_quantized" in vars(model):  # a plain attribute the quantizer set
        model.is_quantized = False


def attention_layer_counts(config) -> tuple[int, int]:
    """``(full-attention layers, sliding-window layers)``; TA replaces only the first kind."""
    n = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        full = sum(1 for t in layer_types if t == "full_attention")
        return full, n - full
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return 0, n
    return n, 0


def rope_scaled_parameters(config, rope_type: str, factor: float) -> dict[str, Any]:
    """The model's ``rope_parameters`` with rope scaling ``rope_type`` by ``factor``."""
    if rope_type not in ROPE_SCALING_TYPES:
        raise ModelSourceError(
            f"--rope-scaling: unknown type {rope_type!r}; choose one of {', '.join(ROPE_SCALING_TYPES)}"
        )
    if not factor or factor <= 1.0:
        raise ModelSourceError(f"--rope-factor must be > 1 for rope scaling, got {factor}")
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params["rope_theta"] = config.rope_theta
    original = params.get("original_max_position_embeddings") or config.max_position_embeddings
    params.update(rope_type=rope_type, factor=float(factor))
    if rope_type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    return params


@dataclass
class ConversionSummary:
    """What convert changed, for the CLI to print."""

    source: str
    architecture: str
    changes: list[tuple[str, Any, Any]] = field(default_factory=list)
    full_layers: int = 0
    sliding_layers: int = 0
    out: str = ""


def apply_tensorized(model, options: TensorizedOptions, rope_scaling: str | None = None, rope_factor: float = 0.0):
    """Switch a loaded model to tensorized attention in place; return the list of changes."""
    config = model.config
    arch = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{arch} does not route its attention through transformers' AttentionInterface, so tensorized "
            "attention cannot be plugged in without patching its code (which ctxext never does). Supported: "
            "architectures whose attention uses the interface, e.g. Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3."
        )
    options = with_bias_start(options.validate(), config)  # before a rope scaling changes the context
    changes: list[tuple[str, Any, Any]] = [
        ("attn_implementation", config._attn_implementation, ATTN_IMPLEMENTATION),
        (CONFIG_KEY, getattr(config, CONFIG_KEY, None), options.to_dict()),
    ]
    if rope_scaling:
        changes += apply_rope_scaling(model, rope_scaling, rope_factor)
    if options.rope == "axis":
        from .attention.rope import inv_freq_from_config

        inv_freq_from_config(config)  # refuses dynamic scaling with a clear error now, not at run time
    setattr(config, CONFIG_KEY, options.to_dict())
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if options.summary == "learned":  # zeros unless the source directory brought trained ones
        from .attention import summary

        summary.attach(model)
    return changes


def apply_rope_scaling(model, rope_scaling: str, rope_factor: float) -> list[tuple[str, Any, Any]]:
    """Set the model's own rope scaling in place (also for full-attention baselines)."""
    config = model.config
    arch = type(model).__name__
    before = dict(getattr(config, "rope_parameters", None) or {})
    after = rope_scaled_parameters(config, rope_scaling, rope_factor)
    config.rope_parameters = after
    if hasattr(config, "validate_rope"):
        try:
            config.validate_rope()
        except Exception as err:  # noqa: BLE001 - transformers raises several types here
            config.rope_parameters = before
            raise ModelSourceError(f"rope scaling {rope_scaling} x{rope_factor} is invalid for {arch}: {err}") from None
    changes: list[tuple[str, Any, Any]] = [("rope_parameters", before, after)]
    if rope_scaling != "dynamic":
        new_max = int(config.max_position_embeddings * rope_factor)
        changes.append(("max_position_embeddings", config.max_position_embeddings, new_max))
        config.max_position_embeddings = new_max
    _reset_rotary(model)
    return changes


def restore_rope(model, settings: dict) -> None:
    """Give a freshly loaded base model the RoPE a fine-tune trained with (``ctxext.json`` of an
    adapter: ``rope_parameters`` and ``max_position_embeddings``). Setting the config alone is not
    enough: rotary modules compute their frequencies when built, so they are rebuilt here."""
    params, max_pos = settings.get("rope_parameters"), settings.get("max_position_embeddings")
    if not (params or max_pos):
        return
    if params:
        model.config.rope_parameters = dict(params)
    if max_pos:
        model.config.max_position_embeddings = int(max_pos)
    _reset_rotary(model)


def _reset_rotary(model) -> None:
    """Rebuild rotary embedding modules after the rope parameters changed."""
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            new = type(module)(config=module.config).to(next(model.parameters()).device)
            setattr(parent, attr, new)


def save_model_dir(model, tokenizer, out: Path, force: bool = False) -> Path:
    """Save model + tokenizer to ``out`` atomically, writing ``attn_implementation`` explicitly.

    ``save_pretrained`` leaves ``attn_implementation`` out of config.json; without it a
    reloaded model silently runs SDPA, so it is written here.
    """
    from .attention import summary

    with atomic_directory(Path(out), force=force) as tmp:
        # Learned summary parameters go to their own file, not into the transformers weights.
        own_file = {"state_dict": summary.without_summary(model.state_dict())} if summary.parameters(model) else {}
        model.save_pretrained(tmp, safe_serialization=True, **own_file)
        summary.save(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        data = json.loads(config_path.read_text())
        data["attn_implementation"] = model.config._attn_implementation
        config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Path(out)


def convert(
    source_spec: str,
    out: Path,
    options: TensorizedOptions,
    *,
    rope_scaling: str | None = None,
    rope_factor: float = 0.0,
    dtype: str = "auto",
    force: bool = False,
    allow_pickle: bool = False,
) -> ConversionSummary:
    """Load ``source_spec``, switch it to tensorized attention, save a complete model dir at ``out``."""
    options.validate()
    check_output_dir(Path(out), force)  # fail before the (slow) load
    if dtype not in DTYPES:
        raise ModelSourceError(f"--dtype: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source = resolve_source(source_spec)
    model, tokenizer = load_causal_lm(source, dtype=dtype, allow_pickle=allow_pickle)
    if tokenizer is None:
        raise ModelSourceError(f"{source.label} has no tokenizer; a converted model directory needs one")
    changes = apply_tensorized(model, options, rope_scaling, rope_factor)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    full, sliding = attention_layer_counts(model.config)
    save_model_dir(model, tokenizer, out, force=force)
    return ConversionSummary(
        source=source.label,
        architecture=type(model).__name__,
        changes=changes,
        full_layers=full,
        sliding_layers=sliding,
        out=str(out),
    )
