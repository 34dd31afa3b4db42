"""The Triton backend against the reference, in Triton's CPU interpreter (DESIGN.md invariants 7, 8).

Tiny shapes and small blocks (the interpreter costs per element): odd lengths 1, 7, 23, 37,
113; two and three axes; GQA (Hq=4, Hkv=2); both causal modes, both RoPE modes, merge
``lse`` and ``mass``, ``local="window"``, softcap, ``long_range=False``, padding. float64
results must match the reference to rounding; float16/bfloat16 errors against a float64
reference may be at most twice the torch backend's error in the same dtype (plus a small atol).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

try:
    from ..unit import operator_cases as oc
except ImportError:  # run from inside tests/kernels
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "unit"))
    import operator_cases as oc

pytestmark = pytest.mark.usefixtures("interpreter")
single_thread = oc.single_thread  # autouse fixture
F64 = torch.float64


def triton_slots(q, k, v, block_sizes, opts, **kw):
    from ctxext.attention.triton_backend import triton_tensorized_attention

    o = oc.options(block_sizes, **opts)
    inv = oc.rope_inv_freq(q.shape[-1]) if o.rope == "axis" else None
    return triton_tensorized_attention(q, k, v, o, inv_freq=inv, **kw)


FORWARD_CASES = {
    "b4-n1-complete": ((4,), 1, dict(causal="complete")),
    "b4-n7-dominance": ((4,), 7, dict(causal="dominance")),
    "b8-n113-complete": ((8,), 113, dict(causal="complete")),
    "b4x4-n37-complete-axis": ((4, 4), 37, dict(causal="complete", rope="axis")),
    "b4x4-n37-dominance-axis-lse": ((4, 4), 37, dict(causal="dominance", rope="axis", merge="lse")),
    "b3x2-n23-complete-lse": ((3, 2), 23, dict(causal="complete", merge="lse")),
    "b3x2-n23-localonly": ((3, 2), 23, dict(causal="complete", long_range=False)),
    "b4x4-n37-complete-window-axis": ((4, 4), 37, dict(causal="complete", local="window", rope="axis")),
}


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_matches_reference_float64(name):
    block_sizes, n, opts = FORWARD_CASES[name]
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, dim=8, seed=3)
    got = triton_slots(q, k, v, block_sizes, opts)
    want = oc.run_slots("reference", q, k, v, block_sizes, opts)
    oc.assert_close(got, want, 1e-12, name)


def test_forward_softcap_scaling_positions_valid():
    """Slots with RoPE positions that are not ``arange`` (left padding), holes in ``valid``, softcap."""
    n = 21
    q, k, v = oc.make_qkv(batch=2, hq=2, hkv=1, n=n, dim=8, seed=4)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[0, 15:] = False  # a short row
    valid[1, [2, 9]] = False
    positions = torch.arange(n)[None].repeat(2, 1) + torch.tensor([[5], [0]])
    opts = dict(causal="complete", rope="axis", merge="lse")
    kw = dict(valid=valid, positions=positions, softcap=1.5, scaling=0.3)
    got = triton_slots(q, k, v, (3, 2), opts, **kw)
    want = oc.run_slots("reference", q, k, v, (3, 2), opts, **kw)
    oc.assert_close(got, want, 1e-12, "forward with positions/valid/softcap")
    assert got[0, :, 15:].abs().max() == 0 and got[1, :, [2, 9]].abs().max() == 0


def _grads(run, q, k, v, weight):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = run(q, k, v)
    return (out, *torch.autograd.grad((out * weight).sum(), (q, k, v)))


# name: (block_sizes, n, (Hq, Hkv), options, softcap)
GRAD_CASES = {
    "b4x4-n37-complete-axis-lse-softcap": ((4, 4), 37, (4, 2), dict(causal="complete", rope="axis", merge="lse"), 2.0),
    "b3x2-n23-dominance-gqa": ((3, 2), 23, (4, 2), dict(causal="dominance"), None),
    "b4-n13-complete-mha": ((4,), 13, (2, 2), dict(causal="complete"), None),
    "b3x2-n19-dominance-axis-lse-softcap": (
        (3, 2),
        19,
        (2, 1),
        dict(causal="dominance", rope="axis", merge="lse"),
        1.0,
    ),
    "b3x3-n25-complete-mass-softcap": ((3, 3), 25, (2, 1), dict(causal="complete", merge="mass"), 2.0),
    "b3x4-n29-complete-window-lse-softcap": ((3, 4), 29, (4, 2), dict(local="window", merge="lse"), 1.5),
    "b4-n15-dominance-window-localonly": ((4,), 15, (2, 1), dict(causal="dominance", local="window"), None),
    "b5x3-n31-complete-g3-localonly": ((5, 3), 31, (3, 1), dict(causal="complete", long_range=False), None),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_reference_float64(name):
    block_sizes, n, (hq, hkv), opts, softcap = GRAD_CASES[name]
    q, k, v = oc.make_qkv(batch=1, hq=hq, hkv=hkv, n=n, dim=8, seed=5)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    got = _grads(lambda q, k, v: triton_slots(q, k, v, block_sizes, opts, softcap=softcap), q, k, v, weight)
    want = _grads(
        lambda q, k, v: oc.run_slots("reference", q, k, v, block_sizes, opts, softcap=softcap), q, k, v, weight
    )
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        oc.assert_close(a, b, 1e-11, f"{name} {what}")


def test_partial_rotary_odd_head_dim_and_group_of_three():
    """Head dim 12 (padded to a 16-wide tile), RoPE on 8 of its dims, 3 query heads per key head."""
    from ctxext.attention.triton_backend import triton_tensorized_attention

    q, k, v = oc.make_qkv(batch=1, hq=3, hkv=1, n=29, dim=12, seed=13)
    o = oc.options((3, 4), causal="complete", rope="axis", merge="lse")
    inv = oc.rope_inv_freq(8)  # (4,): rotary dims 0..7, dims 8..11 unrotated
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(14), dtype=F64)
    got = _grads(lambda q, k, v: triton_tensorized_attention(q, k, v, o, inv_freq=inv), q, k, v, weight)
    want = _grads(lambda q, k, v: oc.reference_tensorized_attention(q, k, v, o, inv_freq=inv), q, k, v, weight)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        oc.assert_close(a, b, 1e-11, f"partial rotary {what}")


@pytest.mark.parametrize(
    "opts",
    [dict(causal="complete", rope="axis"), dict(causal="dominance", merge="lse", local="window")],
    ids=["complete-axis", "dom-lse-window"],
)
def test_public_api_with_padding_matches_torch_backend(opts):
    """``backend="triton"`` through fold/unfold: left padding with shifted position ids, and holes."""
    n = 17
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=n, dim=8, seed=7)
    mask, pos = oc.left_padding([n, n - 6], n)
    mask[0, [3, 4]] = 0  # holes in the first row
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    kw = dict(padding_mask=mask, position_ids=pos, softcap=3.0)
    got = _grads(lambda q, k, v: oc.run_api("triton", q, k, v, (3, 2), opts, **kw), q, k, v, weight)
    want = _grads(lambda q, k, v: oc.run_api("torch", q, k, v, (3, 2), opts, **kw), q, k, v, weight)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        oc.assert_close(a, b, 1e-11, f"api {what}")


HALF_CASES = {
    "hops-axis-lse": dict(causal="complete", rope="axis", merge="lse"),
    "sinks-window-retrieve-axis": dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2,
                                       rope="axis"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HALF_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_error_at_most_twice_torch_backend(dtype, case):
    """Invariant 8: kernel error vs a float64 reference <= 2x the torch backend's error in the same dtype."""
    block_sizes, n, opts = (4, 4), 37, HALF_CASES[case]
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, dim=16, seed=9)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(10), dtype=F64)
    want = _grads(lambda q, k, v: oc.run_slots("reference", q, k, v, block_sizes, opts), q, k, v, weight)
    qh, kh, vh = (x.to(dtype) for x in (q, k, v))
    wh = weight.to(dtype)
    got = _grads(lambda q, k, v: triton_slots(q, k, v, block_sizes, opts), qh, kh, vh, wh)
    control = _grads(lambda q, k, v: oc.run_slots("torch", q, k, v, block_sizes, opts), qh, kh, vh, wh)
    for what, g, c, w in zip(("out", "dq", "dk", "dv"), got, control, want):
        assert g.dtype == dtype
        err = (g.to(F64) - w).abs().max().item()
        ref_err = (c.to(F64) - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-3, f"{dtype} {what}: kernel error {err:.3e} > 2 x torch error {ref_err:.3e}"


@pytest.mark.parametrize(
    "opts",
    [dict(summary="pooled", merge="lse", rope="axis"), dict(summary="learned", merge="mass", rope="axis")],
    ids=["pooled", "learned"],
)
def test_unsupported_options_fall_back_with_one_warning(opts, monkeypatch):
    from ctxext.attention import ops

    monkeypatch.setattr(ops, "_warned", set())
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=9, dim=8, seed=11)
    with pytest.warns(UserWarning, match="not fused into the kernels"):
        a = oc.run_api("triton", q, k, v, (4,), opts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = oc.run_api("triton", q, k, v, (4,), opts)
    c = oc.run_api("torch", q, k, v, (4,), opts)
    assert torch.equal(a, c) and torch.equal(b, c)


def test_resolve_backend_routes_triton_on_cpu_only_when_interpreting(monkeypatch):
    from ctxext.attention import ops

    cpu = torch.device("cpu")
    opts = oc.options((4,))
    assert ops.resolve_backend("triton", cpu, opts, torch.float32, 64) == "triton"
    assert ops.resolve_backend("auto", cpu, opts, torch.float32, 64) == "torch"  # auto never interprets
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.warns(UserWarning, match="needs CUDA tensors"):
        assert ops.resolve_backend("triton", cpu, opts, torch.float32, 64) == "torch"


def test_custom_op_registration_passes_opcheck():
    """Schema, fake (meta) implementation and autograd registration of ``ctxext::ta_hop``."""
    from ctxext.attention.triton_backend import ta_hop

    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=6, dim=8, seed=12, dtype=torch.float32, requires_grad=True)
    args = (q, k, v, None, None, None, None, None, None, 3, 1, False, True, False, False, 0.5, 0.0, 0.0, True)
    torch.library.opcheck(ta_hop, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_import_ctxext_never_needs_triton():
    """``import ctxext`` loads no kernel module, and works (falling back) when triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # an import of triton now raises ImportError
        "import ctxext, torch\n"
        "from ctxext.attention import ops\n"
        "assert 'ctxext._kernels' not in sys.modules and 'ctxext.attention.triton_backend' not in sys.modules\n"
        "assert not ops._triton_available()\n"
        "q = torch.randn(1, 2, 9, 8)\n"
        "ctxext.tensorized_attention(q, q, q, block_sizes=(4,))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_reads_strided_views_without_copies():
    """transformers hands ``(B, N, H, D)`` storage as ``(B, H, N, D)`` views: read through strides."""
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=19, dim=8, seed=15)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]  # same values, (B, N, H, D) storage
    assert not views[0].is_contiguous()
    opts = dict(causal="complete", rope="axis")
    got = triton_slots(*views, (3, 2), opts)
    want = oc.run_slots("reference", q, k, v, (3, 2), opts)
    oc.assert_close(got, want, 1e-12, "strided views")


def test_build_failure_falls_back_to_torch_once(monkeypatch):
    """A kernel that cannot build on this GPU (e.g. too little shared memory) warns and runs the torch backend."""
    from triton.runtime.errors import OutOfResources

    from ctxext.attention import ops
    from ctxext.attention import triton_backend as tb

    def no_room(*args, **kwargs):
        raise OutOfResources(262144, 232448, "shared memory")

    monkeypatch.setattr(tb, "_run_hops", no_room)
    monkeypatch.setattr(tb, "_disabled", [])
    monkeypatch.setattr(ops, "_warned", set())
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=9, dim=8, seed=16)
    with pytest.warns(UserWarning, match="failed to build"):
        a = triton_slots(q, k, v, (4,), {})
    assert torch.equal(a, oc.run_slots("torch", q, k, v, (4,), {}))
    with pytest.warns(UserWarning, match="OutOfResources"):  # the public path now routes to torch, saying why
        assert ops.resolve_backend("triton", q.device, oc.options((4,)), q.dtype, 8) == "torch"


# Sinks and retrieved far blocks: side streams merged into the local hop (ctxext/attention/side_streams.py).
# name: (block_sizes, n, (Hq, Hkv), options, softcap)
SIDE_STREAM_CASES = {
    "b8-n37-sinks-window-localonly": ((8,), 37, (4, 2), dict(sinks=2, local="window", long_range=False), None),
    "b4x4-n45-default-shape-axis-softcap": (
        (4, 4), 45, (4, 2), dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2, rope="axis"),
        1.5,
    ),
    "b3x4-n37-hops-lse-sinks-retrieve-axis": (
        (3, 4), 37, (2, 1), dict(sinks=3, local="window", merge="lse", retrieve=2, rope="axis"), None,
    ),
    "b4x4-n33-dominance-sinks-retrieve-softcap": (
        (4, 4), 33, (2, 2), dict(causal="dominance", sinks=1, retrieve=1), 2.0,
    ),
    "b4x4-n45-ordered-frame": (
        (4, 4), 45, (2, 1), dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2, rope="axis",
                                 retrieve_frame="ordered"), None,
    ),
    "b4x4-n45-two-stage-choice": (
        (4, 4), 45, (4, 2), dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2, rope="axis",
                                 retrieve_candidates=3), None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SIDE_STREAM_CASES))
def test_side_streams_match_reference_float64(name):
    """Sinks and retrieval (the shipped default's shape) on the kernels: output and gradients."""
    block_sizes, n, (hq, hkv), opts, softcap = SIDE_STREAM_CASES[name]
    q, k, v = oc.make_qkv(batch=1, hq=hq, hkv=hkv, n=n, dim=8, seed=3)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=F64)
    got = _grads(lambda q, k, v: triton_slots(q, k, v, block_sizes, opts, softcap=softcap), q, k, v, weight)
    want = _grads(
        lambda q, k, v: oc.run_slots("reference", q, k, v, block_sizes, opts, softcap=softcap), q, k, v, weight
    )
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        oc.assert_close(a, b, 1e-11, f"{name} {what}")


def test_side_streams_with_padding_match_torch_backend():
    """Left padding, holes (a padding query's streams must stay finite through the merges), sinks, retrieval."""
    n = 29
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=n, dim=8, seed=7)
    mask, pos = oc.left_padding([n, n - 6], n)
    mask[0, [3, 4, 17]] = 0
    opts = dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2, rope="axis")
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    kw = dict(padding_mask=mask, position_ids=pos, softcap=3.0)
    got = _grads(lambda q, k, v: oc.run_api("triton", q, k, v, (4,), opts, **kw), q, k, v, weight)
    want = _grads(lambda q, k, v: oc.run_api("torch", q, k, v, (4,), opts, **kw), q, k, v, weight)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"padded side streams {what}: not finite"
        oc.assert_close(a, b, 1e-11, f"padded side streams {what}")


def test_retrieve_kernel_matches_masked_union_with_lse_gradient():
    """``ctxext::ta_retrieve`` alone against the PyTorch path: holes in the keys, GQA, softcap, a loss on the lse."""
    from ctxext.attention.options import TensorizedOptions
    from ctxext.attention.retrieve import far_block_index, retrievable_keys, retrieved_attention, select_far_blocks
    from ctxext.attention.triton_retrieve import ta_retrieve

    n_slots, block, m = 45, 8, 4
    opts = TensorizedOptions(block_sizes=(block,), retrieve=3, retrieve_block=m, sinks=2, local="window").validate()
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n_slots, dim=8, seed=17)
    valid = torch.ones(1, n_slots, dtype=torch.bool)
    valid[0, [5, 20]] = False
    key_ok = retrievable_keys(valid, opts.sinks)
    index = far_block_index(q, k, key_ok, opts, block).to(torch.int32)
    chosen = select_far_blocks(q, k, key_ok, opts, block)
    assert (index >= 0).sum() == chosen.sum() > 0 and (index < 0).any()  # some queries choose fewer than 3
    gen = torch.Generator().manual_seed(18)
    w_out, w_lse = torch.randn(q.shape, generator=gen, dtype=F64), torch.randn(q.shape[:3], generator=gen, dtype=F64)

    def run(fn):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out, lse = fn(qq, kk, vv)
        some = torch.isfinite(lse)
        loss = (out * w_out).sum() + (torch.where(some, lse, 0.0) * w_lse).sum()
        return (out, torch.where(some, lse, 0.0), *torch.autograd.grad(loss, (qq, kk, vv)))

    got = run(lambda q, k, v: ta_retrieve(q, k, v, index, key_ok, m, 0.3, 1.5))
    want = run(lambda q, k, v: retrieved_attention(q * 0.3, k, v, chosen, key_ok, m, 1.5))
    for what, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        oc.assert_close(a, b, 1e-12, f"ta_retrieve {what}")


def test_query_lists_invert_the_choice():
    from ctxext._kernels.retrieve import query_lists

    chosen = [[[2, 0], [-1, -1], [2, -1]], [[1, -1], [0, 1], [-1, -1]]]  # (head, query, choice)
    index = torch.tensor([chosen], dtype=torch.int32)  # (1, 2, 3, 2)
    offsets, slots = query_lists(index, nb=3)
    lists = [slots[offsets[i] : offsets[i + 1]].tolist() for i in range(6)]
    assert lists == [[0], [], [0, 2], [1], [0, 1], []]  # head 0: blocks 0, 1, 2; head 1: blocks 0, 1, 2


def test_retrieve_custom_op_registration_passes_opcheck():
    from ctxext.attention.triton_retrieve import ta_retrieve

    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=12, dim=8, seed=19, dtype=torch.float32, requires_grad=True)
    index = torch.tensor([-1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 1, 2], dtype=torch.int32).view(1, 1, 12, 1)
    index = index.expand(1, 2, 12, 1).contiguous()
    key_ok = torch.ones(1, 12, dtype=torch.bool)
    args = (q, k, v, index, key_ok, 2, 0.5, 0.0)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ta_retrieve, args, test_utils=checks)


# The far-block choice on the fused kernels (ctxext/_kernels/choose.py) against the PyTorch choice.
# name: (slots, (Hq, Hkv), head dim, options, holes in the keys, batch)
CHOICE_CASES = {
    "bound-alone-window-gqa": (70, (4, 2), 8, dict(block_sizes=(8,), retrieve=3, retrieve_block=4, local="window"),
                               [], 1),
    "two-stage-window-holes": (77, (2, 1), 12, dict(block_sizes=(8,), retrieve=2, retrieve_block=4, local="window",
                                                   retrieve_candidates=6), [5, 6, 7, 8, 30], 1),
    "two-stage-block-batch2": (61, (2, 2), 16, dict(block_sizes=(8,), retrieve=3, retrieve_block=8,
                                                   retrieve_candidates=5), [40], 2),
    "more-candidates-than-blocks": (40, (2, 1), 8, dict(block_sizes=(4,), retrieve=2, retrieve_block=4, local="window",
                                                       retrieve_candidates=40), [], 1),
    "more-choices-than-blocks": (20, (2, 1), 8, dict(block_sizes=(4,), retrieve=8, retrieve_block=2), [], 1),
    "many-tiles-of-blocks": (230, (2, 1), 8, dict(block_sizes=(4,), retrieve=3, retrieve_block=2, local="window"),
                             [100], 1),  # 115 far blocks: 8 tiles of 16, most of them beat no kept block
    # retrieve_score_block: a block scores its best sub-block; holes empty a whole sub-block (10-11: with
    # blocks of 4, block 2's second half) and part of one (30), so a block is scored by the sub-blocks that hold keys
    "sub-blocks-bound-alone": (70, (4, 2), 8, dict(block_sizes=(8,), retrieve=3, retrieve_block=4,
                                                  retrieve_score_block=2, local="window"), [10, 11, 30], 1),
    "sub-blocks-two-stage-batch2": (77, (2, 1), 12, dict(block_sizes=(8,), retrieve=2, retrieve_block=8,
                                                        retrieve_score_block=2, retrieve_candidates=5,
                                                        local="window"), [10, 11, 30], 2),
    "exact-score-two-stage": (61, (2, 2), 16, dict(block_sizes=(8,), retrieve=2, retrieve_block=4,
                                                  retrieve_score_block=1, retrieve_candidates=4), [40], 1),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CHOICE_CASES))
def test_fused_choice_makes_the_torch_choice(name):
    """Same blocks per query as ``far_block_index`` (float32, no ties by construction), ``-1`` where it has none."""
    from ctxext.attention import fused_choice
    from ctxext.attention.retrieve import far_block_index, retrievable_keys

    n_slots, (hq, hkv), dim, opts, holes, batch = CHOICE_CASES[name]
    o = oc.options(sinks=2, **opts)
    q, k, _ = oc.make_qkv(batch=batch, hq=hq, hkv=hkv, n=n_slots, dim=dim, seed=23, dtype=torch.float32)
    valid = torch.ones(batch, n_slots, dtype=torch.bool)
    valid[0, holes] = False
    key_ok = retrievable_keys(valid, o.sinks)
    assert fused_choice.unsupported_reason(o, q.dtype, q.device) is None
    got = fused_choice.choose(q, k, key_ok, o, o.block_sizes[-1], "ieee")
    want = far_block_index(q, k, key_ok, o, o.block_sizes[-1]).to(torch.int32)
    assert got.shape == want.shape and got.dtype == torch.int32
    assert (want >= 0).any() and (want < 0).any()  # some queries choose, the first ones cannot
    assert torch.equal(got.sort(-1).values, want.sort(-1).values), name


def test_fused_choice_prefers_the_lower_block_at_a_tie():
    """Two far blocks with the same keys score the same: the fused choice takes the earlier one."""
    from ctxext.attention import fused_choice
    from ctxext.attention.retrieve import retrievable_keys

    o = oc.options((4,), retrieve=1, retrieve_block=4, retrieve_candidates=2, local="window")
    q, k, _ = oc.make_qkv(batch=1, hq=1, hkv=1, n=32, dim=8, seed=29, dtype=torch.float32)
    k[:, :, 4:8] *= 3.0  # block 1 scaled up, so that it beats the other blocks for many queries ...
    k[:, :, 12:16] = k[:, :, 4:8]  # ... and block 3 holds the same keys
    got = fused_choice.choose(q, k, retrievable_keys(torch.ones(1, 32, dtype=torch.bool), 0), o, 4, "ieee")
    assert not (got == 3).any() and (got[0, 0, 24:, 0] == 1).sum() >= 4  # queries that see both take block 1


def test_triton_backend_float32_with_the_fused_choice_matches_torch_backend():
    """The shipped shape (sinks, window, two-stage choice, axis frame), padded: float32 through the fused choice."""
    from ctxext.attention import fused_choice

    n = 53
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=n, dim=8, seed=31, dtype=torch.float32)
    mask, pos = oc.left_padding([n, n - 7], n)
    opts = dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2, retrieve_candidates=5,
                rope="axis")  # fmt: skip
    kw = dict(padding_mask=mask, position_ids=pos)
    calls = []
    real = fused_choice.choose
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused_choice, "choose", lambda *a: calls.append(a[0].dtype) or real(*a))
        got = oc.run_api("triton", q, k, v, (4,), opts, **kw)
    assert calls == [torch.float32]  # and it ran the kernels, not the fallback:
    assert fused_choice.unsupported_reason(oc.options((4,), **opts), torch.float32, q.device) is None
    want = oc.run_api("torch", q, k, v, (4,), opts, **kw)
    oc.assert_close(got, want, 2e-5, "fused choice, float32")
    with fused_choice.switched(False):
        oc.assert_close(oc.run_api("triton", q, k, v, (4,), opts, **kw), got, 2e-5, "PyTorch choice on the kernels")


def test_choose_custom_op_registration_passes_opcheck():
    from ctxext.attention.retrieve import far_block_keys, retrievable_keys
    from ctxext.attention.triton_retrieve import ta_choose

    q, k, _ = oc.make_qkv(batch=1, hq=2, hkv=1, n=40, dim=8, seed=37, dtype=torch.float32)
    key_ok = retrievable_keys(torch.ones(1, 40, dtype=torch.bool), 2)
    keys = far_block_keys(k, key_ok, 4, 2)  # blocks of 4 scored by sub-blocks of 2
    args = (q, k, key_ok, keys.kmax, keys.kmin, keys.sub_keys, 4, 8, True, 2, 5, "ieee")
    assert (ta_choose(*args) >= 0).any()
    torch.library.opcheck(ta_choose, args, test_utils=("test_schema", "test_faketensor"))


def test_triton_backend_with_a_candidate_share_takes_the_pytorch_choice_and_matches_torch():
    """``retrieve_candidate_share``: each query its own count, which the fused choice does not take; the
    Triton backend then chooses in PyTorch and still reads the chosen blocks on its kernels."""
    from ctxext.attention import fused_choice

    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=61, dim=8, seed=37, dtype=torch.float32)
    opts = dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2, retrieve_candidates=2,
                retrieve_candidate_share=0.5, rope="axis")  # fmt: skip
    reason = fused_choice.unsupported_reason(oc.options((4,), **opts), torch.float32, q.device)
    assert reason and "retrieve_candidate_share" in reason
    got = oc.run_api("triton", q, k, v, (4,), opts)
    oc.assert_close(got, oc.run_api("torch", q, k, v, (4,), opts), 2e-5, "candidate share on the kernels")
    fixed = oc.run_api("torch", q, k, v, (4,), {**opts, "retrieve_candidate_share": 0.0})
    assert (got - fixed).abs().max() > 1e-4, "the share must change the choice here, or this shows nothing"


def test_triton_backend_with_a_far_bias_matches_torch():
    """``retrieve_bias``: the far read merges with the local softmax less 1.5 nats, on the kernels as in PyTorch."""
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=61, dim=8, seed=41, dtype=torch.float32)
    opts = dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2, retrieve_candidates=4,
                rope="axis", retrieve_bias=1.5)  # fmt: skip
    got = oc.run_api("triton", q, k, v, (4,), opts)
    oc.assert_close(got, oc.run_api("torch", q, k, v, (4,), opts), 2e-5, "far bias on the kernels")
    plain = oc.run_api("triton", q, k, v, (4,), {**opts, "retrieve_bias": 0.0})
    assert (got - plain).abs().max() > 1e-3, "the bias must change the output here, or this shows nothing"


def test_triton_backend_with_a_growing_far_bias_matches_torch():
    """``retrieve_bias_growth``: each query's far bias grows with its length past 24 tokens, on the kernels as in
    PyTorch."""
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=61, dim=8, seed=41, dtype=torch.float32)
    opts = dict(sinks=2, local="window", long_range=False, retrieve=2, retrieve_block=2, retrieve_candidates=4,
                rope="axis", retrieve_bias=0.5, retrieve_bias_growth=1.0, retrieve_bias_from=24)  # fmt: skip
    got = oc.run_api("triton", q, k, v, (4,), opts)
    oc.assert_close(got, oc.run_api("torch", q, k, v, (4,), opts), 2e-5, "growing far bias on the kernels")
    fixed = oc.run_api("triton", q, k, v, (4,), {**opts, "retrieve_bias_growth": 0.0})
    assert (got[:, :, 24:] - fixed[:, :, 24:]).abs().max() > 1e-3, "the bias must grow past 24 tokens here"
    assert (got[:, :, :24] - fixed[:, :, :24]).abs().max() < 1e-6, "and be fixed before"
    capped = oc.run_api("triton", q, k, v, (4,), {**opts, "retrieve_bias_cap": 1.0})  # 1 nat from 34 tokens on
    oc.assert_close(capped, oc.run_api("torch", q, k, v, (4,), {**opts, "retrieve_bias_cap": 1.0}), 2e-5, "capped")
    assert (capped[:, :, 34:] - got[:, :, 34:]).abs().max() > 1e-3, "the cap must act past 34 tokens here"
