"""Far-block retrieval (``retrieve=k``): the torch backend against the reference, the invariants of
DESIGN.md section 1 with retrieval on, what a query reads, and the clear errors where it is unsupported."""

from __future__ import annotations

import itertools

import pytest
import torch

from ctxext.attention.options import TensorizedConfigError, TensorizedOptions
from ctxext.attention.retrieve import retrievable_keys, select_far_blocks
from ctxext.attention.triton_backend import unsupported_reason

from . import operator_cases as oc
from .convert_flag_check import check_convert_flag
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)
from .test_operator_invariants import check_causal, check_convex

RETRIEVE_OPTIONS = [
    {"causal": causal, "rope": rope, "sinks": sinks, "local": local, "merge": merge, "long_range": lr, "retrieve": r}
    for causal, rope, sinks, local, merge, lr, r in itertools.product(
        oc.CAUSAL, oc.ROPE, oc.SINKS, oc.LOCAL, ("score", "lse"), oc.LONG_RANGE, (1, 3)
    )
]


def _id(o: dict) -> str:
    return oc.option_id(o) + f"-r{o['retrieve']}"


@pytest.mark.parametrize("opts", RETRIEVE_OPTIONS[::2], ids=_id)
def test_torch_matches_reference(opts):
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=45, seed=5)
    got = oc.run_slots("torch", q, k, v, (4,), opts)
    want = oc.run_slots("reference", q, k, v, (4,), opts)
    oc.assert_close(got, want, 1e-12, "torch vs reference")


@pytest.mark.parametrize("opts", RETRIEVE_OPTIONS[1::7], ids=_id)
def test_torch_matches_reference_three_axes_holes_and_positions(opts):
    n = 53
    q, k, v = oc.make_qkv(batch=3, hq=6, hkv=2, n=n, seed=7)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, 12:16] = False  # a whole inner block of holes: never chosen
    valid[1, :10] = False
    valid[2, -6:] = False
    positions = torch.arange(n, dtype=oc.F64)[None].expand(3, n) + torch.tensor([[0.0], [5.0], [17.0]], dtype=oc.F64)
    got = oc.run_slots("torch", q, k, v, (3, 4), opts, valid=valid, positions=positions)
    want = oc.run_slots("reference", q, k, v, (3, 4), opts, valid=valid, positions=positions)
    oc.assert_close(got, want, 1e-12, "torch vs reference")
    assert (got.transpose(1, 2)[~valid] == 0).all(), "masked slots must output zeros"


@pytest.mark.parametrize("sinks", oc.SINKS)
@pytest.mark.parametrize("local", oc.LOCAL)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_retrieving_every_far_block_is_exact_attention(backend, local, sinks):
    """Window + sinks + every far block read exactly = every earlier token, each once."""
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=39, seed=3)
    opts = {"sinks": sinks, "local": local, "long_range": False, "retrieve": 10}
    got = oc.run_slots(backend, q, k, v, (4,), opts)
    oc.assert_close(got, oc.causal_sdpa(q, k, v), 1e-12, "all far blocks retrieved vs SDPA")


@pytest.mark.parametrize("rope", oc.ROPE)
def test_one_block_equals_causal_sdpa(rope):
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=13, seed=2)
    got = oc.run_api("torch", q, k, v, (16,), {"rope": rope, "sinks": 2, "local": "window", "retrieve": 2})
    oc.assert_close(got, oc.causal_sdpa(q, k, v), 1e-12, "one block vs SDPA")


@pytest.mark.parametrize("opts", RETRIEVE_OPTIONS[::5], ids=_id)
def test_causal(opts):
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=37, seed=9)
    check_causal(lambda q, k, v: oc.run_slots("torch", q, k, v, (4,), opts), q, k, v, [0, 8, 11, 17, 30])


@pytest.mark.parametrize("opts", RETRIEVE_OPTIONS[::6], ids=_id)
def test_convex_and_finite_with_padding(opts):
    check_convex("torch", opts)


@pytest.mark.parametrize("rope", oc.ROPE)
@pytest.mark.parametrize("retrieve", (1, 2))
def test_a_query_reads_whole_chosen_blocks_and_nothing_else_far(rope, retrieve):
    """long_range=False: each query's keys are its local key set plus at most ``retrieve`` whole
    far blocks, and those are the blocks with the highest bound on q.k."""
    n, block, sinks = 40, 4, 2
    q, k, _ = oc.make_qkv(batch=1, hq=2, hkv=1, n=n, seed=4)
    opts = {"rope": rope, "sinks": sinks, "local": "window", "long_range": False, "retrieve": retrieve}
    w = oc.weight_matrix(lambda q, k, v: oc.run_slots("torch", q, k, v, (block,), opts), q, k, 1)[0]  # (H, N, N)
    local = oc.local_set(n, block, sinks, window=True)
    o = oc.options((block,), **opts)
    inv = oc.rope_inv_freq(q.shape[-1])
    from ctxext.attention.retrieve import selection_frame

    qs, ks = selection_frame(q, k, torch.arange(n, dtype=oc.F64)[None], o, inv, block)
    chosen = select_far_blocks(qs, ks, retrievable_keys(torch.ones(1, n, dtype=torch.bool), sinks), o, block)[0]
    for h in range(2):
        for p in range(n):
            far = (w[h, p] != 0) & ~local[p]
            blocks = sorted({t // block for t in far.nonzero().flatten().tolist()})
            start = max(p // block * block - block, 0)
            eligible = start // block
            assert len(blocks) == min(retrieve, eligible), f"query {p}, head {h}: far blocks {blocks}"
            assert blocks == chosen[h, p].nonzero().flatten().tolist()
            for b in blocks:  # whole blocks, minus the sinks
                want = torch.zeros(n, dtype=torch.bool)
                want[max(b * block, sinks) : (b + 1) * block] = True
                assert torch.equal(far & want, want), f"query {p} read block {b} only in part"


def test_the_chosen_block_holds_the_best_matching_key():
    """A key planted far back that matches the query is read with most of the weight."""
    n, block, d = 64, 8, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, n, d, generator=gen, dtype=oc.F64) * 0.3
    k = torch.randn(1, 1, n, d, generator=gen, dtype=oc.F64) * 0.3
    v = torch.zeros(1, 1, n, d, dtype=oc.F64)
    target = torch.randn(d, generator=gen, dtype=oc.F64)
    q[0, 0, -1], k[0, 0, 13], v[0, 0, 13, 0] = 4 * target, 4 * target, 1.0  # slot 13: block 1 of 8
    opts = {"sinks": 2, "local": "window", "long_range": True, "merge": "lse"}
    with_retrieval = oc.run_slots("torch", q, k, v, (block,), {**opts, "retrieve": 1})
    without = oc.run_slots("torch", q, k, v, (block,), opts)
    assert with_retrieval[0, 0, -1, 0] > 0.9, "the planted key's value must dominate the last query's output"
    assert without[0, 0, -1, 0] < 0.5, "without retrieval the summary path should not recover it this well"


def test_gradients_match_finite_differences():
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=19, dim=4, seed=6, requires_grad=True)
    opts = {"sinks": 1, "local": "window", "merge": "lse", "retrieve": 1}
    assert torch.autograd.gradcheck(lambda q, k, v: oc.run_slots("torch", q, k, v, (4,), opts), (q, k, v))


@pytest.mark.parametrize("bad", [-1, True, "2", 1.5])
def test_bad_retrieve_is_named(bad):
    with pytest.raises(TensorizedConfigError, match=r"tensorized_attention\.retrieve: expected the number"):
        TensorizedOptions.from_dict({"retrieve": bad})


def test_kernels_run_the_shipped_default_and_name_what_they_do_not():
    """The recipes' attention (sinks, window, 8 far blocks of 64, no outer hops) runs fused on CUDA;
    ``summary`` other than ``token`` is still named as unsupported."""
    cuda = torch.device("cuda")
    default = TensorizedOptions(block_sizes=(128,), sinks=4, local="window", long_range=False, retrieve=8,
                                retrieve_block=64).validate()  # fmt: skip
    assert unsupported_reason(default, torch.bfloat16, 64, cuda) is None
    pooled = TensorizedOptions(summary="pooled", merge="lse", retrieve=2).validate()
    reason = unsupported_reason(pooled, torch.bfloat16, 64, cuda)
    assert reason is not None and "summary='pooled'" in reason


def test_convert_option_reaches_the_model_and_generation_with_the_cache_matches_without(tmp_path):
    check_convert_flag(tmp_path, ["--retrieve", "2"], "retrieve", 2, off=0, same_before=16, bad_value="-1", length=40)


ORDERED_OPTIONS = [
    {"causal": c, "rope": "axis", "retrieve_frame": "ordered", "sinks": s, "local": lo, "merge": m, "long_range": lr,
     "retrieve": r}
    for c, s, lo, m, lr, r in itertools.product(oc.CAUSAL, oc.SINKS, oc.LOCAL, ("score", "lse"), oc.LONG_RANGE, (2, 3))
]  # fmt: skip


@pytest.mark.parametrize("opts", ORDERED_OPTIONS[::3], ids=_id)
def test_ordered_frame_torch_matches_reference(opts):
    """The backend rotates the query per rank, the reference the keys: the same offsets."""
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=45, seed=5)
    got = oc.run_slots("torch", q, k, v, (4,), opts)
    oc.assert_close(got, oc.run_slots("reference", q, k, v, (4,), opts), 1e-12, "torch vs reference")
    stacked = oc.run_slots("torch", q, k, v, (4,), {**opts, "retrieve_frame": "stacked"})
    assert (got - stacked).abs().max() > 1e-6, "with two or more chosen blocks the ordered frame must differ"


@pytest.mark.parametrize("opts", ORDERED_OPTIONS[1::5], ids=_id)
def test_ordered_frame_three_axes_holes_and_positions(opts):
    n = 53
    q, k, v = oc.make_qkv(batch=3, hq=6, hkv=2, n=n, seed=7)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, 12:16] = False
    valid[1, :10] = False
    positions = torch.arange(n, dtype=oc.F64)[None].expand(3, n) + torch.tensor([[0.0], [5.0], [17.0]], dtype=oc.F64)
    got = oc.run_slots("torch", q, k, v, (3, 4), opts, valid=valid, positions=positions)
    want = oc.run_slots("reference", q, k, v, (3, 4), opts, valid=valid, positions=positions)
    oc.assert_close(got, want, 1e-12, "torch vs reference")


def test_ordered_frame_with_one_block_is_the_stacked_frame():
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=41, seed=8)
    opts = {"rope": "axis", "sinks": 2, "local": "window", "merge": "lse", "retrieve": 1}
    ordered = oc.run_slots("torch", q, k, v, (4,), {**opts, "retrieve_frame": "ordered"})
    oc.assert_close(ordered, oc.run_slots("torch", q, k, v, (4,), opts), 1e-12, "one block has rank 0")


@pytest.mark.parametrize("opts", ORDERED_OPTIONS[::4], ids=_id)
def test_ordered_frame_causal(opts):
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=37, seed=9)
    check_causal(lambda q, k, v: oc.run_slots("torch", q, k, v, (4,), opts), q, k, v, [0, 8, 11, 17, 30])


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_ordered_frame_is_exact_attention_over_the_chosen_blocks_laid_end_to_end(backend):
    """Without sinks and long-range hops, a query in the ordered frame computes exact causal
    attention over the sequence [its chosen blocks in order, its local range], RoPE'd at
    consecutive positions: what the model saw in pre-training, whatever the true distance."""
    from ctxext.attention.retrieve import chosen_rank, selection_frame
    from ctxext.attention.rope import rerotate

    n_tok, block, retrieve = 48, 4, 3
    q0, k0, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=n_tok, seed=11)  # unrotated q, k
    inv = oc.rope_inv_freq(q0.shape[-1])
    pos = torch.arange(n_tok, dtype=oc.F64)
    q, k = rerotate(q0, pos, inv), rerotate(k0, pos, inv)  # RoPE'd at their positions
    opts = {"rope": "axis", "local": "window", "long_range": False, "retrieve": retrieve, "retrieve_frame": "ordered"}
    got = oc.run_slots(backend, q, k, v, (block,), opts)[0]  # (H, N, D)
    o = oc.options((block,), **opts)
    qs, ks = selection_frame(q, k, pos[None], o, inv, block)
    chosen = select_far_blocks(qs, ks, torch.ones(1, n_tok, dtype=torch.bool), o, block)[0]  # (H, N, nb)
    assert (chosen_rank(chosen)[chosen] < retrieve).all()
    checked = 0
    for h in range(2):
        for p in range(3 * block, n_tok, 5):
            start = p // block * block - block
            far = [t for b in chosen[h, p].nonzero().flatten().tolist() for t in range(b * block, (b + 1) * block)]
            keys = far + list(range(start, p + 1))
            at = torch.arange(len(keys), dtype=oc.F64)
            kk = rerotate(k0[0, 0, keys], at, inv)
            qq = rerotate(q0[0, h, p], at[-1:], inv)[0]
            want = torch.softmax(kk @ qq * q0.shape[-1] ** -0.5, dim=0) @ v[0, 0, keys]
            oc.assert_close(got[h, p], want, 1e-12, f"query {p}, head {h}")
            checked += len(far) == retrieve * block
    assert checked > 5, "the test must cover queries with every retrieved block chosen"


def test_bad_retrieve_frame_is_named():
    with pytest.raises(TensorizedConfigError, match=r"tensorized_attention\.retrieve_frame: unknown mode 'sorted'"):
        TensorizedOptions.from_dict({"retrieve_frame": "sorted"})


def test_ordered_frame_gradients_match_finite_differences():
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=23, dim=4, seed=6, requires_grad=True)
    opts = {"rope": "axis", "sinks": 1, "local": "window", "merge": "lse", "retrieve": 2, "retrieve_frame": "ordered"}
    assert torch.autograd.gradcheck(lambda q, k, v: oc.run_slots("torch", q, k, v, (4,), opts), (q, k, v))


def test_convert_names_a_bad_retrieve_frame_as_its_flag(tmp_path):
    from typer.testing import CliRunner

    from ctxext.cli import app
    from tests.unit.test_convert import _save_source

    src = _save_source(tmp_path / "src")
    bad = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "bad"), "--retrieve-frame", "sorted"])
    assert bad.exit_code != 0 and "--retrieve-frame: unknown mode 'sorted'" in bad.output, bad.output
    assert not (tmp_path / "bad").exists()


def test_the_choice_is_the_same_when_made_in_chunks_of_queries(monkeypatch):
    """``far_block_index`` scores queries in chunks (memory O(L), not O(L * L / m)); the chunk size
    changes nothing, and :func:`select_far_blocks` is the same choice as a mask."""
    from ctxext.attention import retrieve

    n, block = 70, 8
    q, k, _ = oc.make_qkv(batch=2, hq=4, hkv=2, n=n, seed=21)
    o = oc.options((block,), sinks=2, local="window", long_range=False, retrieve=3, retrieve_block=4)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 30:38] = False  # block 30..37 of m=4 has no retrievable key in row 1
    key_ok = retrievable_keys(valid, o.sinks)
    whole = retrieve.far_block_index(q, k, key_ok, o, block)
    assert whole.shape == (2, 4, n, 3) and (whole == -1).any() and (whole >= 0).any()
    for budget in (1, 2 * 4 * 18 * 5):  # one query per chunk; 5 queries per chunk (n = 70 is not a multiple)
        monkeypatch.setattr(retrieve, "SELECT_SCORE_BUDGET", budget)
        assert torch.equal(retrieve.far_block_index(q, k, key_ok, o, block), whole)
    mask = select_far_blocks(q, k, key_ok, o, block)
    rebuilt = torch.zeros_like(mask)
    for idx in zip(*torch.nonzero(whole >= 0, as_tuple=True)):
        rebuilt[idx[:3] + (whole[idx],)] = True
    assert torch.equal(mask, rebuilt)
    assert not mask[1, :, :, 30 // 4 + 1].any()  # blocks 8 (slots 32..35) hold no retrievable key in row 1
