"""`ctxext generate` on a converted tiny model: streams, reports, refuses bad input clearly."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from ctxext.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from ctxext.attention.options import TensorizedOptions
    from ctxext.models import apply_tensorized, save_model_dir
    from ctxext.tiny import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    apply_tensorized(model, TensorizedOptions(block_sizes=(16,)))
    return save_model_dir(model, byte_tokenizer(), tmp_path_factory.mktemp("gen") / "tiny-ta")


def test_generate_streams_a_continuation_and_reports_the_cache(model_dir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def tensorized(x):\n    return x\n" * 3)
    result = runner.invoke(app, ["generate", str(model_dir), "--prompt-file", str(prompt), "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "12 new tokens" in result.stderr and "x a KV cache" in result.stderr
    assert len(result.stdout.strip()) > 0


def test_generate_with_and_without_the_cache_gives_the_same_text(model_dir):
    args = ["generate", str(model_dir), "--prompt", "The quick brown fox " * 4, "--max-new-tokens", "20"]
    cached = runner.invoke(app, args)
    uncached = runner.invoke(app, [*args, "--no-cache"])
    assert cached.exit_code == 0 and uncached.exit_code == 0
    assert cached.stdout == uncached.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        ([], "exactly one of --prompt-file"),
        (["--prompt", "a", "--prompt-file", "x.txt"], "exactly one of --prompt-file"),
        (["--prompt-file", "missing.txt"], "missing.txt: no such file"),
        (["--prompt", "a" * 4090, "--max-new-tokens", "8"], "configured maximum of 4096.*--max-length"),
        (["--prompt", "a", "--max-new-tokens", "0"], "at least 1"),
    ],
)
def test_bad_input_gets_a_clear_error(model_dir, args, match):
    result = runner.invoke(app, ["generate", str(model_dir), *args])
    assert result.exit_code == 2
    assert re.search(match, " ".join((result.output + result.stderr).split()))


def test_a_longer_maximum_can_be_asked_for(model_dir):
    result = runner.invoke(
        app, ["generate", str(model_dir), "--prompt", "a" * 4090, "--max-new-tokens", "8", "--max-length", "8192"]
    )
    assert result.exit_code == 0, result.output
