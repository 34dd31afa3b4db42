"""Evaluation checks on the real SmolLM2-135M that would fail if scoring were broken."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    from ctxext.evaluate.runner import ModelEntry, load_entry

    return load_entry(ModelEntry("smollm2", "smollm2", attention="sdpa"), torch.device("cpu"))


@pytest.fixture(scope="module")
def docs(smollm2):
    from ctxext.evaluate.perplexity import load_docs

    _, tokenizer = smollm2
    return load_docs("stdlib", tokenizer, max_docs=60)


def _ppl(model, chosen, length):
    from ctxext.evaluate.perplexity import document_nll, perplexity

    total = tokens = 0
    for ids in chosen:
        nll, n = document_nll(model, ids[:length])
        total, tokens = total + nll, tokens + n
    return perplexity(total, tokens)


def test_perplexity_is_sane_and_shuffling_the_context_hurts(smollm2, docs):
    model, _ = smollm2
    chosen, _ = docs.select(1024, 2)
    assert len(chosen) == 2
    ppl = _ppl(model, chosen, 1024)
    assert 1.5 < ppl < 30, ppl  # a 135M model on Python source
    rng = random.Random(0)
    shuffled = []
    for ids in chosen:
        body = ids[1:1024]
        rng.shuffle(body)
        shuffled.append(ids[:1] + body)
    assert _ppl(model, shuffled, 1024) > 3 * ppl


def test_passkey_at_1k_is_well_above_chance_and_needs_the_needle(smollm2):
    from ctxext.evaluate.retrieval import teacher_forced_correct
    from ctxext.evaluate.tasks import make_sample

    model, tokenizer = smollm2
    hits = cut = 0
    cells = [(d, t) for d in (0.1, 0.3, 0.5, 0.7, 0.9) for t in range(2)]
    for depth, trial in cells:
        s = make_sample("passkey", tokenizer, 1024, depth, seed=trial)
        hits += teacher_forced_correct(model, s.input_ids, s.answer_start)
        # Truncated context: drop the tokens holding the key (keep BOS and the question + answer).
        start = max(1, s.needle_position - 5)
        stop = s.needle_position + 40
        ids = s.input_ids[:start] + s.input_ids[stop:]
        cut += teacher_forced_correct(model, ids, s.answer_start - (stop - start))
    assert hits / len(cells) >= 0.6, hits  # chance for a 5-digit key is ~0
    assert cut / len(cells) <= 0.2, cut


def test_eval_cli_writes_report_and_plots(tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "ctxext.cli", "eval", "smollm2", "--out", str(out), "--lengths", "512,1k",
         "--tasks", "ppl,passkey", "--depths", "0.2,0.8", "--trials", "1", "--docs", "1", "--compare", "base+linear2"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [m["label"] for m in report["models"]] == ["smollm2", "base+linear2"]
    for label in ("smollm2", "base+linear2"):
        assert report["perplexity"][label]["1024"]["ppl"] > 1
    assert (out / "ppl_vs_length.png").is_file() and (out / "passkey_smollm2.png").is_file()
    assert "| smollm2 |" in (out / "report.md").read_text()
