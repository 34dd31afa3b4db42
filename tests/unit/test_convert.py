"""`ctxext convert` on tiny local models: the result reloads and runs tensorized attention; every
bad input gets a clear error, and nothing is left half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ctxext  # noqa: F401 - registers the attention implementation
from ctxext.cli import app, parse_block_sizes
from tests.unit.tiny_models import tiny_model

runner = CliRunner()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)}
    vocab["[UNK]"] = 127
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="w0")


def _save_source(path: Path, arch: str = "llama", attn: str = "sdpa") -> Path:
    model = tiny_model(arch, attn)
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    return _save_source(tmp_path_factory.mktemp("src") / "llama")


def _convert(*args: str):
    result = runner.invoke(app, ["convert", *map(str, args)])
    return result, " ".join((result.output + (result.stderr if result.stderr_bytes is not None else "")).split())


def test_convert_writes_a_model_that_reloads_tensorized(source_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    # one retrieved block: with 8 (the default) every far block of these 40 tokens is read exactly
    result, text = _convert(
        source_dir, out, "--block-sizes", "8,4", "--sinks", "2", "--merge", "lse", "--retrieve", "1"
    )
    assert result.exit_code == 0, text
    assert "tensorized_attention" in text and "what changed" in text
    config = json.loads((out / "config.json").read_text())
    assert config["attn_implementation"] == "tensorized"
    assert config["tensorized_attention"]["block_sizes"] == [8, 4]
    assert config["tensorized_attention"]["sinks"] == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary directory left behind"

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    assert model.config._attn_implementation == "tensorized"
    assert AutoTokenizer.from_pretrained(out)("w1 w2").input_ids == [1, 2]
    ids = torch.randint(1, 120, (1, 4))  # fits one block of 4
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=2e-5, rtol=1e-4)
        long_ids = torch.randint(1, 120, (1, 40))
        assert (model(long_ids).logits - original(long_ids).logits).abs().max() > 1e-4


def test_outer_hops_are_off_unless_asked_for(source_dir, tmp_path):
    """Round 9: trained beside retrieval the outer hops added nothing, so convert leaves them out."""
    for args, hops in (((), False), (("--long-range",), True)):
        out = tmp_path / f"hops-{hops}"
        result, text = _convert(source_dir, out, "--block-sizes", "8", *args)
        assert result.exit_code == 0, text
        assert json.loads((out / "config.json").read_text())["tensorized_attention"]["long_range"] is hops


def test_axis_rope_with_outer_hops_is_converted_with_a_warning(source_dir, tmp_path):
    result, text = _convert(source_dir, tmp_path / "axis-hops", "--block-sizes", "8", "--rope", "axis", "--long-range")
    assert result.exit_code == 0, text
    assert "warning: rope=axis with long_range=true" in text and "round 9" in text
    result, text = _convert(source_dir, tmp_path / "axis", "--block-sizes", "8", "--rope", "axis")
    assert result.exit_code == 0 and "warning" not in text, text


def test_convert_with_rope_scaling(source_dir, tmp_path):
    result, text = _convert(source_dir, tmp_path / "o", "--rope-scaling", "yarn", "--rope-factor", "4")
    assert result.exit_code == 0, text
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["rope_parameters"]["factor"] == 4.0
    assert config["max_position_embeddings"] == 4096


def test_dynamic_scaling_changes_nothing_below_the_native_length():
    """Why the study's `full-dynamic` baseline trains exactly as `full` at T < native context:
    dynamic NTK scaling only changes the frequencies past max_position_embeddings."""
    from ctxext.models import apply_rope_scaling

    plain = tiny_model("llama", max_position_embeddings=64)
    scaled = tiny_model("llama", max_position_embeddings=64)
    apply_rope_scaling(scaled, "dynamic", 4.0)
    assert scaled.config.rope_parameters["rope_type"] == "dynamic"
    short, long = torch.randint(1, 120, (1, 64)), torch.randint(1, 120, (1, 96))
    with torch.no_grad():
        torch.testing.assert_close(scaled(short).logits, plain(short).logits)
        assert (scaled(long).logits - plain(long).logits).abs().max() > 1e-4  # past 64 it scales


def test_axis_rope_refuses_dynamic_scaling(source_dir, tmp_path):
    result, text = _convert(
        source_dir, tmp_path / "o", "--rope", "axis", "--rope-scaling", "dynamic", "--rope-factor", "2"
    )
    assert result.exit_code == 2
    assert "dynamic" in text and "axis" in text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--block-sizes", "0"], "positive"),
        (["--block-sizes", "2.5"], "not an integer"),
        (["--block-sizes", "abc"], "not an integer"),
        (["--causal", "sideways"], "--causal: unknown mode 'sideways'"),
        (["--rope", "relative"], "--rope: unknown mode"),
        (["--merge", "max"], "--merge"),
        (["--sinks", "-1"], "--sinks"),
        (["--rope-scaling", "linear"], "--rope-factor"),
        (["--rope-scaling", "ntk", "--rope-factor", "2"], "unknown type 'ntk'"),
        (["--dtype", "float8"], "--dtype"),
    ],
)
def test_bad_options_are_refused_before_loading(source_dir, tmp_path, args, expected):
    result, text = _convert(source_dir, tmp_path / "o", *args)
    assert result.exit_code == 2, text
    assert expected in " ".join(text.split())
    assert not (tmp_path / "o").exists()


def test_missing_path(tmp_path):
    result, text = _convert(tmp_path / "nope", tmp_path / "o")
    assert result.exit_code == 2 and "no such file or directory" in text


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    result, text = _convert(f, tmp_path / "o")
    assert result.exit_code == 2 and "not a model" in text


def test_directory_without_config(tmp_path):
    (tmp_path / "d").mkdir()
    result, text = _convert(tmp_path / "d", tmp_path / "o")
    assert result.exit_code == 2 and "without config.json" in text


@pytest.mark.parametrize("content", [b"XXXX" + b"\0" * 64, b"GGUF" + b"\x03\0\0\0" + b"\xff" * 40])
def test_corrupt_gguf(tmp_path, content):
    f = tmp_path / "model.gguf"
    f.write_bytes(content)
    result, text = _convert(f, tmp_path / "o")
    assert result.exit_code == 2
    assert "GGUF" in text
    assert not (tmp_path / "o").exists()


def test_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig

    d = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(d)
    result, text = _convert(d, tmp_path / "o")
    assert result.exit_code == 2 and "not a causal language model" in text


def test_unsupported_architecture(tmp_path):
    src = _save_source(tmp_path / "bloom", "bloom", "eager")
    result, text = _convert(src, tmp_path / "o")
    assert result.exit_code == 2 and "BloomForCausalLM" in text and "AttentionInterface" in text
    assert not (tmp_path / "o").exists()


def test_refuses_non_empty_output_without_force(source_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result, text = _convert(source_dir, out)
    assert result.exit_code == 2 and "--force" in text
    assert (out / "keep.txt").read_text() == "precious"
    result, text = _convert(source_dir, out, "--force")
    assert result.exit_code == 0, text
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failure_mid_write_leaves_the_old_directory(source_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "o"
    assert _convert(source_dir, out)[0].exit_code == 0
    before = sorted(p.name for p in out.iterdir())

    def exploding_save(self, path, *args, **kwargs):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        from ctxext.models import convert

        convert(str(source_dir), out, ctxext.TensorizedOptions(), force=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "config.json").read_text())["attn_implementation"] == "tensorized"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")], "temporary directory left behind"


def test_parse_block_sizes():
    assert parse_block_sizes("128") == (128,)
    assert parse_block_sizes("64,64") == (64, 64)
    assert parse_block_sizes("32x64") == (32, 64)
    with pytest.raises(ValueError, match="at least one"):
        parse_block_sizes(",")
