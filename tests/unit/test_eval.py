"""`ctxext eval` on tiny random models: the report has every model, task and length; bad input
fails before the long work; chunked perplexity equals one pass."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from ctxext.cli import app
from ctxext.evaluate.runner import EvalError, EvalSpec, parse_length, resolve_entries, run
from ctxext.loss import sequence_nll

runner = CliRunner()


def _tiny_dir(tmp_path):
    """A converted tiny model directory (tensorized, byte tokenizer)."""
    from ctxext.attention.options import TensorizedOptions
    from ctxext.models import apply_tensorized, save_model_dir
    from ctxext.tiny import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    apply_tensorized(model, TensorizedOptions(block_sizes=(64,)))
    return save_model_dir(model, byte_tokenizer(), tmp_path / "tiny-ta")


def _ppl_spec(tmp_path, length: int, compare: list[str]) -> EvalSpec:
    """Perplexity of the tiny tensorized model at one length, one document, against ``compare``."""
    return EvalSpec(
        model=str(_tiny_dir(tmp_path)), out=tmp_path / "eval", lengths=[length], tasks=["ppl"], docs=1, compare=compare
    )


def test_report_covers_every_model_task_and_length(tmp_path):
    model_dir = _tiny_dir(tmp_path)
    spec = EvalSpec(
        model=str(model_dir),
        out=tmp_path / "eval",
        lengths=[512, 1024],
        tasks=["ppl", "passkey", "needle", "multikey", "vartrack"],
        depths=[0.0, 0.5, 1.0],
        trials=1,
        docs=2,
        compare=["base", "base+linear2"],
    )
    report = run(spec, progress=False)
    labels = [m["label"] for m in report["models"]]
    assert labels == ["tiny-ta", "base", "base+linear2"]
    assert [m["attn_implementation"] for m in report["models"]] == ["tensorized", "sdpa", "sdpa"]
    for label in labels:
        for n in ("512", "1024"):
            cell = report["perplexity"][label][n]
            assert cell["docs"] == 2 and cell["tokens"] == 2 * (int(n) - 1)
            assert 50 < cell["ppl"] < 1000  # a random model on 257 bytes: near-uniform
        for task in ("passkey", "needle", "multikey", "vartrack"):
            assert set(report["tasks"][task][label]["1024"]) == {"0", "0.5", "1"}
    # Same weights, one block of 64 < 256: tensorized and full attention differ; linear rope differs too.
    ppl = {label: report["perplexity"][label]["1024"]["ppl"] for label in labels}
    assert len({round(v, 6) for v in ppl.values()}) == 3
    out = tmp_path / "eval"
    saved = json.loads((out / "report.json").read_text())
    assert saved["protocol"]["retrieval"]["scoring"].startswith("teacher-forced")
    md = (out / "report.md").read_text()
    assert "## Perplexity against length" in md and "| base+linear2 |" in md and "## vartrack" in md
    for png in ("ppl_vs_length.png", "passkey_tiny-ta.png", "needle_base.png", "vartrack_base_linear2.png"):
        assert (out / png).stat().st_size > 5000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lengths": [0]}, "not a positive length"),
        ({"depths": [1.5]}, "outside 0..1"),
        ({"tasks": ["ppl", "haystack"]}, "unknown task 'haystack'"),
        ({"lengths": [10**7]}, "exceed the longest document"),
        ({"lengths": [8], "tasks": ["passkey"]}, "too short for passkey"),
    ],
)
def test_bad_input_fails_before_the_long_work(tmp_path, kwargs, match):
    model_dir = _tiny_dir(tmp_path)
    spec = EvalSpec(model=str(model_dir), out=tmp_path / "eval", **{"lengths": [256], **kwargs})
    with pytest.raises(EvalError, match=match):
        run(spec, progress=False)
    assert not (tmp_path / "eval").exists()


def test_existing_output_is_refused_without_force(tmp_path):
    model_dir = _tiny_dir(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.md").write_text("old")
    with pytest.raises(EvalError, match="--force"):
        run(EvalSpec(model=str(model_dir), out=tmp_path / "eval", lengths=[256]), progress=False)
    assert (tmp_path / "eval" / "report.md").read_text() == "old"


def test_model_without_tokenizer(tmp_path):
    from ctxext.tiny import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "no-tok")
    result = runner.invoke(app, ["eval", str(tmp_path / "no-tok"), "--out", str(tmp_path / "e"), "--lengths", "256"])
    assert result.exit_code == 2 and "no tokenizer" in result.output + result.stderr


def test_chunked_perplexity_equals_one_pass():
    from ctxext.tiny import tiny_model

    model = tiny_model("llama").eval()
    ids = torch.randint(0, 256, (1, 300))
    with torch.no_grad():
        one = sequence_nll(model, ids, chunk=10_000)
        chunked = sequence_nll(model, ids, chunk=7)
        reference = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(chunked, one)
    torch.testing.assert_close(one[0], reference, atol=1e-5, rtol=1e-5)


def test_parse_length_and_compare_labels(tmp_path):
    assert parse_length("4k") == 4096 and parse_length("1000") == 1000 and parse_length("0.5k") == 512
    with pytest.raises(EvalError):
        parse_length("lots")
    spec = EvalSpec(
        model="smollm2", out=tmp_path / "e", lengths=[1024], compare=["base", "base+yarn4", "smollm2+linear2"]
    )
    entries = resolve_entries(spec)
    assert [e.label for e in entries] == ["smollm2", "base", "base+yarn4", "smollm2+linear2"]
    assert entries[2].rope == ("yarn", 4.0) and entries[2].attention == "sdpa"


def test_out_of_memory_is_recorded_not_a_crash(tmp_path, monkeypatch):
    import ctxext.evaluate.perplexity as perplexity_mod
    import ctxext.evaluate.retrieval as retrieval_mod

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(perplexity_mod, "document_nll", oom)
    monkeypatch.setattr(retrieval_mod, "teacher_forced_prediction", oom)
    model_dir = _tiny_dir(tmp_path)
    spec = EvalSpec(model=str(model_dir), out=tmp_path / "eval", lengths=[512], tasks=["ppl", "passkey"], trials=1)
    report = run(spec, progress=False)
    assert report["perplexity"]["tiny-ta"]["512"]["oom"] is True
    assert set(report["tasks"]["passkey"]["tiny-ta"]["512"].values()) == {"oom"}
    assert "OOM" in (tmp_path / "eval" / "report.md").read_text()


def test_baseline_with_another_tokenizer_scores_documents_in_its_own_tokens(tmp_path):
    """A compared model with a smaller vocabulary must not be fed the first model's token ids."""
    from tests.unit.test_convert import _save_source

    other = _save_source(tmp_path / "wordlevel", "llama")  # vocab 128, word-level tokenizer
    report = run(_ppl_spec(tmp_path, 512, [str(other)]), progress=False)
    cell = report["perplexity"]["wordlevel"]["512"]
    assert cell["docs"] == 1 and cell["tokens"] == 511 and cell["ppl"] > 1


def test_scoring_by_generation_agrees_with_teacher_forcing(tmp_path):
    from ctxext.evaluate.retrieval import teacher_forced_correct
    from ctxext.evaluate.runner import ModelEntry, load_entry
    from ctxext.generation import generated_answer_correct

    model, tokenizer = load_entry(ModelEntry("t", str(_tiny_dir(tmp_path))), torch.device("cpu"))
    prompt = tokenizer("The passkey is 12345. Remember it. " * 8).input_ids  # > one block of 64
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)[0, len(prompt) :].tolist()
    answer = tokenizer.decode(greedy)
    assert teacher_forced_correct(model, prompt + greedy, len(prompt))
    assert generated_answer_correct(model, tokenizer, prompt, answer)
    wrong = [(t + 1) % 256 + 1 for t in greedy]
    assert not teacher_forced_correct(model, prompt + wrong, len(prompt))
    assert not generated_answer_correct(model, tokenizer, prompt, tokenizer.decode(wrong) + "x")


def test_eval_can_score_retrieval_by_generation(tmp_path):
    spec = EvalSpec(
        model=str(_tiny_dir(tmp_path)),
        out=tmp_path / "eval",
        lengths=[300],
        tasks=["passkey"],
        depths=[0.5],
        trials=1,
        scoring="generate",
    )
    report = run(spec, progress=False)
    assert report["protocol"]["retrieval"]["scoring"].startswith("greedy generation")
    assert report["tasks"]["passkey"]["tiny-ta"]["300"]["0.5"] in (0.0, 1.0)
    with pytest.raises(EvalError, match="--scoring"):
        run(EvalSpec(model=spec.model, out=tmp_path / "e2", lengths=[300], scoring="beam"), progress=False)


def test_another_tensorized_model_as_baseline_keeps_its_attention(tmp_path):
    from ctxext.attention.options import TensorizedOptions
    from ctxext.models import apply_tensorized, save_model_dir
    from ctxext.tiny import byte_tokenizer, tiny_model

    window = tiny_model("llama")
    apply_tensorized(window, TensorizedOptions(block_sizes=(64,), long_range=False))
    control = save_model_dir(window, byte_tokenizer(), tmp_path / "window-only")
    report = run(_ppl_spec(tmp_path, 300, [str(control), "base"]), progress=False)
    assert [m["attn_implementation"] for m in report["models"]] == ["tensorized", "tensorized", "sdpa"]
    assert report["models"][1]["tensorized_attention"]["long_range"] is False


def test_context_parallel_perplexity_from_the_cli_equals_one_process(tmp_path):
    import os
    import sys

    from ..process_tree import run_process_tree

    model_dir = _tiny_dir(tmp_path)
    args = [str(model_dir), "--lengths", "300", "--tasks", "ppl", "--docs", "2"]
    single = run(EvalSpec(model=str(model_dir), out=tmp_path / "one", lengths=[300], tasks=["ppl"], docs=2))
    cli = [sys.executable, "-m", "ctxext.cli", "eval", *args, "--out", str(tmp_path / "cp"), "--context-parallel", "2"]
    env = {k: v for k, v in os.environ.items() if k != "CTXEXT_LAUNCHED"}
    done = run_process_tree(cli, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "cp" / "report.json").read_text())
    assert report["protocol"]["context_parallel"] == 2
    got, want = report["perplexity"]["tiny-ta"]["300"], single["perplexity"]["tiny-ta"]["300"]
    assert got["tokens"] == want["tokens"] and abs(got["ppl"] - want["ppl"]) < 1e-3 * want["ppl"]


@pytest.mark.parametrize(
    "extra, match",
    [(["--tasks", "ppl,passkey"], "only the perplexity task"), (["--compare", "base"], "baselines are not run")],
)
def test_context_parallel_eval_refuses_what_it_cannot_shard(tmp_path, extra, match):
    args = ["eval", str(_tiny_dir(tmp_path)), "--lengths", "300", "--out", str(tmp_path / "cp")]
    result = runner.invoke(app, [*args, "--tasks", "ppl", "--context-parallel", "2", *extra])
    assert result.exit_code == 2 and match in result.output + result.stderr


def test_set_overrides_settings_of_the_model_under_test_only(tmp_path):
    model_dir = _tiny_dir(tmp_path)
    args = ["eval", str(model_dir), "--out", str(tmp_path / "e"), "--lengths", "300", "--tasks", "ppl", "--docs", "1"]
    result = runner.invoke(
        app, [*args, "--set", "rope=axis", "--set", "block_sizes=[8, 8]", "--compare", str(model_dir)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    tested, baseline = report["models"]
    assert tested["tensorized_attention"]["rope"] == "axis" and tested["tensorized_attention"]["block_sizes"] == [8, 8]
    assert "settings overridden: rope=axis, block_sizes=[8, 8]" in tested["description"]
    assert baseline["tensorized_attention"]["rope"] == "absolute", "baselines keep their own settings"
    ppl = report["perplexity"]
    assert ppl[tested["label"]]["300"]["ppl"] != ppl[baseline["label"]]["300"]["ppl"], "the override must take effect"

    for extra, match in (
        (["--set", "rop=axis"], "--set.rop: unknown setting (did you mean 'rope'?)"),
        (["--set", "rope"], "--set 'rope': expected KEY=VALUE"),
        (["--set", "summary=learned"], "--set summary"),
    ):
        result = runner.invoke(app, [*args, "--force", *extra])
        assert result.exit_code != 0 and match in " ".join(result.output.split()), (extra, result.output)
    result = runner.invoke(app, ["eval", "smollm2", "--out", str(tmp_path / "x"), "--set", "rope=axis", "--dry-run"])
    assert result.exit_code == 0, result.output


def test_dry_run_plans_an_adapter_with_its_base_config_and_trained_settings(tmp_path):
    """An adapter directory (no config.json) is planned from its base model and the settings it
    trained with, ``--set`` applied; it used to print "config unavailable"."""
    from ctxext.evaluate.runner import ModelEntry, planned_config

    base = _tiny_dir(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    trained = {"block_sizes": [32], "sinks": 2, "retrieve": 2}
    settings = {"base_model": str(base), "attn_implementation": "tensorized", "tensorized_attention": trained}
    (adapter / "ctxext.json").write_text(json.dumps(settings))

    config, ta = planned_config(ModelEntry(label="adapter", source=str(adapter), settings={"rope": "axis"}))
    assert config.num_hidden_layers > 0 and ta == {**trained, "rope": "axis"}
    assert planned_config(ModelEntry(label="base", source=str(adapter), attention="sdpa"))[1] is None
    result = runner.invoke(app, ["eval", str(adapter), "--out", str(tmp_path / "x"), "--lengths", "1k", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "unavailable" not in result.output and "1024" in result.output, result.output
    # 2 far blocks read of 31 (blocks of 32 before the query's own), chosen by the bound alone: warned as eval would
    assert "warning: adapter: at 1,024 tokens a query chooses its 2 far blocks from 2 candidates of up to 31" in (
        " ".join(result.output.split())
    )


def test_set_rope_axis_on_a_model_with_outer_hops_warns(tmp_path):
    import warnings

    from transformers import AutoModelForCausalLM

    from ctxext.evaluate.runner import override_settings

    model = AutoModelForCausalLM.from_pretrained(_tiny_dir(tmp_path))  # the operator's default: outer hops on
    with pytest.warns(UserWarning, match="--set: rope=axis with long_range=true.*round 9"):
        override_settings(model, {"rope": "axis"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        override_settings(model, {"rope": "axis", "long_range": False})
        override_settings(model, {"rope": "absolute", "long_range": True})


@pytest.mark.parametrize("scoring", ["teacher", "generate"])
def test_wrong_answers_are_recorded_with_what_the_model_said(tmp_path, scoring):
    """A random tiny model misses the passkey; the report says what it answered instead."""
    spec = EvalSpec(
        model=str(_tiny_dir(tmp_path)), out=tmp_path / "eval", lengths=[512], tasks=["passkey"], depths=[0.2, 0.8],
        trials=2, scoring=scoring,
    )  # fmt: skip
    report = run(spec, progress=False)
    cells = report["tasks"]["passkey"]["tiny-ta"]["512"]
    misses = report["misses"]["passkey"]["tiny-ta"]
    assert len(misses) == round(sum(2 * (1 - acc) for acc in cells.values())) > 0
    assert {m["depth"] for m in misses} <= {0.2, 0.8} and all(m["trial"] in (0, 1) for m in misses)
    assert all(m["answer"].isdigit() and m["predicted"] != m["answer"] for m in misses)
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["misses"] == report["misses"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "passkey, tiny-ta: wrong answers" in md and f"`{misses[0]['answer']}`" in md
    assert ("greedy continuation" if scoring == "generate" else "teacher-forced; ") in md


def test_an_interrupted_evaluation_writes_the_cells_it_finished(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM under the CLI) during the 4th pass: ppl and the first two passkey cells
    are kept, the cell in progress and the rest say 'not run', and the CLI exits 130."""
    import ctxext.evaluate.retrieval as retrieval_mod

    from .interrupting import raising_on_call

    stopping = raising_on_call(retrieval_mod.teacher_forced_prediction, 4, KeyboardInterrupt())
    monkeypatch.setattr(retrieval_mod, "teacher_forced_prediction", stopping)
    model_dir, out = _tiny_dir(tmp_path), tmp_path / "eval"
    args = ["eval", str(model_dir), "--out", str(out), "--lengths", "256,512", "--tasks", "ppl,passkey"]
    result = runner.invoke(app, [*args, "--depths", "0.2,0.8", "--trials", "1", "--docs", "1"])
    assert result.exit_code == 130, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["stopped"].startswith("interrupted after 5 of 6 passes")
    assert all(cell["docs"] == 1 and cell["ppl"] > 1 for cell in report["perplexity"]["tiny-ta"].values())
    grid = report["tasks"]["passkey"]["tiny-ta"]
    assert grid["256"]["0.2"] in (0.0, 1.0) and grid["256"]["0.8"] in (0.0, 1.0) and grid["512"]["0.2"] in (0.0, 1.0)
    assert grid["512"]["0.8"] is None
    md = (out / "report.md").read_text()
    assert "**Partial report:** interrupted after 5 of 6 passes" in md and "| 0.8 | " in md and "not run" in md
    assert (out / "passkey_tiny-ta.png").is_file()


def test_sigterm_raises_keyboard_interrupt_only_inside_the_block():
    import os
    import signal

    from ctxext.interrupt import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next bytecode
    assert signal.getsignal(signal.SIGTERM) is before


def test_each_finished_cell_is_printed_above_the_progress_bar(tmp_path, capsys):
    spec = EvalSpec(
        model=str(_tiny_dir(tmp_path)),
        out=tmp_path / "eval",
        lengths=[256, 512],
        tasks=["ppl", "passkey"],
        depths=[0.0, 1.0],
        trials=2,
        docs=1,
    )
    report = run(spec, progress=True)
    err = capsys.readouterr().err
    for n in (256, 512):
        ppl = report["perplexity"]["tiny-ta"][str(n)]["ppl"]
        assert f"tiny-ta  ppl at {n:,} tokens, perplexity {ppl:.2f} (1 doc)" in err
        for depth in ("0", "1"):
            right = round(report["tasks"]["passkey"]["tiny-ta"][str(n)][depth] * 2)
            assert f"tiny-ta  passkey at {n:,} tokens, depth {depth}: {right} / 2 right" in err
    run(EvalSpec(**{**spec.__dict__, "force": True}), progress=False)
    assert "perplexity" not in capsys.readouterr().err  # no bar, no lines


def test_eval_warns_when_the_far_blocks_outnumber_the_candidates_at_the_longest_length(tmp_path):
    """Rounds 22-34: 32 candidates of 252 far blocks found 4 / 6 needles at 16k, of 508 none at 32k. Blocks
    of 8 reading 2 far blocks of 4 with 4 candidates: at 300 tokens a query has 72 far blocks (18 per
    candidate): warned, in the report too; a share of a quarter (18 candidates) is not."""
    import warnings

    model_dir = _tiny_dir(tmp_path)
    narrow = {"block_sizes": [8], "local": "window", "long_range": False, "retrieve": 2, "retrieve_block": 4,
              "retrieve_candidates": 4}  # fmt: skip
    spec = EvalSpec(model=str(model_dir), out=tmp_path / "narrow", lengths=[300, 100], tasks=["ppl"], docs=1,
                    settings=narrow)  # fmt: skip
    with pytest.warns(UserWarning, match=r"tiny-ta .*: at 300 tokens .* from 4 candidates of up to 72 far blocks"):
        report = run(spec, progress=False)
    assert "retrieve_candidate_share=0.5" in report["models"][0]["advice"][0]
    md = (tmp_path / "narrow" / "report.md").read_text()
    assert "**Note on tiny-ta (" in md and ":** at 300 tokens" in md
    spec.settings, spec.out = {**narrow, "retrieve_candidate_share": 0.25}, tmp_path / "shared"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*far blocks")
        report = run(spec, progress=False)
    assert "advice" not in report["models"][0]


def test_only_rank_zero_warns_about_the_candidates(tmp_path, monkeypatch):
    """Under context parallelism every rank runs the advice; one warning, not one per rank, and each notes it."""
    import warnings

    from ctxext.evaluate import runner

    narrow = {"block_sizes": [8], "local": "window", "long_range": False, "retrieve": 2, "retrieve_block": 4,
              "retrieve_candidates": 4}  # fmt: skip
    spec = EvalSpec(model="x", out=tmp_path / "r", lengths=[300], tasks=["ppl"], settings=narrow)
    for rank, warns in ((1, False), (0, True)):
        monkeypatch.setattr(runner, "_rank", lambda rank=rank: rank)
        entry = {"label": "tiny-ta", "attn_implementation": "tensorized", "tensorized_attention": narrow}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner._advise_on_length(spec, entry)
        assert "from 4 candidates of up to 72 far blocks" in entry["advice"][0]
        assert [str(w.message).startswith("tiny-ta: at 300 tokens") for w in caught] == ([True] if warns else [])


def test_the_cli_prints_ctxext_warnings_as_one_line(tmp_path):
    """``ctxext eval`` shows its own warnings as ``warning: ...`` lines, not Python's ``path:line: UserWarning``."""
    args = ["eval", str(_tiny_dir(tmp_path)), "--out", str(tmp_path / "e"), "--lengths", "300", "--tasks", "ppl",
            "--docs", "1", "--set", "block_sizes=[8]", "--set", "local=window", "--set", "long_range=false",
            "--set", "retrieve=2", "--set", "retrieve_block=4", "--set", "retrieve_candidates=4"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"(^|[\r\n])warning: tiny-ta \(", result.output), result.output  # tqdm clears its bar with \r
    assert "from 4 candidates of up to 72" in result.output
    assert "UserWarning" not in result.output, result.output
