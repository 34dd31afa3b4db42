"""Activation checkpointing across transformers' rename (ctxext.checkpointing): on, off, and quiet."""

from __future__ import annotations

import warnings

from ctxext import checkpointing

from .tiny_models import tiny_model


def test_enable_and_disable_round_trip_without_deprecation_warnings():
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # our own calls use the names the installed version prefers
        assert not checkpointing.is_enabled(model)
        checkpointing.enable(model)
        assert checkpointing.is_enabled(model)
        assert all(layer.gradient_checkpointing for layer in model.model.layers)
        checkpointing.disable(model)
        assert not checkpointing.is_enabled(model)
        checkpointing.disable(model)  # off stays off


def test_renames_quiet_hides_the_rename_warnings_and_nothing_else():
    old_names = ("is_gradient_checkpointing", "gradient_checkpointing_enable", "gradient_checkpointing_disable")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with checkpointing.renames_quiet():
            for name in old_names:
                warnings.warn(f"`{name}` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
            warnings.warn("`something_else` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1)
            warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`something_else` is deprecated and will be removed in v6.",
        "`is_gradient_checkpointing` is deprecated",
    ]


def test_the_filter_matches_what_the_installed_transformers_says():
    """The old name warns exactly where transformers has the new one (5.2x on; 5.17 has only the old,
    silent); if transformers rewords its warning, the filter must follow (else peft's calls warn again)."""
    model = tiny_model("llama")
    renamed = hasattr(model, "activation_checkpointing_enable")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.is_gradient_checkpointing is False
    assert [w.category for w in caught] == ([FutureWarning] if renamed else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with checkpointing.renames_quiet():
            assert model.is_gradient_checkpointing is False
    assert caught == []
