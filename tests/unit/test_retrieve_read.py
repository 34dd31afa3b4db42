"""Reading the chosen far blocks pair by pair (linear in N) equals the union path: outputs,
log-sum-exp and gradients, with GQA, soft-capping, unretrievable keys, partial blocks, queries
that chose nothing and chunks."""

from __future__ import annotations

import pytest
import torch

from ctxext.attention import retrieve
from ctxext.attention.options import TensorizedOptions

from .operator_cases import single_thread  # noqa: F401  (autouse fixture)


def _case(length: int, softcap: float | None, seed: int = 0):
    torch.manual_seed(seed)
    b, hq, hkv, d, n, m = 2, 6, 2, 8, 16, 8
    opts = TensorizedOptions(block_sizes=(n,), sinks=2, local="window", retrieve=3, retrieve_block=m)
    qs = torch.randn(b, hq, length, d, dtype=torch.float64, requires_grad=True)
    ks = torch.randn(b, hkv, length, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, length, d, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :13] = False  # left padding of row 1: whole blocks without a key
    key_ok = retrieve.retrievable_keys(valid, opts.sinks)
    key_ok[0, 40:44] = False  # part of a block
    index = retrieve.far_block_index(qs, ks, key_ok, opts, n)
    return qs, ks, v, index, key_ok, m, softcap


def _union(qs, ks, v, index, key_ok, m, softcap):
    nb = -(-ks.shape[2] // m)
    chosen = torch.zeros(*index.shape[:-1], nb + 1, dtype=torch.bool)
    chosen.scatter_(-1, index.clamp_min(-1) % (nb + 1), True)  # -1 lands on the extra column
    return retrieve.retrieved_attention(qs, ks, v, chosen[..., :nb], key_ok, m, softcap)


@pytest.mark.parametrize("budget", [1 << 24, 900], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("length", [150, 61], ids=["partial-last-block", "short"])
def test_reading_by_block_equals_the_union_path(monkeypatch, budget, softcap, length):
    monkeypatch.setattr(retrieve, "READ_PAIR_BUDGET", budget)
    qs, ks, v, index, key_ok, m, softcap = _case(length, softcap)
    assert (index < 0).any() and (index >= 0).any(), "the case must hold queries with and without far blocks"
    assert ((index < 0).all(-1)).any(), "... and queries that chose nothing"
    out, lse = retrieve.retrieved_attention_by_block(qs, ks, v, index, key_ok, m, softcap)
    want_out, want_lse = _union(qs, ks, v, index, key_ok, m, softcap)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert torch.allclose(lse[torch.isfinite(lse)], want_lse[torch.isfinite(want_lse)], atol=1e-12)
    assert torch.allclose(out, want_out, atol=1e-12)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse).masked_fill(torch.isinf(lse), 0)
    lse_term = lambda x: torch.where(torch.isfinite(x), x, 0.0)  # noqa: E731
    got = torch.autograd.grad((out * grad_out).sum() + (lse_term(lse) * grad_lse).sum(), (qs, ks, v))
    want = torch.autograd.grad((want_out * grad_out).sum() + (lse_term(want_lse) * grad_lse).sum(), (qs, ks, v))
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert torch.allclose(g, w, atol=1e-10), f"{name}: max diff {(g - w).abs().max():.2e}"
        assert g.abs().sum() > 0, name


def test_tiles_hold_every_pair_once():
    group = torch.tensor([3, 0, 3, 3, 1, 0, 3, 2])
    t = retrieve.pair_tiles(group, groups=5, per_query=2)
    assert sorted(t.at.tolist()) == t.at.unique().tolist() and t.at.numel() == group.numel()
    assert torch.equal(t.tile_group[t.at // t.rows], group), "each pair sits in a tile of its own key block"
    assert torch.equal(t.query[t.at], torch.arange(8) // 2), "each place knows its pair's query row"


@pytest.mark.parametrize("rope", ["absolute", "axis"])
def test_the_torch_backend_reads_the_same_either_way_and_matches_the_reference(monkeypatch, rope):
    """The whole torch backend with the shipped kind of settings (sinks, window, two-stage choice,
    soft-capping, padding), reading pair by pair (ratio 0) or over the union (ratio huge): the same
    output and gradients, and both equal the reference."""
    from .operator_cases import left_padding, make_qkv, run_slots

    q, k, v = make_qkv(batch=2, hq=4, hkv=2, n=140, dim=8, requires_grad=True)
    mask, _ = left_padding([140, 117], 140)
    opts = dict(sinks=2, local="window", long_range=False, rope=rope, retrieve=2, retrieve_block=4,
                retrieve_candidates=4)  # fmt: skip
    results = {}
    for name, ratio in (("by block", 0), ("union", 10**9)):
        monkeypatch.setattr(retrieve, "READ_UNION_MAX_RATIO", ratio)
        out = run_slots("torch", q, k, v, [8], opts, valid=mask.bool(), softcap=5.0)
        results[name] = (out, *torch.autograd.grad(out.pow(2).sum(), (q, k, v)))
    reference = run_slots("reference", q, k, v, [8], opts, valid=mask.bool(), softcap=5.0)
    for got, want in zip(results["by block"], results["union"], strict=True):
        assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(results["by block"][0], reference, atol=1e-12)


def test_the_path_follows_the_number_of_far_blocks(monkeypatch):
    calls = []
    monkeypatch.setattr(retrieve, "retrieved_attention_by_block", lambda *a: calls.append("by block"))
    monkeypatch.setattr(retrieve, "retrieved_attention", lambda *a: calls.append("union"))
    x = torch.zeros(1, 1, 64 * 4, 2)  # 64 far blocks of 4
    key_ok = torch.ones(1, 64 * 4, dtype=torch.bool)
    for k in (8, 7):
        retrieve.read_chosen_blocks(x, x, x, torch.zeros(1, 1, 64 * 4, k, dtype=torch.long), key_ok, 4, None)
    retrieve.read_chosen_blocks(x, x, x, torch.zeros(1, 1, 256, 7, dtype=torch.long), key_ok, 4, None, torch.ones(1))
    assert calls == ["union", "by block", "union"], "union up to 8x the blocks read; the ordered frame always"
