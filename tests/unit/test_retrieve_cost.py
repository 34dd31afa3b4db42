"""``benchmarks/retrieve_cost.py``: the block shapes it times are the ones the model runs.

Its ``--shapes`` ratios in docs/RESULTS.md rest on changing ``block_sizes`` and ``retrieve`` in the
model's config in place; these tests fail if a shape is parsed wrongly or the change is ignored.
"""

from __future__ import annotations

import pytest
import torch

import ctxext.attention.torch_backend as tb
from ctxext.attention.hf import CONFIG_KEY
from ctxext.attention.options import TensorizedOptions
from ctxext.models import apply_tensorized
from ctxext.tiny import tiny_model

from ..benchmark_script import load_benchmark


@pytest.fixture(scope="module")
def cost():
    return load_benchmark("retrieve_cost")


def test_shapes_give_window_and_retrieval_per_block_size(cost):
    variants = cost.shape_variants("128:4, 64:8, 128:8:64")
    assert [label for label, _ in variants] == [
        "blocks of 128, window only",
        "blocks of 128, window + retrieve 4",
        "blocks of 64, window only",
        "blocks of 64, window + retrieve 8",
        "blocks of 128, window + retrieve 8 of 64",
    ]
    assert variants[3][1] == {"block_sizes": [64], "long_range": False, "retrieve": 8, "retrieve_block": 0}
    assert variants[4][1] == {"block_sizes": [128], "long_range": False, "retrieve": 8, "retrieve_block": 64}
    assert variants[2][1]["retrieve"] == 0


def test_hops_twin_each_retrieval_run_with_the_outer_hops_on(cost):
    variants = cost.shape_variants("128:8:64", hops=True)
    assert [label for label, _ in variants] == [
        "blocks of 128, window only",
        "blocks of 128, window + retrieve 8 of 64",
        "blocks of 128, window + retrieve 8 of 64 + outer hops",
    ]
    assert variants[2][1] == {**variants[1][1], "long_range": True}
    assert variants[1][1]["long_range"] is False and variants[0][1]["long_range"] is False


def test_a_fourth_field_scores_far_blocks_by_sub_blocks(cost):
    variants = cost.shape_variants("128:8:64,128:8:64:16")
    assert [label for label, _ in variants][1:] == [
        "blocks of 128, window + retrieve 8 of 64",
        "blocks of 128, window + retrieve 8 of 64, scored by sub-blocks of 16",
    ]
    assert "retrieve_score_block" not in variants[1][1]
    assert variants[2][1] == {**variants[1][1], "retrieve_score_block": 16}


def test_a_fifth_field_re_ranks_that_many_candidates_exactly(cost):
    variants = cost.shape_variants("128:8:64:64:32")
    assert variants[1][0].endswith("retrieve 8 of 64, scored by sub-blocks of 64, exact re-rank of 32 candidates")
    assert variants[1][1] == {
        "block_sizes": [128], "long_range": False, "retrieve": 8, "retrieve_block": 64,
        "retrieve_score_block": 64, "retrieve_candidates": 32,
    }  # fmt: skip


@pytest.mark.parametrize(
    "bad", ["128", "128:x", "0:4", "64:0", "a:b", "128:8:0", "1:2:3:4:5:6", "128:8:64:0", "128:8:64:16:0"]
)
def test_bad_shape_names_itself(cost, bad):
    with pytest.raises(SystemExit, match=f"--shapes: .*{bad!r}"):
        cost.shape_variants(f"64:8,{bad}")


def test_shape_changed_in_place_reaches_the_chooser(cost, monkeypatch):
    """After the config swap the model chooses among blocks of the new size: the chooser sees the
    inner block ``n`` and one column per retrieved block (L / m), and ``union_sizes`` counts them."""
    model = tiny_model("llama").float().eval()
    apply_tensorized(model, TensorizedOptions(block_sizes=(16,), sinks=2, local="window", long_range=False, retrieve=1))
    base = dict(getattr(model.config, CONFIG_KEY))
    ids = torch.randint(0, model.config.vocab_size, (1, 128))
    seen: list[tuple[int, int]] = []
    choose = tb.far_block_index

    def recording(qs, ks, key_ok, opts, n, *rest):
        index = choose(qs, ks, key_ok, opts, n, *rest)
        seen.append((n, -(-ks.shape[2] // opts.retrieval_block)))
        return index

    monkeypatch.setattr(tb, "far_block_index", recording)
    for label, settings in cost.shape_variants("16:1,8:2,16:2:8"):
        if not settings["retrieve"]:
            continue
        setattr(model.config, CONFIG_KEY, {**base, **settings})
        seen.clear()
        sizes = cost.union_sizes(model, ids)
        n = settings["block_sizes"][0]
        m = settings["retrieve_block"] or n
        assert seen and all(entry == (n, 128 // m) for entry in seen), (label, seen)
        assert len(sizes) == model.config.num_hidden_layers
        assert all(0 < size <= 128 // m for size in sizes), (label, sizes)
