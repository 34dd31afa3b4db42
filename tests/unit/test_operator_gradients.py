"""Gradients of the torch backend (DESIGN.md section 1, invariant 7).

float64 ``gradcheck`` on tiny shapes (finite differences against autograd), and the torch
backend's gradients against the reference's autograd gradients over the option matrix.
"""

from __future__ import annotations

import pytest
import torch

try:
    from . import operator_cases as oc
except ImportError:
    import operator_cases as oc

single_thread = oc.single_thread  # autouse fixture
F64 = torch.float64

GRADCHECK_CASES = {
    "b4-complete": ((4,), dict(causal="complete")),
    "b4-dominance": ((4,), dict(causal="dominance")),
    "b4-complete-lse-s2-window": ((4,), dict(causal="complete", merge="lse", sinks=2, local="window")),
    "b4-complete-axis-s2": ((4,), dict(causal="complete", rope="axis", sinks=2)),
    "b3x2-complete": ((3, 2), dict(causal="complete")),
    "b3x2-complete-axis-lse-s2-window": (
        (3, 2),
        dict(causal="complete", rope="axis", merge="lse", sinks=2, local="window"),
    ),
    "b3x2-dominance-axis-lse-window": ((3, 2), dict(causal="dominance", rope="axis", merge="lse", local="window")),
    "b3x2-dominance-s1": ((3, 2), dict(causal="dominance", sinks=1)),
    "b3x2-complete-mass-s2": ((3, 2), dict(causal="complete", merge="mass", sinks=2)),
    "b3x2-localonly-window-s1": ((3, 2), dict(causal="complete", long_range=False, local="window", sinks=1)),
}


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_torch_backend(name):
    block_sizes, opts = GRADCHECK_CASES[name]
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=11, dim=4, seed=1, requires_grad=True)

    def fn(q, k, v):
        return oc.run_slots("torch", q, k, v, block_sizes, opts)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("padding", ["left", "holes"])
@pytest.mark.parametrize(
    "opts",
    [dict(causal="complete", merge="lse", sinks=2), dict(causal="dominance", rope="axis", local="window")],
    ids=["complete-lse-s2", "dominance-axis-window"],
)
def test_gradcheck_through_padding_and_fold(opts, padding):
    """The public path: fold by position ids, masked slots, unfold; softcap on."""
    n = 11
    q, k, v = oc.make_qkv(batch=2, hq=2, hkv=1, n=n, dim=4, seed=2, requires_grad=True)
    if padding == "left":
        mask, pos = oc.left_padding([n, n - 4], n)
    else:
        mask, pos = torch.ones(2, n, dtype=torch.long), None
        mask[0, [2, 6, 7]] = 0
        mask[1, :3] = 0

    def fn(q, k, v):
        return oc.run_api("torch", q, k, v, (3, 2), opts, padding_mask=mask, position_ids=pos, softcap=2.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def grads(backend, q, k, v, block_sizes, opts, weight, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = oc.run_slots(backend, q, k, v, block_sizes, opts, **kw)
    return torch.autograd.grad((out * weight).sum(), (q, k, v))


GRAD_CASES = [((3, 2), 23), ((4,), 19)]


@pytest.mark.parametrize("opts", oc.option_matrix(), ids=oc.option_id)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "b" + "x".join(map(str, c[0])) + f"-n{c[1]}")
def test_torch_gradients_match_reference(case, opts):
    block_sizes, n = case
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, dim=8, seed=n)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = grads("torch", q, k, v, block_sizes, opts, weight)
    want = grads("reference", q, k, v, block_sizes, opts, weight)
    for name, g, w in zip("qkv", got, want):
        assert w.abs().max() > 1e-3, f"reference gradient of {name} is trivially zero"
        oc.assert_close(g, w, 1e-9, f"d{name}")


@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_torch_gradients_match_reference_masked_slots_softcap(opts):
    n = 23
    q, k, v = oc.make_qkv(batch=3, hq=4, hkv=2, n=n, dim=8, seed=5)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0, [1, 6, 7, 8, 9, 20]] = False
    valid[1, :7] = False
    valid[2] = False
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = dict(valid=valid, softcap=3.0, scaling=0.5)
    got = grads("torch", q, k, v, (3, 2), opts, weight, **kw)
    want = grads("reference", q, k, v, (3, 2), opts, weight, **kw)
    for name, g, w in zip("qkv", got, want):
        oc.assert_close(g, w, 1e-9, f"d{name}")
        assert (g[2] == 0).all(), f"d{name}: an all-masked row must get zero gradient"


def test_bfloat16_backward_is_finite():
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=37, dim=16, dtype=torch.bfloat16, seed=3, requires_grad=True)
    out = oc.run_api("torch", q, k, v, (3, 4), dict(causal="complete", merge="lse", sinks=2))
    out.float().square().sum().backward()
    for name, x in zip("qkv", (q, k, v)):
        assert x.grad.dtype == torch.bfloat16
        assert torch.isfinite(x.grad.float()).all() and x.grad.float().abs().max() > 0, name
