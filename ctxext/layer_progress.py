"""A progress bar over the decoder layers of each long forward pass.

One evaluation pass (or a prompt's prefill) at 64k or 128k tokens can take many minutes on a CPU
and seconds on a GPU; the evaluation's own bar counts passes, so without this it sits still for
the whole pass. While :func:`layer_progress` is active, every forward pass of the model gets a
transient bar over its decoder layers that appears only once the pass has run ``delay`` seconds:
short passes (and the per-token steps of decoding) never show one, and a finished pass leaves no
line behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

# Seconds a pass runs before its bar is drawn: a CPU pass of SmolLM2 at 16k takes minutes, one at 2k
# a few seconds; on a GPU most passes end before it.
DELAY_S = 10.0


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers of a transformers causal LM (plain or wrapped by peft); None if not found."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(backbone, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


@contextmanager
def layer_progress(
    model: nn.Module, enabled: bool = True, delay: float | None = None, desc: str = "layers", file: Any = None
) -> Iterator[dict[str, int]]:
    """Show a bar over the decoder layers of every forward pass of ``model`` while inside.

    Yields the counts ``{"passes": started, "layers": finished}``, kept up to date.

    The bar of a pass opens when its first layer starts and closes after its last layer, or when
    the block exits (an error mid-pass); it is drawn only after ``delay`` seconds (:data:`DELAY_S`
    when None). Nothing happens when ``enabled`` is False or the model's layers are not found.
    file: where to draw (tqdm's default, stderr, when None). The hooks are removed on exit.
    """
    counts = {"passes": 0, "layers": 0}
    layers = decoder_layers(model) if enabled else None
    if layers is None:
        yield counts
        return
    from tqdm.auto import tqdm

    wait = DELAY_S if delay is None else delay
    bar: list[Any] = []  # the open pass's bar, if any

    def close() -> None:
        while bar:
            bar.pop().close()

    def start(*_: Any) -> None:
        close()  # a pass that raised before its last layer never closed its bar
        counts["passes"] += 1
        bar.append(tqdm(total=len(layers), desc=desc, unit="layer", leave=False, delay=wait, file=file))

    def advance(*_: Any) -> None:
        counts["layers"] += 1
        if bar:
            bar[0].update(1)

    hooks = [layers[0].register_forward_pre_hook(start)]
    hooks += [layer.register_forward_hook(advance) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(lambda *_: close()))
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()
        close()


__all__ = ["decoder_layers", "layer_progress"]
