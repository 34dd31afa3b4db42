"""Activation (gradient) checkpointing across transformers' rename of its methods.

transformers 5.2x renamed ``gradient_checkpointing_enable`` / ``_disable`` / ``is_gradient_checkpointing``
to ``activation_checkpointing_*`` and made the old names warn (FutureWarning, removed in v6); 5.17, the
oldest we support, has only the old names. ctxext calls the new names where they exist, and
:func:`renames_quiet` hides the warning that peft's own calls of the old names raise (``PeftModel``
reads ``model.is_gradient_checkpointing``), which the user cannot act on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# The FutureWarning of each renamed name, e.g. "`is_gradient_checkpointing` is deprecated and will be removed in v6".
RENAME_WARNING = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"


def _renamed(model) -> bool:
    return hasattr(model, "activation_checkpointing_enable")


def enable(model) -> None:
    """Checkpoint every decoder layer of a transformers model, non-reentrant."""
    if _renamed(model):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def is_enabled(model) -> bool:
    return model.is_activation_checkpointing if _renamed(model) else model.is_gradient_checkpointing


def disable(model) -> None:
    """Turn checkpointing off (no-op when it is off)."""
    if not is_enabled(model):
        return
    if _renamed(model):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@contextmanager
def renames_quiet() -> Iterator[None]:
    """Hide only the rename warnings (peft calls the old names); every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RENAME_WARNING, category=FutureWarning)
        yield
