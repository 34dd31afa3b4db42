"""The per-pass bar over decoder layers: drawn on long passes only, closed and unhooked on exit."""

from __future__ import annotations

import io

import pytest
import torch
from tqdm import tqdm

from ctxext import layer_progress as layer_progress_mod
from ctxext.layer_progress import decoder_layers, layer_progress

from .tiny_models import tiny_model


def _hook_count(model) -> int:
    return sum(len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in decoder_layers(model))


def _forward(model, n: int = 32) -> None:
    with torch.no_grad():
        model(input_ids=torch.arange(n)[None] % 200)


def test_a_long_pass_draws_a_bar_over_every_layer_and_leaves_no_hooks():
    model = tiny_model("llama", num_hidden_layers=3)
    out = io.StringIO()
    with layer_progress(model, delay=0.0, file=out) as counts:
        assert _hook_count(model) == 5  # a pre-hook on the first layer, one per layer, one to close
        _forward(model)
        _forward(model)
    assert counts == {"passes": 2, "layers": 6}
    assert out.getvalue().count("layers:   0%") == 2  # one bar per pass, drawn at once without delay
    assert _hook_count(model) == 0
    assert not [bar for bar in tqdm._instances if bar.desc == "layers"]


def test_a_short_pass_draws_nothing_and_disabled_hooks_nothing():
    model = tiny_model("llama")
    out = io.StringIO()
    with layer_progress(model, delay=60.0, file=out) as counts:
        _forward(model)
    assert out.getvalue() == "" and counts == {"passes": 1, "layers": 2}
    with layer_progress(model, enabled=False, delay=0.0, file=out) as counts:
        assert _hook_count(model) == 0
        _forward(model)
    assert out.getvalue() == "" and counts == {"passes": 0, "layers": 0}


def test_a_pass_that_fails_midway_closes_its_bar_and_unhooks():
    model = tiny_model("llama", num_hidden_layers=3)
    failing = decoder_layers(model)[1].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"), layer_progress(model, delay=0.0, file=out) as counts:
        _forward(model)
    failing.remove()
    assert counts == {"passes": 1, "layers": 1}  # the second layer failed before its progress hook ran
    assert "layers:   0%" in out.getvalue()
    assert _hook_count(model) == 0
    assert not [bar for bar in tqdm._instances if bar.desc == "layers"]


def test_layers_are_found_through_a_peft_wrapper_and_missing_ones_are_skipped():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", num_hidden_layers=3)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert decoder_layers(wrapped) is decoder_layers(model) and len(decoder_layers(model)) == 3
    plain = torch.nn.Linear(2, 2)
    assert decoder_layers(plain) is None
    with layer_progress(plain, delay=0.0):  # nothing to hook: a no-op
        plain(torch.zeros(1, 2))


def test_eval_shows_the_layer_bar(tmp_path, monkeypatch, capsys):
    from ctxext.evaluate.runner import EvalSpec, run

    from .test_eval import _tiny_dir

    monkeypatch.setattr(layer_progress_mod, "DELAY_S", 0.0)
    spec = EvalSpec(model=str(_tiny_dir(tmp_path)), out=tmp_path / "eval", lengths=[256], tasks=["ppl"], docs=1)
    run(spec, progress=True)
    err = capsys.readouterr().err
    assert "layers:   0%" in err and "/2 [" in err  # SmolLM2's tiny cousin: 2 layers


def test_generate_shows_the_bar_on_its_passes(monkeypatch, capsys):
    from ctxext import tiny
    from ctxext.generation import generate_text

    monkeypatch.setattr(layer_progress_mod, "DELAY_S", 0.0)
    model, tokenizer = tiny.tiny_model("llama"), tiny.byte_tokenizer()
    _, stats = generate_text(model, tokenizer, "The quick brown fox " * 4, max_new_tokens=3, stream=True)
    err = capsys.readouterr().err
    assert err.count("layers:   0%") == stats.new_tokens  # the prefill, then one pass per further token
    generate_text(model, tokenizer, "The quick brown fox", max_new_tokens=3, stream=False)
    assert "layers" not in capsys.readouterr().err
