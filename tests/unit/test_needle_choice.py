"""``benchmarks/needle_choice.py``: the far-block choice recorded at each needle answer token.

With ``retrieve`` at least the number of far blocks every eligible block is chosen, so every far
answer token's source must show a chosen share of exactly 1; with one far block per query it cannot.
"""

from __future__ import annotations

import json

import pytest
import torch

from ..benchmark_script import load_benchmark


def _tiny_dir(tmp_path, retrieve: int):
    """A converted tiny model (byte tokenizer): window of 2 x 32, 2 sinks, far blocks of 16."""
    from ctxext.attention.options import TensorizedOptions
    from ctxext.models import apply_tensorized, save_model_dir
    from ctxext.tiny import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    opts = TensorizedOptions(
        block_sizes=(32,), sinks=2, local="window", long_range=False, retrieve=retrieve, retrieve_block=16
    )
    apply_tensorized(model, opts)
    return save_model_dir(model, byte_tokenizer(), tmp_path / f"tiny-r{retrieve}")


ARGS = ["--lengths", "1024", "--depths", "0.1,0.5", "--seeds", "0", "--threads", "1"]


def test_every_block_chosen_gives_share_one_and_one_block_does_not(tmp_path):
    script = load_benchmark("needle_choice")
    import ctxext.attention.torch_backend as tb

    original = tb.far_block_index
    model = str(_tiny_dir(tmp_path, 1))
    every = script.main([model, "--set", "retrieve=64", *ARGS, "--out", str(tmp_path / "a.json")])
    assert tb.far_block_index is original, "the recorder is removed afterwards"
    assert every["settings"] == {"retrieve": 64} and every["options"]["retrieve"] == 64, "--set takes effect"
    tokens = [t for s in every["samples"] for t in s["tokens"]]
    far = [t for t in tokens if t["far"]]
    assert len(every["samples"]) == 2 and far, "needles at depths 0.1 and 0.5 of 1,024 lie beyond a window of 64"
    assert all(t["chosen_share"] == 1.0 and set(t["per_layer"]) == {1.0} for t in far)
    for s in every["samples"]:
        assert len(s["predicted"]) == len(s["tokens"]) == len(s["answer"]) + 1  # byte tokens: space + 7 digits
        assert [t["source"] for t in s["tokens"]] == list(
            range(s["tokens"][0]["source"], s["tokens"][-1]["source"] + 1)
        )
        assert s["correct"] == all(t["correct"] for t in s["tokens"])
        for t in s["tokens"]:  # log-probabilities of the right and the argmax token
            assert t["logp_predicted"] <= 0.0 and t["logp_right"] <= t["logp_predicted"]
            assert (t["logp_right"] == t["logp_predicted"]) == t["correct"]

    one = script.main([model, *ARGS, "--out", str(tmp_path / "b.json"), "--plot", str(tmp_path / "p.png")])
    shares = [t["chosen_share"] for s in one["samples"] for t in s["tokens"] if t["far"]]
    assert len(shares) == len(far) and all(0.0 <= x <= 1.0 for x in shares) and min(shares) < 1.0
    saved = json.loads((tmp_path / "b.json").read_text())
    summary = saved["summary"]["1024"]
    assert summary["needles"] == 2 and summary["far_tokens"] == len(far)
    assert summary["far_tokens_right"] == sum(t["correct"] for s in one["samples"] for t in s["tokens"] if t["far"])
    assert summary["numbers_read"] == sum(s["number_read"] for s in one["samples"]) >= summary["passed"]
    assert (tmp_path / "p.png").stat().st_size > 1000
    drawn = script.main(["--overlay", f"every={tmp_path / 'a.json'}", f"one={tmp_path / 'b.json'}",
                         "--plot", str(tmp_path / "o.png")])  # fmt: skip
    assert drawn["one"]["1024"] == summary and (tmp_path / "o.png").stat().st_size > 1000
    joined = script.main(["--overlay", f"both={tmp_path / 'a.json'}", f"both={tmp_path / 'b.json'}",
                          "--plot", str(tmp_path / "j.png")])  # fmt: skip
    assert joined["both"]["1024"]["needles"] == 4, "a label given twice joins its runs' needles"
    assert joined["both"]["1024"]["far_tokens"] == 2 * len(far)
    with pytest.raises(SystemExit, match="LABEL=JSON"):
        script.main(["--overlay", str(tmp_path / "a.json"), "--plot", str(tmp_path / "x.png")])


def test_copy_sources_find_the_answer_after_the_needle():
    script = load_benchmark("needle_choice")
    ids = [5, 1, 2, 9, 7, 1, 2, 3, 8, 4, 1, 2, 3]  # needle at 4; answer [1, 2, 3] starts at 10
    assert script.copy_sources(ids, 4, 10) == [5, 6, 7]
    with pytest.raises(ValueError, match="do not occur after the needle"):
        script.copy_sources([1, 2, 3, 4, 5, 6], 1, 4)


def test_a_model_without_retrieval_is_scored_without_a_choice(tmp_path):
    """Full attention (or the window alone) as a control: predictions and log-probabilities, no shares."""
    script = load_benchmark("needle_choice")
    import ctxext.attention.torch_backend as tb

    original = tb.far_block_index
    model = str(_tiny_dir(tmp_path, 0))
    got = script.main([model, *ARGS, "--shorten", "1000", "--out", str(tmp_path / "x.json")])
    assert tb.far_block_index is original and len(got["samples"]) == 4
    for s in got["samples"]:
        assert s["layers"] is None and len(s["predicted"]) == len(s["tokens"]) == len(s["answer"]) + 1
        assert all(t["far"] is None and t["chosen_share"] is None and t["logp_right"] <= 0 for t in s["tokens"])
    assert got["summary"]["1024"]["far_tokens"] == 0 and got["summary"]["1024"]["chosen_share_right"] is None
    with pytest.raises(SystemExit, match="--read-needle and --choose-recent need a model with far-block retrieval"):
        script.main([model, *ARGS, "--read-needle", "--out", str(tmp_path / "y.json")])


def test_the_exact_score_finds_at_least_what_the_bound_finds_with_one_block(tmp_path):
    """``--set retrieve_score_block=1`` (the exact max q.k) reaches the choice the script records."""
    script = load_benchmark("needle_choice")
    model = str(_tiny_dir(tmp_path, 1))
    bound = script.main([model, *ARGS, "--out", str(tmp_path / "b.json")])
    exact = script.main([model, *ARGS, "--set", "retrieve_score_block=1", "--out", str(tmp_path / "e.json")])
    assert exact["options"]["retrieve_score_block"] == 1 and "retrieve_score_block=1" in exact["label"]
    shares = [[t["chosen_share"] for s in r["samples"] for t in s["tokens"]] for r in (bound, exact)]
    assert shares[0] != shares[1], "another score must change which blocks are chosen"


def test_a_number_read_after_a_newline_counts_as_read_not_passed():
    """Round 23: at 32k answers start with a newline where the needle has a space; the digits are counted apart."""
    script = load_benchmark("needle_choice")
    token = {"far": True, "correct": True, "chosen_share": 0.2}
    samples = [
        {"length": 8, "correct": True, "number_read": True, "tokens": [token]},
        {"length": 8, "correct": False, "number_read": True, "tokens": [{**token, "correct": False}]},
        {"length": 8, "correct": False, "number_read": False, "tokens": [{**token, "correct": False}]},
    ]
    got = script.summary(samples)["8"]
    assert (got["needles"], got["passed"], got["numbers_read"], got["far_tokens_right"]) == (3, 1, 2, 1)
    old = [{k: v for k, v in s.items() if k != "number_read"} for s in samples]  # a JSON from before round 23
    assert script.summary(old)["8"]["numbers_read"] is None


def test_the_needle_reader_adds_the_blocks_on_its_rows_only():
    script = load_benchmark("needle_choice")
    index = torch.tensor([[[[0, 1, 2], [3, 4, 5], [5, 6, 7]], [[7, 8, 9], [9, 1, 2], [0, 9, 8]]]])  # (1, 2, 3, 3)
    reader = script.NeedleReader(lambda *args: index)
    reader.rows = torch.tensor([1, 2])
    assert torch.equal(reader(None, None, None, None, 16), index), "no blocks: the choice is untouched"
    reader.blocks = (5, 9)
    got = reader(None, None, None, None, 16)
    assert torch.equal(got[:, :, 0], index[:, :, 0]), "rows outside the answer keep their choice"
    assert torch.equal(index[0, 0, 1], torch.tensor([3, 4, 5])), "the choice itself is not written to"
    # each row now holds 5 and 9; for each it lacked, its last other pick is dropped
    assert [sorted(got[0, h, r].tolist()) for h in (0, 1) for r in (1, 2)] == [
        [3, 5, 9],
        [5, 6, 9],
        [1, 5, 9],
        [0, 5, 9],
    ]
    reader.blocks = (1, 2, 3, 4)
    with pytest.raises(SystemExit, match="more than the 3 read"):
        reader(None, None, None, None, 16)


def test_read_needle_records_the_models_own_choice_while_every_head_reads_the_needle(tmp_path, monkeypatch):
    from ctxext.evaluate.tasks import make_sample
    from ctxext.tiny import byte_tokenizer

    """The oracle's run keeps the recorded shares of the plain run (the model's own choice), while
    the choice each layer's attention receives holds the needle's blocks in every head."""
    script = load_benchmark("needle_choice")
    import ctxext.attention.torch_backend as tb

    received = []

    class Spy(script.NeedleReader):
        def __call__(self, *args):
            index = super().__call__(*args)
            received.append(torch.stack([(index[:, :, self.rows] == b).any(-1) for b in self.blocks]))
            return index

    monkeypatch.setattr(script, "NeedleReader", Spy)
    original = tb.far_block_index
    model = str(_tiny_dir(tmp_path, 2))
    plain = script.main([model, *ARGS, "--out", str(tmp_path / "p.json")])
    assert not received, "without --read-needle no reader is installed"
    read = script.main([model, *ARGS, "--read-needle", "--out", str(tmp_path / "r.json")])
    assert tb.far_block_index is original and "--read-needle" in read["label"]
    assert len(received) == 2 * read["samples"][0]["layers"], "one choice per layer per needle went through it"
    assert all(bool(r.all()) for r in received), "every head reads every block of the answer's source"
    for p, r in zip(plain["samples"], read["samples"]):
        assert [t["chosen_share"] for t in p["tokens"]] == [t["chosen_share"] for t in r["tokens"]]
        assert r["read_needle_blocks"] == sorted({t["source"] // 16 for t in r["tokens"]})
        assert r["read_needle_from"] == r["tokens"][0]["query"], "by default from the answer's first query"
    far = [t["chosen_share"] for s in plain["samples"] for t in s["tokens"] if t["far"]]
    assert far and min(far) < 1.0, "the model's own choice misses the needle somewhere: the oracle reads more"

    received.clear()  # from the question's first token on: the question's tokens read the needle too
    asked = script.main([model, *ARGS, "--read-needle", "question", "--out", str(tmp_path / "q.json")])
    assert "--read-needle question" in asked["label"] and received and all(bool(r.all()) for r in received)
    for r in asked["samples"]:
        sample = make_sample("needle", byte_tokenizer(), 1024, r["depth"], r["seed"])
        assert r["read_needle_from"] == sample.question_start < sample.answer_start - 1
        assert [t["chosen_share"] for t in r["tokens"]] == [
            t["chosen_share"] for p in plain["samples"] if p["depth"] == r["depth"] for t in p["tokens"]
        ]


def test_a_shortened_needle_keeps_the_instruction_needle_and_question():
    from ctxext.evaluate.tasks import make_sample
    from ctxext.tiny import byte_tokenizer

    script = load_benchmark("needle_choice")
    sample = make_sample("needle", byte_tokenizer(), 2048, 0.5, seed=0)
    short = script.shortened(sample, 1500)
    cut, f = 2048 - 1500, sample.filler_start
    assert len(short.input_ids) == short.length == 1500 and short.depth == sample.depth
    assert short.input_ids[:f] == sample.input_ids[:f], "the BOS and the instruction stay"
    assert short.input_ids[f:] == sample.input_ids[f + cut :], "the haystack loses its first tokens only"
    assert short.input_ids[short.needle_position :] == sample.input_ids[sample.needle_position :]
    assert short.input_ids[short.answer_start :] == sample.input_ids[sample.answer_start :]
    assert short.input_ids[short.question_start :] == sample.input_ids[sample.question_start :]
    keep = sample.needle_position - f  # filler tokens before the needle: the most the cut may take
    assert script.shortened(sample, 2048 - keep).needle_position == f
    for bad in (2048 - keep - 1, 2048, 4096):
        with pytest.raises(SystemExit, match=f"--shorten {bad}: .* give a length between {2048 - keep} and 2047"):
            script.shortened(sample, bad)


def test_shorten_scores_each_needle_again_in_its_own_group(tmp_path):
    script = load_benchmark("needle_choice")
    model = str(_tiny_dir(tmp_path, 2))
    args = [model, "--lengths", "1024", "--depths", "0.9", "--seeds", "0,1", "--threads", "1"]
    got = script.main(
        [*args, "--shorten", "700,900", "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")]
    )
    assert [(s["length"], s.get("cut_from"), s["seed"]) for s in got["samples"]] == [
        (1024, None, 0), (700, 1024, 0), (900, 1024, 0), (1024, None, 1), (700, 1024, 1), (900, 1024, 1),
    ]  # fmt: skip
    assert list(got["summary"]) == ["700 cut from 1024", "900 cut from 1024", "1024"]
    assert all(v["needles"] == 2 for v in got["summary"].values())
    whole = script.main([*args, "--out", str(tmp_path / "w.json")])
    assert [s["predicted"] for s in whole["samples"]] == [s["predicted"] for s in got["samples"] if "cut_from" not in s]
    assert (tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(SystemExit):  # argparse: a cut as long as the needle's length is refused before loading
        script.main([*args, "--shorten", "1024", "--out", str(tmp_path / "x.json")])


def test_choose_recent_hides_the_far_blocks_before_the_cut_from_the_question_on(tmp_path):
    """Reading every far block, the answer's queries read the needle's; with the needle before the
    cut, the choice the attention receives never holds its block there."""
    script = load_benchmark("needle_choice")
    import ctxext.attention.torch_backend as tb

    original = tb.far_block_index
    model = str(_tiny_dir(tmp_path, 2))
    args = [model, "--set", "retrieve=64", "--lengths", "1024", "--depths", "0.1", "--seeds", "0", "--threads", "1"]
    plain = script.main([*args, "--out", str(tmp_path / "p.json")])
    recent = script.main([*args, "--choose-recent", "600", "--out", str(tmp_path / "r.json")])
    assert tb.far_block_index is original and "--choose-recent 600" in recent["label"]
    sample, cut = plain["samples"][0], recent["samples"][0]
    assert cut["choose_recent_from_key"] > sample["tokens"][0]["source"], "the needle lies before the cut"
    assert {t["chosen_share"] for t in sample["tokens"] if t["far"]} == {1.0}, "every block read: the needle's too"
    assert [t["chosen_share"] for t in cut["tokens"] if t["far"]] == [0.0] * sum(t["far"] for t in cut["tokens"])
    with pytest.raises(SystemExit):  # argparse: one oracle at a time
        script.main([*args, "--choose-recent", "600", "--read-needle", "--out", str(tmp_path / "x.json")])
