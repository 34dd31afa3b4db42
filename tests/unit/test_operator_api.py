"""The public operator's API: validation, error messages, dtypes, backend choice."""

from __future__ import annotations

import warnings

import pytest
import torch

try:
    from . import operator_cases as oc
except ImportError:
    import operator_cases as oc

import ctxext
from ctxext import TensorizedConfigError, TensorizedOptions, tensorized_attention
from ctxext.attention import ops

single_thread = oc.single_thread  # autouse fixture


def qkv(n=13, batch=2, hq=4, hkv=2, dim=8, dtype=torch.float64):
    return oc.make_qkv(batch=batch, hq=hq, hkv=hkv, n=n, dim=dim, dtype=dtype, seed=0)


def test_public_exports():
    assert ctxext.tensorized_attention is tensorized_attention
    assert issubclass(TensorizedConfigError, ValueError)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fewer_queries_than_keys_points_to_the_tensorized_cache(backend):
    q, k, v = qkv(n=9)
    with pytest.raises(NotImplementedError, match="ctxext.TensorizedCache") as info:
        tensorized_attention(q[:, :, -1:], k, v, backend=backend)
    assert "use_cache=False" in str(info.value)
    assert "1 queries but 9 keys" in str(info.value)


@pytest.mark.parametrize(
    "block_sizes",
    [(0,), (-1,), (2.5,), (), (16, 0), (True,)],
    ids=["zero", "negative", "float", "empty", "inner0", "bool"],
)
def test_invalid_block_sizes(block_sizes):
    q, k, v = qkv()
    with pytest.raises(TensorizedConfigError, match="block_sizes"):
        tensorized_attention(q, k, v, block_sizes=block_sizes)
    with pytest.raises(TensorizedConfigError, match="block_sizes"):
        TensorizedOptions(block_sizes=tuple(block_sizes)).validate()


@pytest.mark.parametrize(
    "key,value",
    [
        ("causal", "full"),
        ("causal", "Complete"),
        ("rope", "yarn"),
        ("local", "sliding"),
        ("merge", "mean"),
        ("backend", "cuda"),
        ("sinks", -1),
        ("sinks", 1.5),
        ("sinks", True),
        ("long_range", "yes"),
    ],
    ids=lambda x: str(x),
)
def test_invalid_settings_name_the_key(key, value):
    q, k, v = qkv()
    with pytest.raises(TensorizedConfigError, match=rf"tensorized_attention\.{key}\b") as info:
        tensorized_attention(q, k, v, **{key: value})
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=key):  # it is a ValueError too
        TensorizedOptions(**{key: value}).validate()


def test_unknown_mode_lists_the_choices():
    with pytest.raises(TensorizedConfigError, match="complete, dominance"):
        TensorizedOptions(causal="full").validate()


def test_from_dict_reports_every_problem_at_once():
    raw = {"block_size": [64], "causal": "bogus", "sinks": -2, "merge": "lse"}
    with pytest.raises(TensorizedConfigError) as info:
        TensorizedOptions.from_dict(raw, where="config.tensorized_attention")
    msg = str(info.value)
    assert "config.tensorized_attention.block_size: unknown setting (did you mean 'block_sizes'?)" in msg
    assert "config.tensorized_attention.causal" in msg and "'bogus'" in msg
    assert "config.tensorized_attention.sinks" in msg and "-2" in msg
    assert "merge" not in msg.replace("block_size", "")  # the valid key is not reported
    assert msg.count("\n  - ") == 3


def test_from_dict_typos_and_unknown_keys():
    with pytest.raises(TensorizedConfigError, match="did you mean 'long_range'"):
        TensorizedOptions.from_dict({"longrange": False})
    with pytest.raises(TensorizedConfigError, match="known keys: "):
        TensorizedOptions.from_dict({"zzz": 1})


def test_from_dict_roundtrip_and_defaults():
    assert TensorizedOptions.from_dict(None) == TensorizedOptions()
    assert TensorizedOptions() == TensorizedOptions(
        block_sizes=(128,), causal="complete", rope="absolute", sinks=0, local="block", merge="score"
    )
    opts = TensorizedOptions.from_dict({"block_sizes": [64, 32], "causal": "dominance", "sinks": 4})
    assert opts.block_sizes == (64, 32) and opts.inner_block == 32
    d = opts.to_dict()
    assert d["block_sizes"] == [64, 32] and d["sinks"] == 4
    assert TensorizedOptions.from_dict(d) == opts


def test_from_dict_block_sizes_not_a_list():
    with pytest.raises(TensorizedConfigError, match="block_sizes"):
        TensorizedOptions.from_dict({"block_sizes": 128})


def test_list_block_sizes_accepted():
    q, k, v = qkv()
    a = tensorized_attention(q, k, v, block_sizes=[5], backend="torch")
    b = tensorized_attention(q, k, v, block_sizes=(5,), backend="torch")
    assert torch.equal(a, b)


def test_axis_rope_needs_inv_freq():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="rope_inv_freq"):
        tensorized_attention(q, k, v, rope="axis", block_sizes=(4,))
    with pytest.raises(ValueError, match="inv_freq"):
        oc.reference_tensorized_attention(q, k, v, oc.options((4,), rope="axis"))


def test_axis_rope_changes_results_beyond_one_block():
    q, k, v = qkv(n=29)
    a = oc.run_api("torch", q, k, v, (4,), dict(rope="absolute"))
    b = oc.run_api("torch", q, k, v, (4,), dict(rope="axis"))
    oc.assert_close(a[:, :, :4], b[:, :, :4], 1e-12, "first block")
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize(
    "position_ids",
    [[0, 1, 2, 2, 3], [0, 1, 3, 2, 4], [4, 3, 2, 1, 0]],
    ids=["repeat", "swap", "decreasing"],
)
def test_non_increasing_position_ids_raise(position_ids):
    q, k, v = qkv(n=5)
    with pytest.raises(ValueError, match="increase strictly"):
        tensorized_attention(q, k, v, position_ids=torch.tensor([position_ids]), block_sizes=(2,))


def test_repeated_position_ids_of_padding_are_fine():
    q, k, v = qkv(n=6)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[0, 0, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    out = tensorized_attention(q, k, v, position_ids=pos, padding_mask=mask, block_sizes=(2,))
    assert torch.isfinite(out).all() and (out[0, :, :3] == 0).all()


def test_negative_position_ids_raise():
    q, k, v = qkv(n=5)
    with pytest.raises(ValueError, match=">= 0"):
        tensorized_attention(q, k, v, position_ids=torch.tensor([[-1, 0, 1, 2, 3]]), block_sizes=(2,))


def test_quadratic_padding_mask_is_refused():
    q, k, v = qkv(n=7)
    mask = torch.ones(2, 7, 7, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match=r"O\(N\) masks"):
        tensorized_attention(q, k, v, padding_mask=mask)
    with pytest.raises(ValueError, match="padding_mask must have shape"):
        tensorized_attention(q, k, v, padding_mask=torch.ones(2, 6))


def test_bad_position_ids_length():
    q, k, v = qkv(n=7)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        tensorized_attention(q, k, v, position_ids=torch.arange(8)[None])


def test_bad_position_ids_rank():
    q, k, v = qkv(n=7)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        tensorized_attention(q, k, v, position_ids=torch.arange(7).view(1, 1, 7) + 1)


@pytest.mark.parametrize(
    "shapes,match",
    [
        (((2, 4, 7, 8), (2, 2, 7, 8), (2, 2, 7)), "expects q"),
        (((4, 7, 8), (2, 7, 8), (2, 7, 8)), "expects q"),
        (((2, 4, 7, 8), (2, 2, 7, 8), (2, 2, 7, 4)), "same shape"),
        (((2, 4, 7, 8), (1, 2, 7, 8), (1, 2, 7, 8)), "batch or head dim"),
        (((2, 4, 7, 8), (2, 2, 7, 4), (2, 2, 7, 4)), "batch or head dim"),
        (((2, 5, 7, 8), (2, 2, 7, 8), (2, 2, 7, 8)), "multiple of key-value heads"),
    ],
    ids=["v3d", "all3d", "kv-mismatch", "batch", "headdim", "groups"],
)
def test_shape_errors(shapes, match):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        tensorized_attention(q, k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_output_shape_and_dtype(backend, dtype):
    q, k, v = qkv(n=11, dtype=dtype)
    out = tensorized_attention(q, k, v, block_sizes=(4,), backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    assert torch.isfinite(out.float()).all()


def test_auto_backend_is_torch_on_cpu():
    q, k, v = qkv(n=29)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    a = tensorized_attention(q, k, v, block_sizes=(3, 4), backend="auto")
    b = tensorized_attention(q, k, v, block_sizes=(3, 4), backend="torch")
    assert torch.equal(a, b)


def test_triton_on_cpu_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    q, k, v = qkv(n=29)
    with pytest.warns(UserWarning, match="needs CUDA tensors"):
        a = tensorized_attention(q, k, v, block_sizes=(3, 4), backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = tensorized_attention(q, k, v, block_sizes=(3, 4), backend="triton")  # warned once only
    c = tensorized_attention(q, k, v, block_sizes=(3, 4), backend="torch")
    assert torch.equal(a, c) and torch.equal(b, c)


def test_scaling_default_is_inverse_sqrt_dim():
    q, k, v = qkv(n=29, dim=16)
    a = tensorized_attention(q, k, v, block_sizes=(3, 4))
    b = tensorized_attention(q, k, v, block_sizes=(3, 4), scaling=16**-0.5)
    c = tensorized_attention(q, k, v, block_sizes=(3, 4), scaling=0.5)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_inputs_are_not_modified():
    q, k, v = qkv(n=29)
    copies = [x.clone() for x in (q, k, v)]
    mask, pos = oc.left_padding([29, 20], 29)
    tensorized_attention(q, k, v, block_sizes=(3, 4), padding_mask=mask, position_ids=pos, sinks=2)
    for x, c in zip((q, k, v), copies):
        assert torch.equal(x, c)


def test_mass_merge_needs_complete_mode():
    with pytest.raises(TensorizedConfigError, match="merge: 'mass' needs causal='complete'"):
        TensorizedOptions(causal="dominance", merge="mass").validate()
