"""``retrieve_block = m``: far blocks of m slots, a divisor of the inner block n, retrieved at a
finer grain than the local window. The torch backend against the reference, what a query reads,
the exact-attention identities, the decode cache, and the errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from ctxext.attention.options import TensorizedConfigError, TensorizedOptions
from ctxext.attention.retrieve import retrievable_keys, select_far_blocks, selection_frame

from . import operator_cases as oc
from .convert_flag_check import check_convert_flag, converted_settings
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)
from .test_operator_invariants import check_causal

BLOCK_OPTIONS = [
    {"causal": c, "rope": rope, "sinks": s, "local": lo, "merge": "lse", "long_range": lr, "retrieve": r,
     "retrieve_frame": frame, "retrieve_block": 2}
    for c, rope, s, lo, lr, r, frame in itertools.product(
        oc.CAUSAL, oc.ROPE, oc.SINKS, oc.LOCAL, oc.LONG_RANGE, (1, 3), ("stacked", "ordered")
    )
    if rope == "axis" or frame == "stacked"
]  # fmt: skip


def _id(o: dict) -> str:
    return oc.option_id(o) + f"-r{o['retrieve']}-{o['retrieve_frame']}"


@pytest.mark.parametrize("opts", BLOCK_OPTIONS[::3], ids=_id)
def test_torch_matches_reference(opts):
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=45, seed=5)
    got = oc.run_slots("torch", q, k, v, (4,), opts)
    oc.assert_close(got, oc.run_slots("reference", q, k, v, (4,), opts), 1e-12, "torch vs reference")
    whole = oc.run_slots("torch", q, k, v, (4,), {**opts, "retrieve_block": 0})
    assert (got - whole).abs().max() > 1e-6, "blocks of 2 must choose differently from blocks of 4"


@pytest.mark.parametrize("opts", BLOCK_OPTIONS[1::8], ids=_id)
def test_torch_matches_reference_three_axes_holes_and_positions(opts):
    n = 53
    q, k, v = oc.make_qkv(batch=3, hq=6, hkv=2, n=n, seed=7)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, 12:16] = False
    valid[1, :10] = False
    valid[2, -6:] = False
    positions = torch.arange(n, dtype=oc.F64)[None].expand(3, n) + torch.tensor([[0.0], [5.0], [17.0]], dtype=oc.F64)
    got = oc.run_slots("torch", q, k, v, (3, 4), opts, valid=valid, positions=positions)
    want = oc.run_slots("reference", q, k, v, (3, 4), opts, valid=valid, positions=positions)
    oc.assert_close(got, want, 1e-12, "torch vs reference")
    assert (got.transpose(1, 2)[~valid] == 0).all(), "masked slots must output zeros"


@pytest.mark.parametrize("rope", oc.ROPE)
def test_retrieve_block_equal_to_the_inner_block_is_the_default(rope):
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=41, seed=8)
    opts = {"rope": rope, "sinks": 2, "local": "window", "merge": "lse", "retrieve": 2}
    same = oc.run_slots("torch", q, k, v, (4,), {**opts, "retrieve_block": 4})
    oc.assert_close(same, oc.run_slots("torch", q, k, v, (4,), opts), 0.0, "retrieve_block = n")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("local", oc.LOCAL)
def test_retrieving_every_far_block_is_exact_attention(backend, local):
    """Window + sinks + every far block of m slots read exactly = every earlier token, each once."""
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=39, seed=3)
    opts = {"sinks": 2, "local": local, "long_range": False, "retrieve": 20, "retrieve_block": 2}
    oc.assert_close(oc.run_slots(backend, q, k, v, (4,), opts), oc.causal_sdpa(q, k, v), 1e-12, "all far vs SDPA")


@pytest.mark.parametrize("rope", oc.ROPE)
def test_a_query_reads_whole_chosen_blocks_of_m_beside_its_window_of_n(rope):
    n, block, m, sinks, retrieve = 40, 8, 2, 2, 3
    q, k, _ = oc.make_qkv(batch=1, hq=2, hkv=1, n=n, seed=4)
    opts = {"rope": rope, "sinks": sinks, "local": "window", "long_range": False, "retrieve": retrieve,
            "retrieve_block": m}  # fmt: skip
    w = oc.weight_matrix(lambda q, k, v: oc.run_slots("torch", q, k, v, (block,), opts), q, k, 1)[0]  # (H, N, N)
    local = oc.local_set(n, block, sinks, window=True)
    o = oc.options((block,), **opts)
    qs, ks = selection_frame(q, k, torch.arange(n, dtype=oc.F64)[None], o, oc.rope_inv_freq(q.shape[-1]), block)
    chosen = select_far_blocks(qs, ks, retrievable_keys(torch.ones(1, n, dtype=torch.bool), sinks), o, block)[0]
    assert chosen.shape[-1] == n // m
    for h in range(2):
        for p in range(n):
            far = (w[h, p] != 0) & ~local[p]
            blocks = sorted({t // m for t in far.nonzero().flatten().tolist()})
            start = max(p // block * block - block, 0)
            eligible = len([b for b in range(start // m) if (b + 1) * m > sinks])  # blocks of sinks only: none
            assert len(blocks) == min(retrieve, eligible), f"query {p}, head {h}: far blocks {blocks}"
            assert blocks == chosen[h, p].nonzero().flatten().tolist()
            for b in blocks:
                want = torch.zeros(n, dtype=torch.bool)
                want[max(b * m, sinks) : (b + 1) * m] = True
                assert torch.equal(far & want, want), f"query {p} read block {b} only in part"


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_ordered_frame_is_exact_attention_over_blocks_of_m_laid_end_to_end(backend):
    """No sinks, no long-range hops, ordered frame: a query attends exactly over [its chosen
    blocks of m in order, its window of 2n], RoPE'd at consecutive positions."""
    from ctxext.attention.retrieve import chosen_rank
    from ctxext.attention.rope import rerotate

    n_tok, block, m, retrieve = 48, 4, 2, 3
    q0, k0, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=n_tok, seed=11)
    inv = oc.rope_inv_freq(q0.shape[-1])
    pos = torch.arange(n_tok, dtype=oc.F64)
    q, k = rerotate(q0, pos, inv), rerotate(k0, pos, inv)
    opts = {"rope": "axis", "local": "window", "long_range": False, "retrieve": retrieve, "retrieve_frame": "ordered",
            "retrieve_block": m}  # fmt: skip
    got = oc.run_slots(backend, q, k, v, (block,), opts)[0]  # (H, N, D)
    o = oc.options((block,), **opts)
    qs, ks = selection_frame(q, k, pos[None], o, inv, block)
    chosen = select_far_blocks(qs, ks, torch.ones(1, n_tok, dtype=torch.bool), o, block)[0]  # (H, N, N / m)
    assert (chosen_rank(chosen)[chosen] < retrieve).all()
    checked = 0
    for h in range(2):
        for p in range(3 * block, n_tok, 3):
            start = p // block * block - block
            far = [t for b in chosen[h, p].nonzero().flatten().tolist() for t in range(b * m, (b + 1) * m)]
            keys = far + list(range(start, p + 1))
            at = torch.arange(len(keys), dtype=oc.F64)
            kk = rerotate(k0[0, 0, keys], at, inv)
            qq = rerotate(q0[0, h, p], at[-1:], inv)[0]
            want = torch.softmax(kk @ qq * q0.shape[-1] ** -0.5, dim=0) @ v[0, 0, keys]
            oc.assert_close(got[h, p], want, 1e-12, f"query {p}, head {h}")
            checked += len(far) == retrieve * m
    assert checked > 5, "the test must cover queries with every retrieved block chosen"


@pytest.mark.parametrize("opts", BLOCK_OPTIONS[::9], ids=_id)
def test_causal(opts):
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=37, seed=9)
    check_causal(lambda q, k, v: oc.run_slots("torch", q, k, v, (4,), opts), q, k, v, [0, 8, 11, 17, 30])


def test_gradients_match_finite_differences():
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=19, dim=4, seed=6, requires_grad=True)
    opts = {"rope": "axis", "sinks": 1, "local": "window", "merge": "lse", "retrieve": 2, "retrieve_block": 2}
    assert torch.autograd.gradcheck(lambda q, k, v: oc.run_slots("torch", q, k, v, (4,), opts), (q, k, v))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3, r"retrieve_block: 3 does not divide the inner block 8 \(block_sizes=\[8\]\); use a divisor such as 4"),
        (-1, r"retrieve_block: expected 0 \(the inner block\) or a positive integer, got -1"),
        (True, r"retrieve_block: expected 0 .* got True"),
        (16, r"retrieve_block: 16 does not divide the inner block 8"),
    ],
)
def test_bad_retrieve_block_is_named(value, message):
    with pytest.raises(TensorizedConfigError, match=rf"tensorized_attention\.{message}"):
        TensorizedOptions.from_dict({"block_sizes": [8], "retrieve": 2, "retrieve_block": value})


def test_convert_flag_reaches_the_model_and_the_decode_cache_matches_one_forward(tmp_path):
    flags = ["--retrieve", "3", "--retrieve-block", "4"]
    check_convert_flag(tmp_path, flags, "retrieve_block", 4, off=0, same_before=16, bad_value="3")


@pytest.mark.parametrize(
    ("args", "want"),
    [([], (128, 8, 64)), (["--block-sizes", "256"], (256, 8, 64)), (["--block-sizes", "8"], (8, 8, 0)),
     (["--block-sizes", "64"], (64, 8, 0)), (["--retrieve-block", "32"], (128, 8, 32))],
)  # fmt: skip
def test_convert_defaults_to_far_blocks_of_64_where_64_divides_the_inner_block(tmp_path, args, want):
    """Round 7's default: 8 far blocks of 64 beside a window of two blocks of n (n = 128)."""
    settings = converted_settings(tmp_path, args)
    assert (settings["block_sizes"][-1], settings["retrieve"], settings["retrieve_block"]) == want
