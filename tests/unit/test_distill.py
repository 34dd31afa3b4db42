"""Distillation from a full-attention teacher (``distill:`` in recipes): the chunked loss terms
against a direct computation, and the training loop's use of the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctxext.config import RecipeError
from ctxext.loss import chunked_distill_terms, final_hidden, sequence_distill_terms
from ctxext.tiny import tiny_model
from ctxext.train import FinetuneError, finetune

from .tiny_recipe import tiny_recipe


def _pair():
    student, teacher = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    return student.float(), teacher.float().eval()


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [7, 64])
def test_terms_equal_a_direct_computation_in_any_chunking(temperature, chunk):
    student, teacher = _pair()
    ids = torch.randint(0, student.config.vocab_size, (2, 37))
    nll, kl = sequence_distill_terms(student, teacher, ids, chunk=chunk, temperature=temperature)
    logits_s = student(ids).logits[:, :-1].float()
    with torch.no_grad():
        logits_t = teacher(ids).logits[:, :-1].float()
    want_nll = F.cross_entropy(logits_s.transpose(1, 2), ids[:, 1:], reduction="none")
    want_kl = (
        F.kl_div(
            F.log_softmax(logits_s / temperature, -1),
            F.log_softmax(logits_t / temperature, -1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        * temperature**2
    )
    assert nll.shape == kl.shape == (2, 36)
    torch.testing.assert_close(nll, want_nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl, want_kl, atol=1e-5, rtol=1e-5)
    assert (kl > 0).all()


def test_gradients_of_the_chunked_terms_equal_the_direct_ones():
    student, teacher = _pair()
    ids = torch.randint(0, student.config.vocab_size, (1, 29))
    nll, kl = sequence_distill_terms(student, teacher, ids, chunk=8)
    (0.3 * nll.mean() + 0.7 * kl.mean()).backward()
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    logits_s = student(ids).logits[:, :-1].float()
    with torch.no_grad():
        logp_t = F.log_softmax(teacher(ids).logits[:, :-1].float(), -1)
    want_nll = F.cross_entropy(logits_s.transpose(1, 2), ids[:, 1:])
    want_kl = (logp_t.exp() * (logp_t - F.log_softmax(logits_s, -1))).sum(-1).mean()
    (0.3 * want_nll + 0.7 * want_kl).backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(got[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_student_equal_to_its_teacher_has_zero_kl():
    student = tiny_model("llama", seed=0).float()
    ids = torch.randint(0, student.config.vocab_size, (1, 20))
    hidden = final_hidden(student, ids)
    _, kl = chunked_distill_terms(student, student, hidden, hidden.detach(), ids, chunk=6)
    assert kl.abs().max() < 1e-5


def test_a_teacher_with_another_vocabulary_is_refused():
    student, teacher = _pair()
    teacher.resize_token_embeddings(student.config.vocab_size + 8)
    ids = torch.randint(0, student.config.vocab_size, (1, 9))
    with pytest.raises(ValueError, match="teacher's vocabulary"):
        sequence_distill_terms(student, teacher, ids)


def _recipe(tmp_path: Path, *overrides: str):
    return tiny_recipe(tmp_path, *overrides, steps=3, save_every=0)


def _metrics(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_teacher_base_is_the_untrained_model_with_full_attention(tmp_path):
    # A full-attention student starts equal to the base teacher (LoRA starts at zero): KL 0 at step 1,
    # and the objective with weight 1 is the KL alone. The tensorized student starts away from it.
    finetune(_recipe(tmp_path / "sdpa", "model.attention=sdpa", "model.tensorized={}", "distill.weight=1.0"))
    rows = _metrics(tmp_path / "sdpa")
    first_kl = rows[0]["kl"]
    assert first_kl < 1e-7 and rows[0]["lm_loss"] > 1.0
    assert [r["loss"] for r in rows] == pytest.approx([r["kl"] for r in rows])
    assert rows[-1]["kl"] > 0  # LoRA, embeddings and norms moved the student away from the teacher

    finetune(_recipe(tmp_path / "ta", "distill.weight=0.25", "distill.temperature=2.0"))
    rows = _metrics(tmp_path / "ta")
    assert rows[0]["kl"] > 1e-5  # ~2e-4: a random tiny model predicts nearly uniformly either way
    for r in rows:
        assert r["loss"] == pytest.approx(0.75 * r["lm_loss"] + 0.25 * r["kl"], rel=1e-5)


def test_without_distillation_the_metrics_hold_the_plain_loss(tmp_path):
    finetune(_recipe(tmp_path))
    rows = _metrics(tmp_path)
    assert "kl" not in rows[0] and rows[0]["loss"] > 1.0


def test_a_missing_teacher_is_a_clear_error_before_training(tmp_path):
    with pytest.raises(FinetuneError, match=r"distill.teacher"):
        finetune(_recipe(tmp_path, "distill.weight=0.5", f"distill.teacher={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bad_distill_settings_are_reported_at_once(tmp_path):
    with pytest.raises(RecipeError) as err:
        _recipe(tmp_path, "distill.weight=1.5", "distill.temperature=0", "distill.teachr=base")
    text = str(err.value)
    assert "distill.weight" in text and "distill.temperature" in text and "did you mean 'teacher'" in text
