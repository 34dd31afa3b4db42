"""Learned summary queries (``summary="learned"``): the parameters tensorized attention adds.

With ``summary="learned"`` two things are learned per full-attention layer and query head:

* a **summary query** ``(Hq, D)``: the full stream of the local hop (the summary a far query
  later reads) asks the block the token's query plus this vector, rotated to the token's
  RoPE position. A token's own query serves its language-model role and has no reason to
  look for what a later token will need; the learned part can.
* a **key gate** ``(Hq,)``: a far entry is keyed by ``own key + gate * (pooled key - own
  key)``, moving from one arbitrary token's key towards the keys its summary attends to.

Both start at zero, so a freshly converted model computes exactly ``summary="token"`` and
fine-tuning opens the new paths only as far as they help. (Pure pooled keys from the start,
``summary="pooled"``, disturb the pretrained model badly: averaged keys keep the large shared
component of the keys, so far entries take much more of the softmax; the first training
loss on SmolLM2 was 4.0 against 3.0 for the window-only control.)

Storage (DESIGN.md section 3): kept on the attention module as the parameters
``ctxext_summary_query`` and ``ctxext_summary_gate``, saved by ctxext in
``ctxext_summary.safetensors`` beside the model or adapter (keys ``layers.<i>.query`` and
``layers.<i>.gate``), never inside the transformers weights file and never through remote
code. ctxext's loaders attach and fill them; a model reloaded with plain ``from_pretrained``
gets them from that file on its first forward pass (its config's ``_name_or_path``).

Both are stored divided by ``GAIN``: Adam moves every entry by about the learning rate per
step, and query entries are of order 1-10, so without the gain a few hundred LoRA-rate steps
could not move them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

PARAMS = {"query": "ctxext_summary_query", "gate": "ctxext_summary_gate"}
SUMMARY_FILE = "ctxext_summary.safetensors"
GAIN = 16.0


class SummaryQueryError(RuntimeError):
    """A model needs learned summary parameters that cannot be found."""


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


def _shapes(module) -> dict[str, tuple[int, ...]]:
    config = module.config
    head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = config.num_attention_heads
    return {"query": (heads, head_dim), "gate": (heads,)}


def attach(model, state: dict[str, torch.Tensor] | None = None) -> int:
    """Give every full-attention layer its summary query and key gate (zeros, or from ``state``).

    ``state`` maps ``layers.<i>.query`` / ``layers.<i>.gate`` to tensors. Existing parameters
    are kept unless ``state`` has values for them. Returns the number of layers. Raises when
    ``state`` misses a layer or has a wrong shape.
    """
    layers = _layers(model)
    for idx, module in layers.items():
        weight = next(module.parameters())
        for part, shape in _shapes(module).items():
            param = getattr(module, PARAMS[part], None)
            if param is None:
                param = torch.nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))
                module.register_parameter(PARAMS[part], param)
            if state is None:
                continue
            key = f"layers.{idx}.{part}"
            if key not in state:
                raise SummaryQueryError(f"{SUMMARY_FILE} has no {key}: it was saved for another model")
            if tuple(state[key].shape) != shape:
                raise SummaryQueryError(
                    f"{SUMMARY_FILE}: {key} has shape {tuple(state[key].shape)}, the model needs {shape}"
                )
            with torch.no_grad():
                param.copy_(state[key])
    return len(layers)


def parameters(model) -> list[torch.nn.Parameter]:
    return [getattr(m, n) for m in _layers(model).values() for n in PARAMS.values() if getattr(m, n, None) is not None]


def state(model) -> dict[str, torch.Tensor]:
    """``{"layers.<i>.query": (Hq, D), "layers.<i>.gate": (Hq,)}`` for the layers that have them."""
    return {
        f"layers.{i}.{part}": getattr(m, name).detach().contiguous().cpu()
        for i, m in _layers(model).items()
        for part, name in PARAMS.items()
        if getattr(m, name, None) is not None
    }


def save(model, directory: Path) -> bool:
    """Write ``ctxext_summary.safetensors`` into ``directory`` when the model has summary parameters."""
    from safetensors.torch import save_file

    tensors = state(model)
    if tensors:
        save_file(tensors, str(Path(directory) / SUMMARY_FILE))
    return bool(tensors)


def load(model, directory: Path) -> bool:
    """Fill the summary parameters from ``directory`` (True) or do nothing when it has none (False)."""
    from safetensors.torch import load_file

    path = Path(directory) / SUMMARY_FILE
    if not path.is_file():
        return False
    attach(model, load_file(str(path)))
    return True


def without_summary(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict minus the summary parameters (they live in their own file)."""
    return {k: v for k, v in state_dict.items() if not k.endswith(tuple(PARAMS.values()))}


def _summary_file(name: str) -> Path | None:
    """``ctxext_summary.safetensors`` of a model directory, or of a Hub repository ``name``
    (fetched through huggingface_hub, which honours ``HF_HUB_OFFLINE``), or None."""
    local = Path(name) / SUMMARY_FILE
    if local.is_file():
        return local
    if Path(name).exists() or name.count("/") != 1:
        return None
    path = _hub_summary_file(name)
    return path if path is not None and path.is_file() else None


@functools.cache
def _hub_summary_file(repo: str) -> Path | None:
    """One Hub lookup per repository and process (every layer asks; the answer does not change)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, SUMMARY_FILE))
    except Exception:  # offline, no such file, no such repository: the caller explains
        return None


def arguments_for(module) -> dict[str, torch.Tensor]:
    """The operator's ``summary_query`` ``(Hq, D)`` and ``summary_gate`` ``(Hq,)`` for a module.

    ``GAIN`` times the parameters. A module without them (a model reloaded with plain
    ``from_pretrained``) gets them from ``ctxext_summary.safetensors`` in its config's
    ``_name_or_path``: a directory, or a Hub repository (downloaded beside its weights).
    """
    if getattr(module, PARAMS["query"], None) is None:
        from safetensors import safe_open

        source = str(getattr(module.config, "_name_or_path", "") or ".")
        path = _summary_file(source)
        if path is None:
            raise SummaryQueryError(
                f"this model's config sets tensorized_attention.summary='learned', but its learned summary "
                f"parameters are missing: no {SUMMARY_FILE} in {source}. Load the model directory ctxext wrote "
                "(convert, finetune --merge), or set summary to 'pooled' or 'token' to run without them."
            )
        weight = next(module.parameters())
        with safe_open(str(path), framework="pt") as f:
            for part, attr in PARAMS.items():
                tensor = f.get_tensor(f"layers.{module.layer_idx}.{part}").to(device=weight.device, dtype=weight.dtype)
                module.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=False))
    return {
        "summary_query": getattr(module, PARAMS["query"]) * GAIN,
        "summary_gate": getattr(module, PARAMS["gate"]) * GAIN,
    }
