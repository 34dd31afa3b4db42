"""Pooled and learned far-entry summaries (``summary="pooled" | "learned"``): the torch backend
against the reference, the invariants of DESIGN.md section 1, gradients, and the switch's effect."""

from __future__ import annotations

import itertools

import pytest
import torch

from ctxext.attention.options import TensorizedConfigError, TensorizedOptions
from ctxext.attention.reference import reference_tensorized_attention
from ctxext.attention.torch_backend import torch_tensorized_attention

from . import operator_cases as oc
from .operator_cases import single_thread  # noqa: F401  (autouse fixture)

SUMMARY_OPTIONS = [
    {"causal": "complete", "rope": rope, "sinks": sinks, "local": local, "merge": merge, "summary": summary}
    for rope, sinks, local, merge, summary in itertools.product(
        oc.ROPE, oc.SINKS, oc.LOCAL, ("lse", "mass"), ("pooled", "learned")
    )
]


def _id(o: dict) -> str:
    return "-".join([o["rope"][:4], f"s{o['sinks']}", o["local"][:3], o["merge"], o["summary"]])


def _query(hq: int, dim: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(hq, dim, generator=torch.Generator().manual_seed(seed), dtype=oc.F64)


def _gate(hq: int, seed: int = 4) -> torch.Tensor:
    return torch.rand(hq, generator=torch.Generator().manual_seed(seed), dtype=oc.F64) * 1.5 - 0.25


def run(backend, q, k, v, block_sizes, opts, valid=None, summary_query=None, positions=None, summary_gate=None):
    o = oc.options(block_sizes, **opts)
    fn = reference_tensorized_attention if backend == "reference" else torch_tensorized_attention
    inv = oc.rope_inv_freq(q.shape[-1])
    kw = {k: t for k, t in (("summary_query", summary_query), ("summary_gate", summary_gate)) if t is not None}
    return fn(q, k, v, o, valid=valid, inv_freq=inv, positions=positions, **kw)


@pytest.mark.parametrize("opts", SUMMARY_OPTIONS, ids=_id)
@pytest.mark.parametrize("case", [((4,), 61, 4, 2), ((3, 4), 52, 6, 2)], ids=["b4-n61", "b3x4-n52"])
def test_torch_matches_reference(case, opts):
    block_sizes, n, hq, hkv = case
    q, k, v = oc.make_qkv(batch=2, hq=hq, hkv=hkv, n=n, dim=8, seed=n)
    learned = opts["summary"] == "learned"
    sq, gate = (_query(hq, 8), _gate(hq)) if learned else (None, None)
    got = run("torch", q, k, v, block_sizes, opts, summary_query=sq, summary_gate=gate)
    want = run("reference", q, k, v, block_sizes, opts, summary_query=sq, summary_gate=gate)
    oc.assert_close(got, want, 1e-10, "torch vs reference")


@pytest.mark.parametrize("opts", SUMMARY_OPTIONS[::3], ids=_id)
def test_torch_matches_reference_with_holes_and_positions(opts):
    n, block_sizes = 41, (3, 4)
    q, k, v = oc.make_qkv(batch=3, hq=4, hkv=2, n=n, dim=8, seed=11)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, 12:16] = False
    valid[1, :10] = False
    positions = torch.arange(n, dtype=oc.F64)[None].expand(3, n) + torch.tensor([[0.0], [5.0], [17.0]], dtype=oc.F64)
    sq, gate = (_query(4, 8), _gate(4)) if opts["summary"] == "learned" else (None, None)
    kw = {"valid": valid, "summary_query": sq, "positions": positions, "summary_gate": gate}
    got = run("torch", q, k, v, block_sizes, opts, **kw)
    want = run("reference", q, k, v, block_sizes, opts, **kw)
    oc.assert_close(got, want, 1e-10, "torch vs reference")
    assert (got.transpose(1, 2)[~valid] == 0).all(), "masked slots must output zeros"


@pytest.mark.parametrize("summary", ["pooled", "learned"])
@pytest.mark.parametrize("rope", oc.ROPE)
def test_one_block_equals_causal_sdpa(summary, rope):
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=13, dim=8, seed=2)
    opts = {"causal": "complete", "rope": rope, "merge": "mass", "summary": summary}
    got = run("torch", q, k, v, (16,), opts, summary_query=_query(4, 8) if summary == "learned" else None)
    oc.assert_close(got, oc.causal_sdpa(q, k, v), 1e-10, "one block vs SDPA")


@pytest.mark.parametrize("opts", SUMMARY_OPTIONS[::5], ids=_id)
def test_causal_convex_and_complete_reach(opts):
    """Changing a token never changes earlier outputs; v = 1 gives 1; every earlier token is reached."""
    n, block_sizes = 37, (3, 4)
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, dim=8, seed=5)
    sq, gate = (_query(4, 8), _gate(4)) if opts["summary"] == "learned" else (None, None)
    out = run("torch", q, k, v, block_sizes, opts, summary_query=sq, summary_gate=gate)
    for cut in (4, 11, 23):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, cut + 1 :] = torch.randn_like(x[:, :, cut + 1 :])
        out2 = run("torch", q2, k2, v2, block_sizes, opts, summary_query=sq, summary_gate=gate)
        oc.assert_close(out2[:, :, : cut + 1], out[:, :, : cut + 1], 1e-12, f"causal at cut {cut}")
    ones = run("torch", q, k, torch.ones_like(v), block_sizes, opts, summary_query=sq, summary_gate=gate)
    oc.assert_close(ones, torch.ones_like(ones), 1e-12, "convex")
    w = oc.weight_matrix(
        lambda q, k, v: run("torch", q, k, v, block_sizes, opts, summary_query=sq, summary_gate=gate), q, k, 2
    )
    reach = w.abs().sum(dim=(0, 1)) > 0
    assert torch.equal(reach, torch.tril(torch.ones(n, n, dtype=torch.bool))), "complete must reach every p' <= p"


def test_zero_learned_parameters_equal_token_and_gates_interpolate():
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=40, dim=8, seed=8)
    base = {"causal": "complete", "rope": "absolute", "sinks": 2, "local": "window", "merge": "mass"}
    zeros, ones = torch.zeros(4, 8, dtype=oc.F64), torch.ones(4, dtype=oc.F64)
    token = run("torch", q, k, v, (4,), {**base, "summary": "token"})
    pooled = run("torch", q, k, v, (4,), {**base, "summary": "pooled"})
    learned = {**base, "summary": "learned"}
    start = run("torch", q, k, v, (4,), learned, summary_query=zeros, summary_gate=0 * ones)
    oc.assert_close(start, token, 1e-12, "zero query and gate: summary='token'")
    oc.assert_close(
        run("torch", q, k, v, (4,), learned, summary_query=zeros, summary_gate=ones), pooled, 1e-12, "gate 1"
    )
    oc.assert_close(run("torch", q, k, v, (4,), learned, summary_query=zeros), pooled, 1e-12, "no gate: pooled")
    oc.assert_close(pooled[:, :, :4], token[:, :, :4], 1e-12, "one block is exact whatever the summary")
    assert (pooled[:, :, 8:] - token[:, :, 8:]).abs().max() > 1e-3, "pooled keys must change far scores"
    moved = run("torch", q, k, v, (4,), learned, summary_query=_query(4, 8), summary_gate=0 * ones)
    assert (moved[:, :, 8:] - token[:, :, 8:]).abs().max() > 1e-3, "a learned query must change summaries"
    half = run("torch", q, k, v, (4,), learned, summary_query=zeros, summary_gate=0.5 * ones)
    assert (half - token).abs().max() > 1e-3 and (half - pooled).abs().max() > 1e-3


@pytest.mark.parametrize("rope", oc.ROPE)
def test_gradients_match_reference_and_gradcheck(rope):
    opts = {"causal": "complete", "rope": rope, "sinks": 2, "local": "window", "merge": "mass", "summary": "learned"}
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=19, dim=4, seed=4, requires_grad=True)
    sq, gate = _query(4, 4).requires_grad_(), _gate(4).requires_grad_()
    grads = []
    for backend in ("torch", "reference"):
        out = run(backend, q, k, v, (3, 4), opts, summary_query=sq, summary_gate=gate)
        grads.append(torch.autograd.grad((out * torch.cos(out)).sum(), (q, k, v, sq, gate)))
    for name, got, want in zip(["q", "k", "v", "query", "gate"], *grads):
        oc.assert_close(got, want, 1e-10, f"grad {name}")
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=10, dim=4, seed=1, requires_grad=True)
    sq = _query(2, 4).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: run("torch", q, k, v, (2, 3), opts, summary_query=s), (q, k, v, sq)
    )


def test_options_refuse_summary_without_complete_lse():
    with pytest.raises(TensorizedConfigError, match="summary"):
        TensorizedOptions(causal="dominance", merge="lse", summary="pooled").validate()
    with pytest.raises(TensorizedConfigError, match="summary"):
        TensorizedOptions(merge="score", summary="learned").validate()
    with pytest.raises(TensorizedConfigError, match="summary: unknown mode 'landmark'"):
        TensorizedOptions(merge="lse", summary="landmark").validate()


def test_public_operator_checks_summary_query_and_frequencies():
    from ctxext import tensorized_attention

    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=20, dim=8)
    with pytest.raises(ValueError, match="rope_inv_freq"):
        tensorized_attention(q, k, v, block_sizes=(4,), merge="lse", summary="pooled")
    inv = oc.rope_inv_freq(8)
    zeros = {"shape": torch.zeros(3, 8, dtype=oc.F64), "ok": torch.zeros(4, 8, dtype=oc.F64)}
    bad_calls = [
        ("learned", {"summary_query": zeros["shape"]}, r"summary_query of shape \(3, 8\)"),
        ("pooled", {"summary_query": zeros["ok"]}, "needs summary='learned'"),
        ("learned", {"summary_gate": zeros["ok"]}, r"summary_gate of shape \(4, 8\)"),
    ]
    for mode, extra, match in bad_calls:
        with pytest.raises(ValueError, match=match):
            tensorized_attention(q, k, v, block_sizes=(4,), merge="lse", summary=mode, rope_inv_freq=inv, **extra)
    sq = _query(4, 8)
    for backend in ("torch", "reference"):
        out = tensorized_attention(
            q,
            k,
            v,
            block_sizes=(4,),
            merge="lse",
            summary="learned",
            rope_inv_freq=inv,
            summary_query=sq,
            backend=backend,
        )
        want = run("torch", q, k, v, (4,), {"merge": "lse", "summary": "learned"}, summary_query=sq)
        oc.assert_close(out, want, 1e-10, backend)
