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


def test_generating_past_the_native_length_on_purpose_is_not_reminded_of_it():
    """transformers reminds once per process that a generation passed max_position_embeddings; ctxext's generation
    (the CLI after --max-length, eval's generate scoring) drops that reminder, and only that one."""
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    from ctxext.attention.options import TensorizedOptions
    from ctxext.generation import generated_answer
    from ctxext.models import apply_tensorized
    from ctxext.tiny import byte_tokenizer, tiny_model

    model, tok = tiny_model("llama"), byte_tokenizer()
    model.config.max_position_embeddings = 32  # the "native" length, passed on purpose below
    apply_tensorized(model, TensorizedOptions(block_sizes=(16,)))
    prompt = tok("the quick brown fox jumps over the lazy dog; " * 2, add_special_tokens=False).input_ids  # 90

    class Seen(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    seen = Seen()
    logger = logging.getLogger("transformers.generation.stopping_criteria")
    logger.addHandler(seen)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the suite runs with TRANSFORMERS_VERBOSITY=error
    try:
        hf_logging.get_logger("x").warning_once.cache_clear()  # the reminder is once per process
        assert len(generated_answer(model, tok, prompt, "abc")) > 0
        assert not any("friendly reminder" in m for m in seen.messages), seen.messages
        hf_logging.get_logger("x").warning_once.cache_clear()
        x = torch.tensor([prompt])
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert any("friendly reminder" in m for m in seen.messages)  # plain transformers still says it
        assert not logger.filters  # the filter was taken off again
    finally:
        logger.removeHandler(seen)
        hf_logging.set_verbosity(verbosity)
