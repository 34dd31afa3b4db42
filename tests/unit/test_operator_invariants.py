"""The operator invariants of DESIGN.md section 1, on odd lengths and ragged axes.

1. one block equals causal SDPA; 2. causality (with padding); 3. reach (complete: every
earlier token; dominance: the dominance set; long_range=False: the local key set);
4. convexity; 5. Kronecker identity; 6. GQA, batch independence, inert padding, left
padding; 8. torch backend vs the reference (float64 over the option matrix, pairwise at
N=1023, N=4097, bfloat16 and float32 error bounds).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

try:
    from . import operator_cases as oc
except ImportError:
    import operator_cases as oc

from ctxext.attention.layout import full_axes, multi_index

single_thread = oc.single_thread  # autouse fixture
F64, F32 = torch.float64, torch.float32
BACKENDS = ("torch", "reference")


def case_id(case) -> str:
    return "b" + "x".join(map(str, case[0])) + f"-n{case[1]}"


# ---------------------------------------------------------------------------------------------
# 1. N <= n_m: one block is exact causal attention
# ---------------------------------------------------------------------------------------------

ONE_BLOCK_VARIANTS = {
    "default": {},
    "sinks3-window": dict(sinks=3, local="window"),
    "lse-sinks2": dict(merge="lse", sinks=2),
    "loconly": dict(long_range=False),
}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", list(ONE_BLOCK_VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope", oc.ROPE)
@pytest.mark.parametrize("causal", oc.CAUSAL)
@pytest.mark.parametrize("n", [1, 63, 113], ids=lambda n: f"n{n}")
def test_one_block_equals_causal_sdpa(n, causal, rope, backend, variant, dtype):
    q, k, v = oc.make_qkv(batch=2, hq=6, hkv=2, n=n, dim=16, dtype=dtype, seed=n)
    opts = dict(causal=causal, rope=rope, **ONE_BLOCK_VARIANTS[variant])
    out = oc.run_api(backend, q, k, v, (128,), opts)
    assert out.dtype == dtype and out.shape == q.shape
    oc.assert_close(out, oc.causal_sdpa(q, k, v), 1e-12 if dtype == F64 else 2e-6, "TA vs causal SDPA")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "block_sizes,n",
    [((7,), 7), ((5, 3), 3), ((4, 4, 9), 9), ((2, 2, 2), 1)],
    ids=["b7-n7", "b5x3-n3", "b4x4x9-n9", "b2x2x2-n1"],
)
@pytest.mark.parametrize("causal", oc.CAUSAL)
def test_one_block_any_depth_equals_causal_sdpa(causal, block_sizes, n, backend):
    """N == n_m exactly, and deep block_sizes whose outer axes all have size 1."""
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, dim=8, seed=3)
    for opts in (dict(causal=causal), dict(causal=causal, rope="axis", merge="lse", sinks=2, local="window")):
        out = oc.run_api(backend, q, k, v, block_sizes, opts)
        oc.assert_close(out, oc.causal_sdpa(q, k, v), 1e-12, f"{opts}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_block_softcap_and_scaling_equal_exact_attention(backend):
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=41, dim=8, seed=5)
    q = q * 3  # large scores so that the cap matters
    scaling, cap = 0.6, 2.5
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = q @ kr.transpose(-1, -2) * scaling
    s = cap * torch.tanh(s / cap)
    s = s.masked_fill(~torch.ones(41, 41, dtype=torch.bool).tril(), float("-inf"))
    want = torch.softmax(s, -1) @ vr
    out = oc.run_api(backend, q, k, v, (64,), dict(causal="complete"), scaling=scaling, softcap=cap)
    oc.assert_close(out, want, 1e-12, "softcap")
    uncapped = oc.run_api(backend, q, k, v, (64,), dict(causal="complete"), scaling=scaling)
    assert (uncapped - want).abs().max() > 1e-2  # the cap changed something


# ---------------------------------------------------------------------------------------------
# Two blocks in closed form: the hop semantics (streams, merge, sinks, window, axis RoPE) written
# out by hand, independently of the reference, for N < 2 * n_m (axes (2, n_m)).
# ---------------------------------------------------------------------------------------------


def hf_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half RoPE: x * cos + rotate_half(x) * sin at ``positions`` (..., L)."""
    freqs = positions.to(F64)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def two_block_closed_form(q, k, v, n_m, opts, scaling):
    """TA for axes (2, n_m): local hop, then one outer hop between blocks 0 and 1."""
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    inv = oc.rope_inv_freq(d)
    axis = opts["rope"] == "axis"

    def local(p, keys, start):
        sinks = [t for t in range(min(opts["sinks"], n)) if t < start]
        qp = q[:, :, p]
        s_keys = scaling * torch.einsum("bhd,bhkd->bhk", qp, k[:, :, keys])
        q_sink = hf_rope(qp, torch.tensor(-float(start)), inv) if axis else qp  # the query moves to p - start
        s_sink = scaling * torch.einsum("bhd,bhkd->bhk", q_sink, k[:, :, sinks])
        scores = torch.cat([s_sink, s_keys], -1)
        return torch.einsum("bhk,bhkd->bhd", torch.softmax(scores, -1), v[:, :, sinks + keys]), scores.logsumexp(-1)

    C, lse_C, F = {}, {}, {}
    for p in range(n):
        start = (p // n_m) * n_m
        own = list(range(start, min(start + n_m, n)))
        causal_start = start - n_m if opts["local"] == "window" and start > 0 else start
        C[p], lse_C[p] = local(p, list(range(causal_start, p + 1)), causal_start)
        F[p] = local(p, own, start)[0]
    if not opts["long_range"]:
        return torch.stack([C[p] for p in range(n)], 2)
    # Outer hop along axis 1 (stride n_m): re-rotate to coordinate i_1 for rope="axis".
    i1 = torch.arange(n) // n_m
    qo = hf_rope(q, (i1 - torch.arange(n)).to(F64), inv) if axis else q
    ko = hf_rope(k, (i1 - torch.arange(n)).to(F64), inv) if axis else k
    out = []
    for p in range(n):
        if p < n_m:  # i_1 = 0: the outer fiber has no earlier element; the diagonal alone keeps C
            out.append(C[p])
            continue
        e = p - n_m  # the earlier fiber element (0, i_2)
        s_e = scaling * (qo[:, :, p] * ko[:, :, e]).sum(-1)
        if opts["merge"] == "mass":  # the earlier entry summarises the n_m slots of its block
            s_e = s_e + math.log(n_m)
        diag = lse_C[p] if opts["merge"] != "score" else scaling * (qo[:, :, p] * ko[:, :, p]).sum(-1)
        w = torch.softmax(torch.stack([s_e, diag], -1), -1)
        earlier = F[e] if opts["causal"] == "complete" else C[e]
        out.append(w[..., :1] * earlier + w[..., 1:] * C[p])
    return torch.stack(out, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", oc.option_matrix(), ids=oc.option_id)
def test_two_blocks_closed_form(opts, backend):
    n_m, n = 8, 13
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=n, dim=8, seed=41)
    q, k = 2 * q, 2 * k  # sharp scores: every term matters
    want = two_block_closed_form(q, k, v, n_m, opts, scaling=0.35)
    got = oc.run_api(backend, q, k, v, (n_m,), opts, scaling=0.35)
    oc.assert_close(got, want, 1e-12, "TA vs two-block closed form")


def test_rerotate_composes_transformers_rope():
    """rerotate(RoPE(x, p), c - p) == RoPE(x, c), including partial rotary dims."""
    from ctxext.attention.rope import rerotate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 8, generator=gen, dtype=F64)
    p = torch.arange(17, dtype=F64) * 3 + 5
    c = torch.randint(-4, 9, (17,), generator=gen).to(F64)
    inv = oc.rope_inv_freq(8)
    oc.assert_close(rerotate(hf_rope(x, p, inv), c - p, inv), hf_rope(x, c, inv), 1e-12, "full rotary")
    inv_partial = oc.rope_inv_freq(4)  # rotary dims 0..3, dims 4..7 untouched
    xr = torch.cat([hf_rope(x[..., :4], p, inv_partial), x[..., 4:]], -1)
    want = torch.cat([hf_rope(x[..., :4], c, inv_partial), x[..., 4:]], -1)
    oc.assert_close(rerotate(xr, c - p, inv_partial), want, 1e-12, "partial rotary")
    x32 = x.to(torch.bfloat16)
    assert rerotate(x32, c - p, inv).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("block_sizes,n", [((4,), 29), ((4, 4), 53)], ids=["b4-n29", "b4x4-n53"])
def test_axis_rope_sees_axis_offsets(block_sizes, n, sinks, backend):
    """rope='axis' scores along axis j depend on i_j - i_j' only.

    Frequencies with theta * s_j == theta (mod 2 pi) for every stride s_j make a rotation by
    s_j positions equal to a rotation by one, so absolute offsets (i_j - i_j') * s_j and axis
    offsets i_j - i_j' give the same scores: both modes must then agree (without sinks, whose
    offsets differ). A control frequency set shows that they differ otherwise.
    """
    third = 2 * math.pi / 3  # strides 1, 4, 16: gcd(4 - 1, 16 - 1) = 3, so theta = 2 pi k / 3
    inv = torch.tensor([third, 2 * third, 2 * math.pi + third, 0.0], dtype=F64)
    q0, k0, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, dim=8, seed=43)
    pos = torch.arange(n, dtype=F64)
    q, k = hf_rope(q0, pos, inv), hf_rope(k0, pos, inv)
    opts = dict(causal="complete", sinks=sinks)
    axis = oc.run_api(backend, q, k, v, block_sizes, dict(rope="axis", **opts), rope_inv_freq=inv)
    absolute = oc.run_api(backend, q, k, v, block_sizes, dict(rope="absolute", **opts))
    if sinks == 0:
        oc.assert_close(axis, absolute, 1e-12, "axis vs absolute with stride-periodic frequencies")
    else:  # a sink's offset p - start - t is not a multiple of a stride: the modes differ
        assert (axis - absolute).abs().max() > 1e-6
    generic = oc.rope_inv_freq(8)
    q, k = hf_rope(q0, pos, generic), hf_rope(k0, pos, generic)
    axis = oc.run_api(backend, q, k, v, block_sizes, dict(rope="axis", **opts), rope_inv_freq=generic)
    absolute = oc.run_api(backend, q, k, v, block_sizes, dict(rope="absolute", **opts))
    assert (axis - absolute).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_rope_shift_invariance(opts, backend):
    """Rotating every q and k by the same extra angle (RoPE positions p + c) changes nothing, in either mode."""
    n, inv = 37, oc.rope_inv_freq(8)
    q0, k0, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, dim=8, seed=47)
    pos = torch.arange(n, dtype=F64)
    outs = [
        oc.run_api(backend, hf_rope(q0, pos + c, inv), hf_rope(k0, pos + c, inv), v, (3, 4), opts, rope_inv_freq=inv)
        if opts["rope"] == "axis"
        else oc.run_api(backend, hf_rope(q0, pos + c, inv), hf_rope(k0, pos + c, inv), v, (3, 4), opts)
        for c in (0.0, 7.0, 1000.0)
    ]
    oc.assert_close(outs[1], outs[0], 1e-10, "shift by 7")
    oc.assert_close(outs[2], outs[0], 1e-9, "shift by 1000")


# ---------------------------------------------------------------------------------------------
# 8. torch backend vs the reference
# ---------------------------------------------------------------------------------------------

# (block_sizes, N, Hq, Hkv): every outer axis is ragged (N is not a multiple of the inner product)
MATRIX_CASES = [((4,), 61, 4, 2), ((5, 3), 52, 6, 2), ((3, 4), 113, 6, 2)]


@pytest.mark.parametrize("opts", oc.option_matrix(), ids=oc.option_id)
@pytest.mark.parametrize("case", MATRIX_CASES, ids=case_id)
def test_torch_matches_reference(case, opts):
    block_sizes, n, hq, hkv = case
    q, k, v = oc.make_qkv(batch=2, hq=hq, hkv=hkv, n=n, dim=8, seed=n)
    got = oc.run_slots("torch", q, k, v, block_sizes, opts)
    want = oc.run_slots("reference", q, k, v, block_sizes, opts)
    oc.assert_close(got, want, 1e-10, "torch vs reference")


@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
@pytest.mark.parametrize("block_sizes", [(3, 4), (2, 3, 2)], ids=["b3x4", "b2x3x2"])
def test_torch_matches_reference_every_short_length(block_sizes, opts):
    """Lengths 1..27: leading axes of size 1 dropped, the new leading axis cut (compact_axes)."""
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=27, dim=8, seed=6)
    for n in range(1, 28):
        got = oc.run_slots("torch", q[:, :, :n], k[:, :, :n], v[:, :, :n], block_sizes, opts)
        want = oc.run_slots("reference", q[:, :, :n], k[:, :, :n], v[:, :, :n], block_sizes, opts)
        oc.assert_close(got, want, 1e-10, f"N={n}")


def holes_valid(n: int) -> torch.Tensor:
    """Slot masks: random holes plus a whole empty inner block; a row with a leading gap; an empty row."""
    gen = torch.Generator().manual_seed(n)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[0] = torch.rand(n, generator=gen) > 0.25
    valid[0, 12:16] = False
    valid[0, 0] = True
    valid[1, :10] = False
    valid[2] = False
    return valid


@pytest.mark.parametrize("opts", oc.option_matrix(), ids=oc.option_id)
def test_torch_matches_reference_with_masked_slots(opts):
    n, block_sizes = 41, (3, 4)
    q, k, v = oc.make_qkv(batch=3, hq=4, hkv=2, n=n, dim=8, seed=11)
    valid = holes_valid(n)
    got = oc.run_slots("torch", q, k, v, block_sizes, opts, valid=valid)
    want = oc.run_slots("reference", q, k, v, block_sizes, opts, valid=valid)
    oc.assert_close(got, want, 1e-10, "torch vs reference")
    assert (got.transpose(1, 2)[~valid] == 0).all(), "masked slots must output zeros"


@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_torch_matches_reference_softcap_scaling(opts):
    q, k, v = oc.make_qkv(batch=1, hq=6, hkv=2, n=52, dim=8, seed=2)
    q = 3 * q
    got = oc.run_slots("torch", q, k, v, (5, 3), opts, scaling=0.4, softcap=3.0)
    want = oc.run_slots("reference", q, k, v, (5, 3), opts, scaling=0.4, softcap=3.0)
    oc.assert_close(got, want, 1e-10, "torch vs reference")


@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
@pytest.mark.parametrize("block_sizes", [(16,), (8, 8)], ids=["b16", "b8x8"])
def test_torch_matches_reference_n1023(block_sizes, opts):
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=1023, dim=8, seed=7)
    got = oc.run_slots("torch", q, k, v, block_sizes, opts)
    want = oc.run_slots("reference", q, k, v, block_sizes, opts)
    oc.assert_close(got, want, 1e-10, "torch vs reference")


@pytest.mark.parametrize("causal", oc.CAUSAL)
def test_torch_matches_reference_n4097(causal):
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=4097, dim=8, seed=9)
    opts = dict(causal=causal)
    got = oc.run_slots("torch", q, k, v, (64,), opts)
    want = oc.run_slots("reference", q, k, v, (64,), opts)
    oc.assert_close(got, want, 1e-10, "torch vs reference")


LOW_PRECISION_VARIANTS = {
    "default": {},
    "axis-lse-sinks-window": dict(rope="axis", merge="lse", sinks=3, local="window"),
}


@pytest.mark.parametrize("variant", list(LOW_PRECISION_VARIANTS))
@pytest.mark.parametrize("causal", oc.CAUSAL)
@pytest.mark.parametrize("block_sizes", [(4,), (5, 3)], ids=["b4", "b5x3"])
def test_low_precision_error_bounds(block_sizes, causal, variant):
    """bf16 inputs: within bf16 rounding of the float64 reference; float32 inputs within 1e-5."""
    n = 113
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, dim=16, dtype=torch.bfloat16, seed=4)
    opts = dict(causal=causal, **LOW_PRECISION_VARIANTS[variant])
    want = oc.run_api("reference", q.double(), k.double(), v.double(), block_sizes, opts)
    out_bf16 = oc.run_api("torch", q, k, v, block_sizes, opts)
    assert out_bf16.dtype == torch.bfloat16
    err_bf16 = (out_bf16.double() - want).abs().max().item()
    rounding = (want.to(torch.bfloat16).double() - want).abs().max().item()  # the best a bf16 output can do
    assert err_bf16 < 2e-2
    assert err_bf16 <= 2 * rounding + 1e-4, f"bf16 error {err_bf16:.2e} vs output rounding {rounding:.2e}"
    out_f32 = oc.run_api("torch", q.float(), k.float(), v.float(), block_sizes, opts)
    assert out_f32.dtype == F32
    oc.assert_close(out_f32, want, 1e-5, "float32")


# ---------------------------------------------------------------------------------------------
# 2. Causality
# ---------------------------------------------------------------------------------------------


def _perturbed_after(x: torch.Tensor, t: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = x.clone()
    y[:, :, t + 1 :] += 5 * torch.randn(y[:, :, t + 1 :].shape, generator=gen, dtype=x.dtype)
    return y


def check_causal(fn, q, k, v, cuts, *, atol=1e-13):
    base = fn(q, k, v)
    for t in cuts:
        out = fn(_perturbed_after(q, t, t), _perturbed_after(k, t, t + 1), _perturbed_after(v, t, t + 2))
        err = (out[:, :, : t + 1] - base[:, :, : t + 1]).abs().max().item()
        assert err <= atol, f"output at positions <= {t} changed by {err:.2e} when tokens after {t} changed"
        assert (out[:, :, t + 1 :] - base[:, :, t + 1 :]).abs().max() > 1e-3  # the perturbation is visible


CAUSAL_CASES = [((3, 4), 37), ((5,), 29)]
CUTS = [0, 4, 11, 12, 23, 35]


@pytest.mark.parametrize("opts", oc.option_matrix(), ids=oc.option_id)
def test_causal_torch(opts):
    for block_sizes, n in CAUSAL_CASES:
        q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, seed=n)
        cuts = [t for t in CUTS if t < n - 1]
        check_causal(lambda q, k, v: oc.run_slots("torch", q, k, v, block_sizes, opts), q, k, v, cuts)


@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_causal_reference(opts):
    q, k, v = oc.make_qkv(batch=1, hq=2, hkv=1, n=37, seed=1)
    check_causal(lambda q, k, v: oc.run_slots("reference", q, k, v, (3, 4), opts), q, k, v, CUTS)


def padded_inputs(kind: str, n: int = 37):
    """A batch with padding: 'left' (shifted position ids, as generate makes them) or 'mask' (holes)."""
    if kind == "left":
        mask, pos = oc.left_padding([n, n - 7, n - 16], n)
        return mask, pos
    mask = torch.ones(3, n, dtype=torch.long)
    mask[0, -5:] = 0  # right padding
    mask[1, :6] = 0  # left padding without shifted position ids: empty leading slots
    mask[2, [3, 12, 13, 14, 15, 30]] = 0  # holes, one a whole inner block
    return mask, None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["left", "mask"])
@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_causal_with_padding(opts, padding, backend):
    n = 37
    mask, pos = padded_inputs(padding, n)
    q, k, v = oc.make_qkv(batch=3, hq=4, hkv=2, n=n, seed=21)

    def fn(q, k, v):
        return oc.run_api(backend, q, k, v, (3, 4), opts, padding_mask=mask, position_ids=pos)

    check_causal(fn, q, k, v, [2, 9, 20, 31] if backend == "torch" else [9, 20])
    # Padding tokens are inert: changing them changes nothing at all.
    base = fn(q, k, v)
    pad = (mask == 0)[:, None, :, None]
    noisy = [x + 7 * pad * torch.randn_like(x) for x in (q, k, v)]
    oc.assert_close(fn(*noisy), base, 1e-13, "padding tokens changed the output")
    assert (base.transpose(1, 2)[mask == 0] == 0).all()


# ---------------------------------------------------------------------------------------------
# 3. Reach
# ---------------------------------------------------------------------------------------------

REACH_CASES = [((4,), 23), ((3, 4), 37), ((2, 3, 2), 29)]


def slot_weights(backend, block_sizes, opts, n, hq=2, hkv=1, seed=0, valid=None):
    q, k, _ = oc.make_qkv(batch=1, hq=hq, hkv=hkv, n=n, seed=seed)
    return oc.weight_matrix(lambda q, k, v: oc.run_slots(backend, q, k, v, block_sizes, opts, valid=valid), q, k, hkv)


def assert_support(w: torch.Tensor, expected: torch.Tensor, what: str):
    """w: (B, H, N, N) mixing weights; expected: (N, N) bool support, identical for every head."""
    support = w > 0
    wrong = (support != expected).nonzero().tolist()
    assert not wrong, f"{what}: support differs at (b, h, p, p') {wrong[:8]} (of {len(wrong)})"
    assert (w >= 0).all(), "weights must be non-negative"


@pytest.mark.parametrize("opts", oc.option_matrix(causal="complete", long_range=True), ids=oc.option_id)
@pytest.mark.parametrize("case", REACH_CASES, ids=case_id)
def test_reach_complete_is_every_earlier_token(case, opts):
    block_sizes, n = case
    w = slot_weights("torch", block_sizes, opts, n)
    assert_support(w, torch.ones(n, n, dtype=torch.bool).tril(), "complete reach")


@pytest.mark.parametrize("case", REACH_CASES, ids=case_id)
def test_reach_complete_reference(case):
    block_sizes, n = case
    for opts in (dict(causal="complete"), dict(causal="complete", sinks=3, local="window", merge="lse", rope="axis")):
        w = slot_weights("reference", block_sizes, opts, n)
        assert_support(w, torch.ones(n, n, dtype=torch.bool).tril(), f"complete reach {opts}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope", oc.ROPE)
@pytest.mark.parametrize("case", REACH_CASES + [((5, 3), 52)], ids=case_id)
def test_reach_dominance_is_the_dominance_set(case, rope, backend):
    block_sizes, n = case
    expected = oc.dominance_set(n, block_sizes)
    for merge in ("score", "lse"):  # mass is complete-only
        w = slot_weights(backend, block_sizes, dict(causal="dominance", rope=rope, merge=merge), n)
        assert_support(w, expected, f"dominance reach merge={merge}")
    if len(block_sizes) == 1:  # the design's example: a block's first token sees only first tokens of earlier blocks
        first = 2 * block_sizes[0]
        assert expected[first].nonzero().flatten().tolist() == [0, block_sizes[0], first]


@pytest.mark.parametrize("opts", oc.option_matrix(causal="dominance", long_range=True), ids=oc.option_id)
def test_reach_dominance_with_options_is_causal_superset(opts):
    """Sinks and window only add keys: reach contains the dominance set and stays causal."""
    block_sizes, n = (3, 4), 37
    support = slot_weights("torch", block_sizes, opts, n) > 0
    dom = oc.dominance_set(n, block_sizes)
    assert (support | ~dom).all(), "dominance set not reached"
    assert not (support & ~torch.ones(n, n, dtype=torch.bool).tril()).any(), "reach is not causal"
    if opts["sinks"] == 0 and opts["local"] == "block":
        assert (support == dom).all()
    else:
        assert (support & ~dom).any(), "sinks/window should widen the dominance set"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "opts",
    [o for o in oc.option_matrix(long_range=False) if o["merge"] == "score" or o["rope"] == "absolute"],
    ids=oc.option_id,
)
def test_reach_local_only_is_the_local_key_set(opts, backend):
    block_sizes, n = (3, 4), 37
    w = slot_weights(backend, block_sizes, opts, n)
    expected = oc.local_set(n, block_sizes[-1], opts["sinks"], opts["local"] == "window")
    assert_support(w, expected, "local-only reach")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(causal="complete"),
        dict(causal="complete", rope="axis", sinks=3, local="window", merge="lse"),
        dict(causal="dominance"),
        dict(causal="dominance", rope="axis", merge="lse"),
    ],
    ids=["complete", "complete-axis-s3-win-lse", "dominance", "dominance-axis-lse"],
)
def test_reach_with_left_padding_and_shifted_positions(opts, backend):
    """Token-level reach through the public API, left padding with generate-style position ids."""
    n, block_sizes = 31, (3, 4)
    mask, pos = oc.left_padding([n, n - 9], n)
    q, k, _ = oc.make_qkv(batch=2, hq=2, hkv=1, n=n, seed=8)

    def fn(q, k, v):
        return oc.run_api(backend, q, k, v, block_sizes, opts, padding_mask=mask, position_ids=pos)

    w = oc.weight_matrix(fn, q, k, 1)
    real = mask.bool()
    for b in range(2):
        tril = torch.ones(n, n, dtype=torch.bool).tril()
        if opts["causal"] == "complete":
            expected = tril & real[b][None, :] & real[b][:, None]
        else:  # dominance over the slots (position ids) of real tokens
            dom = oc.dominance_set(n, block_sizes)
            slot = pos[b]
            expected = dom[slot][:, slot] & real[b][None, :] & real[b][:, None]
        assert_support(w[b : b + 1], expected, f"row {b}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reach_complete_across_empty_slots(backend):
    """Left padding with arange position ids (a plain forward with an attention mask): slots 0..4 empty."""
    n = 12
    mask = torch.ones(1, n, dtype=torch.long)
    mask[0, :5] = 0
    q, k, _ = oc.make_qkv(batch=1, hq=1, hkv=1, n=n, seed=0)
    w = oc.weight_matrix(lambda q, k, v: oc.run_api(backend, q, k, v, (4,), {}, padding_mask=mask), q, k, 1)
    real = mask[0].bool()
    expected = torch.ones(n, n, dtype=torch.bool).tril() & real[None, :] & real[:, None]
    assert_support(w, expected, "complete reach with empty leading slots")


# ---------------------------------------------------------------------------------------------
# 4. Convexity, padding outputs, no NaN
# ---------------------------------------------------------------------------------------------


def convexity_batch(n: int = 37):
    """Five rows: no padding; left padding with shifted ids; right padding; holes; all padding."""
    mask = torch.ones(5, n, dtype=torch.long)
    pos = torch.arange(n).repeat(5, 1)
    mask[1, :6] = 0
    pos[1] = (mask[1].cumsum(-1) - 1).clamp_min(0)
    mask[2, -5:] = 0
    mask[3, [1, 12, 13, 14, 15, n - 7]] = 0
    mask[4] = 0
    return mask, pos


def check_convex(backend, opts, block_sizes=(3, 4), n=37):
    mask, pos = convexity_batch(n)
    q, k, _ = oc.make_qkv(batch=5, hq=4, hkv=2, n=n, seed=13, requires_grad=True)
    v = torch.ones(5, 2, n, 8, dtype=F64, requires_grad=True)
    out = oc.run_api(backend, q, k, v, block_sizes, opts, padding_mask=mask, position_ids=pos)
    assert torch.isfinite(out).all(), "NaN/inf in the output"
    real = mask.bool()[:, None, :, None].expand_as(out)
    oc.assert_close(out[real], torch.ones_like(out[real]), 1e-12, "v = 1 must give 1")
    assert (out[~real] == 0).all(), "padding tokens must output zeros"
    (out * torch.randn_like(out)).sum().backward()
    for name, x in zip("qkv", (q, k, v)):
        assert torch.isfinite(x.grad).all(), f"non-finite gradient for {name}"
        assert (x.grad[4] == 0).all(), f"the all-padding row must get zero gradient for {name}"


@pytest.mark.parametrize("opts", oc.option_matrix(), ids=oc.option_id)
def test_convex_torch(opts):
    check_convex("torch", opts)


@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_convex_reference(opts):
    check_convex("reference", opts, n=29)


@pytest.mark.parametrize("backend", BACKENDS)
def test_convex_without_padding_deep_axes(backend):
    n = 61
    q, k, _ = oc.make_qkv(batch=1, hq=2, hkv=1, n=n, seed=1)
    v = torch.ones(1, 1, n, 8, dtype=F64)
    for opts in oc.pairwise_options():
        out = oc.run_slots(backend, 4 * q, 4 * k, v, (2, 3, 2), opts)
        oc.assert_close(out, torch.ones_like(out), 1e-12, f"v = 1 with {opts}")


# ---------------------------------------------------------------------------------------------
# 5. Kronecker identity
# ---------------------------------------------------------------------------------------------


def kron_all(mats):
    out = mats[0]
    for m in mats[1:]:
        out = torch.kron(out, m)
    return out


@pytest.mark.parametrize("axes", [(5, 7), (3, 4, 5), (2, 3, 2, 3)], ids=lambda a: "x".join(map(str, a)))
def test_kronecker_identity(axes):
    torch.manual_seed(sum(axes))
    n, m, chunk = math.prod(axes), len(axes), 3
    dim, scaling = m * chunk, 0.8
    batch, hq, hkv = 1, 2, 1
    qa = [torch.randn(batch, hq, nj, chunk, dtype=F64) for nj in axes]
    ka = [torch.randn(batch, hkv, nj, chunk, dtype=F64) for nj in axes]
    idx = multi_index(n, axes)
    assert full_axes(n, axes[1:]) == axes
    q = torch.cat([qa[j][:, :, idx[:, j]] for j in range(m)], dim=-1)  # per-axis parts in orthogonal chunks
    k = torch.cat([ka[j][:, :, idx[:, j]] for j in range(m)], dim=-1)
    v = torch.randn(batch, hkv, n, dim, dtype=F64)
    opts = oc.options(axes[1:], causal="complete", merge="score", sinks=0, local="block")
    causal, full = oc.reference_tensorized_attention(q, k, v, opts, scaling=scaling, return_full_stream=True)
    assert causal.shape == full.shape == (batch, hq, n, dim)
    for h in range(hq):
        probs = [torch.softmax(scaling * qa[j][0, h] @ ka[j][0, h // (hq // hkv)].T, -1) for j in range(m)]
        kron = kron_all(probs)
        oc.assert_close(full[0, h], kron @ v[0, h // (hq // hkv)], 1e-12, "full stream vs Kronecker product")
        dense = torch.softmax(scaling * q[0, h] @ k[0, h // (hq // hkv)].T, -1)  # bidirectional attention
        oc.assert_close(dense, kron, 1e-12, "dense softmax vs Kronecker product")
    # Sanity: the causal stream is not the bidirectional one.
    assert (causal - full).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 6. GQA, batch rows, padding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_gqa_equals_repeated_kv(opts, backend):
    q, k, v = oc.make_qkv(batch=2, hq=6, hkv=2, n=37, seed=17)
    got = oc.run_api(backend, q, k, v, (3, 4), opts)
    want = oc.run_api(backend, q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), (3, 4), opts)
    oc.assert_close(got, want, 1e-12, "GQA vs repeated k/v")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_batch_rows_independent(opts, backend):
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=29, seed=19)
    base = oc.run_api(backend, q, k, v, (5, 3), opts)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[1] = torch.randn_like(x[1])
    changed = oc.run_api(backend, q2, k2, v2, (5, 3), opts)
    oc.assert_close(changed[0], base[0], 0.0, "row 0 changed when row 1 changed")
    assert (changed[1] - base[1]).abs().max() > 1e-3
    alone = oc.run_api(backend, q[:1], k[:1], v[:1], (5, 3), opts)
    oc.assert_close(alone, base[:1], 1e-13, "row 0 alone vs in a batch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_right_padding_is_inert(opts, backend):
    """Appending padded tokens (padding_mask 0) leaves the real tokens' outputs unchanged."""
    real, extra = 29, 12  # 29 -> 41 tokens: the outer axis grows from 3 to 4
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=real + extra, seed=23)
    want = oc.run_api(backend, q[:, :, :real], k[:, :, :real], v[:, :, :real], (3, 4), opts)
    mask = torch.ones(2, real + extra, dtype=torch.long)
    mask[:, real:] = 0
    got = oc.run_api(backend, q, k, v, (3, 4), opts, padding_mask=mask)
    oc.assert_close(got[:, :, :real], want, 1e-12, "real tokens changed by trailing padding")
    assert (got[:, :, real:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", oc.pairwise_options(), ids=oc.option_id)
def test_left_padding_with_positions_equals_unpadded(opts, backend):
    n, lengths = 37, [37, 30, 21]
    mask, pos = oc.left_padding(lengths, n)
    q, k, v = oc.make_qkv(batch=3, hq=4, hkv=2, n=n, seed=29)
    got = oc.run_api(backend, q, k, v, (3, 4), opts, padding_mask=mask, position_ids=pos)
    for b, length in enumerate(lengths):
        sl = slice(n - length, n)
        want = oc.run_api(backend, q[b : b + 1, :, sl], k[b : b + 1, :, sl], v[b : b + 1, :, sl], (3, 4), opts)
        oc.assert_close(got[b : b + 1, :, sl], want, 1e-12, f"row {b}")
        assert (got[b, :, : n - length] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_ids_with_gaps_only_move_the_rope_rerotation(backend):
    """Real tokens sit on consecutive slots whatever their position ids; the ids only tell the
    axis re-rotation where q and k were rotated (absolute rope ignores them)."""
    positions = [0, 1, 2, 5, 6, 7, 8, 13, 14, 20, 21, 22, 23, 24]
    n = len(positions)
    q, k, v = oc.make_qkv(batch=1, hq=4, hkv=2, n=n, seed=31)
    pos = torch.tensor([positions])
    for opts in oc.pairwise_options():
        got = oc.run_api(backend, q, k, v, (3, 4), opts, position_ids=pos)
        if opts.get("rope") == "axis":
            want = oc.run_slots(backend, q, k, v, (3, 4), opts, positions=pos)
        else:
            want = oc.run_api(backend, q, k, v, (3, 4), opts)
        oc.assert_close(got, want, 1e-12, f"{opts}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_position_ids_equal_none(backend):
    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=29, seed=37)
    for pos in (torch.arange(29)[None], torch.arange(29).repeat(2, 1)):
        for opts in oc.pairwise_options()[:2]:
            a = oc.run_api(backend, q, k, v, (5, 3), opts, position_ids=pos)
            b = oc.run_api(backend, q, k, v, (5, 3), opts)
            oc.assert_close(a, b, 0.0, "arange position ids")


def test_option_matrix_helpers():
    assert len(oc.option_matrix()) == 80  # 2^5 x 3 merges, less dominance x mass (complete only)
    rows = oc.pairwise_options()
    assert len(rows) == 6
    for a, b in itertools.combinations(oc.OPTION_KEYS, 2):
        assert len({(r[a], r[b]) for r in rows}) == 4


def test_outer_hops_in_fiber_groups_equal_the_whole(monkeypatch):
    """Without autograd the outer hops run over groups of fibers (bounded memory): same result."""
    import ctxext.attention.torch_backend as tb

    q, k, v = oc.make_qkv(batch=2, hq=4, hkv=2, n=113, seed=5)
    mask = torch.ones(2, 113, dtype=torch.long)
    mask[1, :9] = 0
    for opts in oc.pairwise_options():
        whole = oc.run_api("reference", q, k, v, (3, 4), opts, padding_mask=mask)
        monkeypatch.setattr(tb, "NO_GRAD_SCORE_BUDGET", 1)  # one fiber at a time
        with torch.no_grad():
            grouped = oc.run_api("torch", q, k, v, (3, 4), opts, padding_mask=mask)
        monkeypatch.undo()
        oc.assert_close(grouped, whole, 1e-10, f"{opts}")
