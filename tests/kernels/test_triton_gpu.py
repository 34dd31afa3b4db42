"""The compiled Triton kernels on CUDA (``gpu`` marker: skipped without CUDA).

Realistic head dims (64, 128), GQA (Hq=8, Hkv=2), odd lengths (1, 113, 1023, 4097), the
default block (128,) and two-level blocks. Invariant 8: in bfloat16/float16 the kernel's
error against a float64 reference (the torch backend in float64) is at most twice the torch
backend's own error in the same dtype, plus a small atol; float32 matches closely.
"""

from __future__ import annotations

import sys

import pytest
import torch

try:
    from ..unit import operator_cases as oc
except ImportError:  # run from inside tests/kernels
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "unit"))
    import operator_cases as oc

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled")]
F64 = torch.float64
CUDA = torch.device("cuda")


def qkv(n, dim, dtype, hq=8, hkv=2, batch=2, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = ((batch, hq, n, dim), (batch, hkv, n, dim), (batch, hkv, n, dim))
    return [torch.randn(s, generator=gen, dtype=F64).to(CUDA, dtype) for s in shapes]


def run(backend, q, k, v, block_sizes, opts, weight=None, **kw):
    """Output (and grads of ``(out * weight).sum()`` when weight is given) of a backend on slots."""
    from ctxext.attention.torch_backend import torch_tensorized_attention
    from ctxext.attention.triton_backend import triton_tensorized_attention

    fn = triton_tensorized_attention if backend == "triton" else torch_tensorized_attention
    o = oc.options(block_sizes, **opts)
    inv = oc.rope_inv_freq(q.shape[-1]).to(CUDA) if o.rope == "axis" else None
    if weight is None:
        with torch.no_grad():
            return (fn(q, k, v, o, inv_freq=inv, **kw),)
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, o, inv_freq=inv, **kw)
    return (out, *torch.autograd.grad((out.to(weight.dtype) * weight).sum(), (q, k, v)))


def assert_within_twice_torch(dtype, block_sizes, n, dim, opts, grads=True, **kw):
    q, k, v = qkv(n, dim, F64)
    weight = torch.randn(q.shape, device=CUDA, dtype=torch.float32) if grads else None
    want = run("torch", q, k, v, block_sizes, opts, weight.to(F64) if grads else None, **kw)
    low = [x.to(dtype) for x in (q, k, v)]
    got = run("triton", *low, block_sizes, opts, weight, **kw)
    control = run("torch", *low, block_sizes, opts, weight, **kw)
    for what, g, c, w in zip(("out", "dq", "dk", "dv"), got, control, want):
        err = (g.to(F64) - w).abs().max().item()
        ref_err = (c.to(F64) - w).abs().max().item()
        assert torch.isfinite(g).all(), f"{what}: non-finite"
        assert err <= 2 * ref_err + 1e-3, f"{dtype} {what}: kernel error {err:.3e} > 2 x torch error {ref_err:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize(
    "opts",
    [
        dict(causal="complete"),
        dict(causal="complete", rope="axis", merge="lse"),
        dict(causal="dominance", rope="axis"),
        dict(causal="complete", local="window", merge="mass"),
    ],
    ids=["complete", "complete-axis-lse", "dominance-axis", "complete-window-mass"],
)
def test_half_precision_forward_and_grads(opts, dim, dtype):
    assert_within_twice_torch(dtype, (16, 32), 1023, dim, opts)


@pytest.mark.parametrize("n", [1, 113, 4097])
def test_default_block_odd_lengths_bf16(n):
    assert_within_twice_torch(torch.bfloat16, (128,), n, 128, dict(causal="complete"), grads=n < 4097)


def test_float32_matches_float64():
    q, k, v = qkv(1023, 64, F64)
    opts = dict(causal="complete", rope="axis")
    weight = torch.randn(q.shape, device=CUDA, dtype=torch.float32)
    want = run("torch", q, k, v, (8, 16), opts, weight.to(F64), softcap=30.0)
    got = run("triton", *(x.float() for x in (q, k, v)), (8, 16), opts, weight, softcap=30.0)
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = (g.to(F64) - w).abs().max().item()
        assert err < 1e-4, f"float32 {what}: error {err:.3e}"


def test_public_api_left_padding_and_auto_backend():
    from ctxext import tensorized_attention
    from ctxext.attention import ops

    n = 300
    q, k, v = qkv(n, 64, torch.bfloat16)
    mask, pos = oc.left_padding([n, n - 37], n)
    mask, pos = mask.to(CUDA), pos.to(CUDA)
    opts = oc.options((64,), rope="axis")
    assert ops.resolve_backend("auto", CUDA, opts, torch.bfloat16, 64) == "triton"
    inv = oc.rope_inv_freq(64).to(CUDA)
    kw = dict(block_sizes=(64,), rope="axis", padding_mask=mask, position_ids=pos, rope_inv_freq=inv)
    got = tensorized_attention(q, k, v, backend="auto", **kw)
    want = tensorized_attention(q.double(), k.double(), v.double(), backend="torch", **kw)
    control = tensorized_attention(q, k, v, backend="torch", **kw)
    err = (got.double() - want).abs().max().item()
    ref_err = (control.double() - want).abs().max().item()
    assert err <= 2 * ref_err + 1e-3
    assert got[1, :, :37].abs().max() == 0  # padding tokens get zeros


SHIPPED = dict(sinks=4, local="window", long_range=False, retrieve=8, retrieve_block=64)  # recipes/*.yaml


@pytest.mark.parametrize(
    "opts",
    [SHIPPED, dict(SHIPPED, rope="axis"), dict(SHIPPED, long_range=True, merge="lse", retrieve=2)],
    ids=["shipped", "shipped-axis", "hops-lse-retrieve2"],
)
def test_shipped_attention_sinks_and_retrieval_bf16(opts):
    """The recipes' attention on the kernels (sinks and retrieval as side streams), forward and grads."""
    assert_within_twice_torch(torch.bfloat16, (128,), 2049, 64, opts, softcap=30.0)


def test_shipped_attention_runs_fused_under_auto():
    from ctxext.attention import ops

    assert ops.resolve_backend("auto", CUDA, oc.options((128,), **SHIPPED), torch.bfloat16, 64) == "triton"


def test_two_stage_choice_of_the_shipped_recipes_bf16():
    """``retrieve_candidates: 32`` (the default since round 15) where the choice has two stages:
    at 4,097 slots there are 64 far blocks of 64, so the bound's 32 candidates are a real cut."""
    assert_within_twice_torch(torch.bfloat16, (128,), 4097, 64, dict(SHIPPED, retrieve_candidates=32), softcap=30.0)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fused_choice_makes_the_torch_choice_on_cuda(precision):
    """The fused far-block choice (``ctxext/_kernels/choose.py``) at Llama-3.1-8B's attention shape, 8,191 slots
    (128 far blocks of 64, 32 candidates, 8 chosen): the PyTorch choice's blocks but for near-ties (scores summed
    in another order), in float32 (``ieee``) and with the bound in tf32 (as for a bfloat16 model)."""
    from ctxext.attention import fused_choice
    from ctxext.attention.retrieve import far_block_index, retrievable_keys

    n = 8191
    q, k, _ = qkv(n, 128, torch.float32, hq=32, hkv=8, batch=1, seed=5)
    opts = oc.options((128,), **dict(SHIPPED, retrieve_candidates=32))
    key_ok = retrievable_keys(torch.ones(1, n, dtype=torch.bool, device=CUDA), opts.sinks)
    assert fused_choice.unsupported_reason(opts, q.dtype, q.device) is None
    got = fused_choice.choose(q, k, key_ok, opts, 128, precision).long().sort(-1).values
    want = far_block_index(q, k, key_ok, opts, 128).sort(-1).values
    same = (got == want).all(-1).float().mean().item()
    assert same > (0.999 if precision == "ieee" else 0.99), f"{same:.4%} of the queries chose the same blocks"
