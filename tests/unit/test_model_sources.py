"""Classifying model sources: Hub ids, directories, GGUF files and the embedded SmolLM2."""

from __future__ import annotations

import pytest

from ctxext.embedded import smollm2_gguf_path
from ctxext.models import ModelSourceError, load_config, resolve_source


def test_hub_ids_are_recognised():
    src = resolve_source("meta-llama/Llama-3.1-8B")
    assert src.kind == "hub" and src.location == "meta-llama/Llama-3.1-8B" and src.gguf_file is None


@pytest.mark.parametrize("spec", ["./missing-dir", "/no/such/model", "weights.gguf", "a/b/c", "bad id with spaces"])
def test_paths_that_do_not_exist_are_not_sent_to_the_hub(spec):
    with pytest.raises(ModelSourceError, match="no such file or directory"):
        resolve_source(spec)


def test_offline_hub_id_fails_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="cannot read the model config of someone/not-cached-model"):
        load_config(resolve_source("someone/not-cached-model"))


def test_embedded_alias_points_at_the_gguf_in_the_wheel():
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    src = resolve_source("smollm2")
    assert src.kind == "gguf" and src.gguf_file == path.name


def test_directory_holding_only_gguf_files_names_them(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match="a.gguf"):
        resolve_source(str(tmp_path))
