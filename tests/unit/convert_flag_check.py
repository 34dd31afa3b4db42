"""One check for a retrieval flag of ``ctxext convert``, shared by the retrieval option tests: the flag
reaches the converted model's config, changes the logits only where it can, the decode cache
matches a full forward under it, and a bad value is refused by its flag name with nothing written."""

from __future__ import annotations

from pathlib import Path

import torch


def check_convert_flag(
    tmp_path: Path, flags: list[str], key: str, value, off, same_before: int, bad_value: str, length: int = 45
) -> None:
    """Convert a tiny llama with ``--block-sizes 8`` plus ``flags`` (which set option ``key`` to
    ``value``); its logits over ``length`` random tokens must equal those with ``key = off`` before
    slot ``same_before`` and differ after it; greedy generation with the cache must equal it without;
    ``--key bad_value`` must fail naming the flag and leave no output directory."""
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from ctxext.cli import app
    from tests.unit.test_convert import _save_source

    src, out = _save_source(tmp_path / "src"), tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), "--block-sizes", "8", *flags])
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    settings = dict(model.config.tensorized_attention)
    assert settings[key] == value, f"{key}: {settings[key]!r} in the converted config, expected {value!r}"
    ids = torch.randint(0, 127, (1, length))
    with torch.no_grad():
        on = model(ids, use_cache=False).logits
        model.config.tensorized_attention = {**settings, key: off}
        plain = model(ids, use_cache=False).logits
        model.config.tensorized_attention = settings
    assert (on[0, :same_before] - plain[0, :same_before]).abs().max() < 1e-5, f"{key} acts before {same_before}"
    assert (on[0, same_before:] - plain[0, same_before:]).abs().max() > 1e-4, f"{key} changes no later logit"
    cached = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))
    flag = "--" + key.replace("_", "-")
    bad = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "bad"), *flags, flag, bad_value])
    assert bad.exit_code != 0 and flag in bad.output and not (tmp_path / "bad").exists(), bad.output


def converted_settings(tmp_path: Path, args: list[str]) -> dict:
    """``ctxext convert`` a tiny llama with ``args``; the ``tensorized_attention`` settings it wrote."""
    import json

    from typer.testing import CliRunner

    from ctxext.cli import app
    from tests.unit.test_convert import _save_source

    src, out = _save_source(tmp_path / "src"), tmp_path / "out"
    result = CliRunner().invoke(app, ["convert", str(src), str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads((out / "config.json").read_text())["tensorized_attention"]
