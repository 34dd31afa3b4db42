"""Shared helpers for the operator tests: inputs, option matrices, exact attention, reach sets.

Imported by ``test_operator_*.py`` and ``test_layout.py``; not a test module itself.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ctxext.attention.layout import full_axes, multi_index
from ctxext.attention.options import TensorizedOptions
from ctxext.attention.reference import reference_tensorized_attention
from ctxext.attention.torch_backend import torch_tensorized_attention

F64 = torch.float64

CAUSAL = ("complete", "dominance")
ROPE = ("absolute", "axis")
SINKS = (0, 3)
LOCAL = ("block", "window")
MERGE = ("score", "lse", "mass")
LONG_RANGE = (True, False)

OPTION_KEYS = ("causal", "rope", "sinks", "local", "merge", "long_range")
_LEVELS = (CAUSAL, ROPE, SINKS, LOCAL, MERGE, LONG_RANGE)


@pytest.fixture(autouse=True)
def single_thread():
    """The reference is a Python loop of tiny ops: one intra-op thread is much faster on 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def option_id(o: dict) -> str:
    return "-".join(
        [
            o["causal"][:4],
            "abs" if o["rope"] == "absolute" else "axis",
            f"s{o['sinks']}",
            "win" if o["local"] == "window" else "blk",
            o["merge"],
            "long" if o["long_range"] else "loconly",
        ]
    )


def option_matrix(**fixed) -> list[dict]:
    """The full product of the operator switches, with some keys pinned by ``fixed``."""
    levels = [(fixed[key],) if key in fixed else lv for key, lv in zip(OPTION_KEYS, _LEVELS)]
    combos = [dict(zip(OPTION_KEYS, combo)) for combo in itertools.product(*levels)]
    return [o for o in combos if not (o["merge"] == "mass" and o["causal"] == "dominance")]  # complete only


def pairwise_options() -> list[dict]:
    """A covering array of strength 2 over the six binary switches: 6 rows cover every pair.

    Columns are distinct 3-subsets of rows 1..5 (row 0 is all-first-level), so any two columns
    show (first, first) in row 0 and every other level pair in some row.
    """
    subsets = list(itertools.combinations(range(1, 6), 3))[: len(OPTION_KEYS)]
    rows = []
    for r in range(6):
        rows.append({key: lv[1 if r in cols else 0] for key, lv, cols in zip(OPTION_KEYS, _LEVELS, subsets)})
    for a, b in itertools.combinations(range(len(OPTION_KEYS)), 2):
        seen = {(row[OPTION_KEYS[a]], row[OPTION_KEYS[b]]) for row in rows}
        assert len(seen) == 4, "pairwise covering array is broken"
    return rows


def rope_inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=F64) / dim)


def make_qkv(batch=2, hq=4, hkv=2, n=23, dim=8, dtype=F64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, n, dim, generator=gen, dtype=F64).to(dtype)
    k = torch.randn(batch, hkv, n, dim, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(batch, hkv, n, dim, generator=gen, dtype=F64).to(dtype)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v


def options(block_sizes, **kw) -> TensorizedOptions:
    return TensorizedOptions(block_sizes=tuple(block_sizes), **kw).validate()


def run_slots(backend: str, q, k, v, block_sizes, opts: dict, valid=None, **kw):
    """Run a backend on already-folded slots; adds RoPE frequencies when ``rope='axis'``."""
    o = options(block_sizes, **opts)
    inv = rope_inv_freq(q.shape[-1]) if o.rope == "axis" else None
    fn = reference_tensorized_attention if backend == "reference" else torch_tensorized_attention
    return fn(q, k, v, o, valid=valid, inv_freq=inv, **kw)


def run_api(backend: str, q, k, v, block_sizes, opts: dict, **kw):
    """The public operator with the given switches; adds RoPE frequencies when ``rope='axis'``."""
    from ctxext import tensorized_attention

    if opts.get("rope") == "axis":
        kw.setdefault("rope_inv_freq", rope_inv_freq(q.shape[-1]))
    return tensorized_attention(q, k, v, block_sizes=tuple(block_sizes), backend=backend, **opts, **kw)


def causal_sdpa(q, k, v, scaling=None):
    """Exact causal attention in float64 with k/v repeated for grouped-query heads."""
    g = q.shape[1] // k.shape[1]
    k, v = k.to(F64).repeat_interleave(g, dim=1), v.to(F64).repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q.to(F64), k, v, is_causal=True, scale=scaling)


def left_padding(lengths: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padding mask (B, n) with ``n - lengths[b]`` leading pads, and shifted position ids."""
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for b, real in enumerate(lengths):
        mask[b, n - real :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return mask, position_ids


def strides(axes) -> list[int]:
    return [math.prod(axes[j + 1 :]) for j in range(len(axes))]


def dominance_set(n: int, block_sizes) -> torch.Tensor:
    """(n, n) bool: [p, p'] True when every index of p' is <= the same index of p."""
    idx = multi_index(n, full_axes(n, tuple(block_sizes)))
    return (idx[None, :, :] <= idx[:, None, :]).all(-1)


def local_set(n: int, block: int, sinks: int, window: bool) -> torch.Tensor:
    """(n, n) bool: the key set of the local hop's causal stream (long_range=False)."""
    out = torch.zeros(n, n, dtype=torch.bool)
    for p in range(n):
        start = (p // block) * block
        if window and start > 0:
            start -= block
        out[p, start : p + 1] = True
        out[p, : min(sinks, start)] = True
    return out


def weight_matrix(fn, q, k, hkv: int) -> torch.Tensor:
    """Mixing weights W (B, Hq, N, N) of a linear-in-v operator: out[p] = sum_p' W[p, p'] v[p'].

    Each call feeds one-hot value columns: column d of v is the indicator of one key slot.
    """
    b, hq, n, d = q.shape
    w = torch.zeros(b, hq, n, n, dtype=F64)
    for start in range(0, n, d):
        cols = list(range(start, min(start + d, n)))
        v = torch.zeros(b, hkv, n, d, dtype=q.dtype)
        for c, key in enumerate(cols):
            v[:, :, key, c] = 1
        out = fn(q, k, v)
        for c, key in enumerate(cols):
            w[:, :, :, key] = out[..., c].to(F64)
    return w


def assert_close(got, want, atol, what=""):
    """Max-abs-error assertion with a readable message (no relative slack)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.to(F64) - want.to(F64)).abs().max().item() if got.numel() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol:.1e}"
