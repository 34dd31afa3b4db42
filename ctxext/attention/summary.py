"""Learned summary queries (``summary="learned"``): the parameters tensorized attention adds.

With ``summary="learned"`` the full stream of the local hop (the summary a far query later
reads) asks the block a question of its own: the token's query plus a learned vector per
query head, rotated to the token's RoPE position. A token's own query serves its
language-model role and has no reason to look for what a later token will need; the learned
part can. It starts at zero, so a freshly converted model computes exactly what
``summary="pooled"`` computes.

Storage (DESIGN.md section 3): one ``(Hq, D)`` tensor per full-attention layer, kept on the
attention module as the parameter ``ctxext_summary_query`` and saved by ctxext in
``ctxext_summary.safetensors`` beside the model or adapter (keys ``layers.<i>``), never inside
the transformers weights file and never through remote code. ctxext's loaders attach and
fill the parameters; a model reloaded with plain ``from_pretrained`` gets them from that file
on its first forward pass (its config's ``_name_or_path`` directory).

The parameter is stored divided by ``GAIN``: Adam moves every entry by about the learning
rate per step, and queries have entries of order 1-10, so without the gain a few hundred
LoRA-rate steps could not move the summary at all.
"""

from __future__ import annotations

from pathlib import Path

import torch

PARAM = "ctxext_summary_query"
SUMMARY_FILE = "ctxext_summary.safetensors"
GAIN = 16.0


class SummaryQueryError(RuntimeError):
    """A model needs learned summary queries that cannot be found."""


def _layers(model) -> dict[int, torch.nn.Module]:
    """Full-attention modules by layer index (sliding-window layers keep exact attention)."""
    out = {}
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if idx is None or not name.endswith("attn") or not hasattr(module, "config"):
            continue
        if getattr(module, "sliding_window", None):
            continue
        out[int(idx)] = module
    return out


def _shape(module) -> tuple[int, int]:
    config = module.config
    head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads, head_dim


def attach(model, state: dict[str, torch.Tensor] | None = None) -> int:
    """Give every full-attention layer its summary query (zeros, or ``state["layers.<i>"]``).

    Existing parameters are kept unless ``state`` has a value for them. Returns the number of
    layers. Raises when ``state`` misses a layer or has the wrong shape.
    """
    layers = _layers(model)
    for idx, module in layers.items():
        param = getattr(module, PARAM, None)
        if param is None:
            weight = next(module.parameters())
            param = torch.nn.Parameter(torch.zeros(_shape(module), dtype=weight.dtype, device=weight.device))
            module.register_parameter(PARAM, param)
        if state is not None:
            key = f"layers.{idx}"
            if key not in state:
                raise SummaryQueryError(f"{SUMMARY_FILE} has no {key}: it was saved for another model")
            if tuple(state[key].shape) != tuple(param.shape):
                raise SummaryQueryError(
                    f"{SUMMARY_FILE}: {key} has shape {tuple(state[key].shape)}, the model needs {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(state[key])
    return len(layers)


def parameters(model) -> list[torch.nn.Parameter]:
    return [getattr(m, PARAM) for m in _layers(model).values() if getattr(m, PARAM, None) is not None]


def state(model) -> dict[str, torch.Tensor]:
    """``{"layers.<i>": (Hq, D)}`` for the layers that have a summary query."""
    return {
        f"layers.{i}": getattr(m, PARAM).detach().contiguous().cpu()
        for i, m in _layers(model).items()
        if getattr(m, PARAM, None) is not None
    }


def save(model, directory: Path) -> bool:
    """Write ``ctxext_summary.safetensors`` into ``directory`` when the model has summary queries."""
    from safetensors.torch import save_file

    tensors = state(model)
    if tensors:
        save_file(tensors, str(Path(directory) / SUMMARY_FILE))
    return bool(tensors)


def load(model, directory: Path) -> bool:
    """Fill the summary queries from ``directory`` (True) or do nothing when it has none (False)."""
    from safetensors.torch import load_file

    path = Path(directory) / SUMMARY_FILE
    if not path.is_file():
        return False
    attach(model, load_file(str(path)))
    return True


def without_summary(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict minus the summary queries (they live in their own file)."""
    return {k: v for k, v in state_dict.items() if not k.endswith(PARAM)}


def query_for(module) -> torch.Tensor:
    """The effective ``(Hq, D)`` summary query of an attention module (``GAIN`` times the parameter).

    A module without one (a model reloaded with plain ``from_pretrained``) gets it from
    ``ctxext_summary.safetensors`` in its config's ``_name_or_path`` directory.
    """
    param = getattr(module, PARAM, None)
    if param is None:
        from safetensors import safe_open

        source = Path(str(getattr(module.config, "_name_or_path", "") or "."))
        path = source / SUMMARY_FILE
        if not path.is_file():
            raise SummaryQueryError(
                f"this model's config sets tensorized_attention.summary='learned', but its learned summary queries "
                f"are missing: no {SUMMARY_FILE} in {source}. Load the model directory ctxext wrote (convert, "
                "finetune --merge), or set summary to 'pooled' to run without them."
            )
        with safe_open(str(path), framework="pt") as f:
            tensor = f.get_tensor(f"layers.{module.layer_idx}")
        weight = next(module.parameters())
        param = torch.nn.Parameter(tensor.to(device=weight.device, dtype=weight.dtype), requires_grad=False)
        module.register_parameter(PARAM, param)
    return param * GAIN
