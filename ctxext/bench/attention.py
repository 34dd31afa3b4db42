"""Section ``attention``: the attention operator alone, forward and forward+backward.

Shapes come from the model config: q ``(B, Hq, N, D)``, k and v ``(B, Hkv, N, D)``
(grouped-query k/v are never repeated: SDPA gets ``enable_gqa=True``, FlashAttention-2
and tensorized attention take GQA natively). Every method at one (N, mode) runs on the
same inputs, back to back, so machine noise hits all of them. Each cell also carries the
memory-bandwidth floor of :mod:`ctxext.bench.bandwidth` (``floor_s``, ``x_floor``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .bandwidth import copy_bandwidth, exact_bytes, floor_bytes, tensorized_hop_bytes
from .measure import describe_error, measure, release
from .methods import Method, method_problem
from .profile import profile_cell
from .sources import attention_shapes

MODES = ("fwd", "fwdbwd")


def attention_call(method: Method, options, inv_freq: torch.Tensor | None = None) -> Any:
    """``fn(q, k, v) -> (B, Hq, N, D)`` for ``method``; inputs ``(B, H, N, D)``.

    inv_freq: ``(r/2,)`` RoPE inverse frequencies of the model (``rope="axis"`` needs them)."""
    if method.kind == "sdpa":
        import torch.nn.functional as F

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

        return sdpa
    if method.kind == "flash2":
        from flash_attn import flash_attn_func

        def flash2(q, k, v):  # flash_attn takes (B, N, H, D): the transposes are views
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)

        return flash2
    from ..attention.ops import tensorized_attention

    kwargs = dataclasses.replace(options, backend=method.backend).to_dict()
    if options.rope == "axis":
        kwargs["rope_inv_freq"] = inv_freq.to(torch.float32)

    def ta(q, k, v):
        return tensorized_attention(q, k, v, **kwargs)

    return ta


def _inputs(ctx, n: int, mode: str, layout_bnhd: bool):
    """q, k, v and the output gradient (None for ``fwd``); (B, H, N, D) views of (B, N, H, D) for flash."""
    hq, hkv, d = attention_shapes(ctx.config)
    b = ctx.spec.batch
    g = torch.Generator(device=ctx.device).manual_seed(0)
    grad = mode == "fwdbwd"

    def make(h):
        shape = (b, n, h, d) if layout_bnhd else (b, h, n, d)
        x = torch.randn(shape, generator=g, device=ctx.device, dtype=ctx.dtype)
        x = x.transpose(1, 2) if layout_bnhd else x
        return x.requires_grad_(grad)

    q, k, v = make(hq), make(hkv), make(hkv)
    dout = torch.randn_like(q) if grad else None
    return q, k, v, dout


def _step(fn, q, k, v, dout):
    def call():
        if dout is None:
            with torch.no_grad():
                fn(q, k, v)
            return
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)

    return call


def _floor(ctx, method: Method, n: int, mode: str, bandwidth: float) -> dict[str, Any]:
    hq, hkv, d = attention_shapes(ctx.config)
    e = torch.finfo(ctx.dtype).bits // 8
    b = ctx.spec.batch
    if method.kind == "tensorized":
        hops = tensorized_hop_bytes(b, hq, hkv, n, d, e, ctx.options)
    else:
        hops = exact_bytes(b, hq, hkv, n, d, e)
    moved = floor_bytes(hops, mode)
    return {"floor_bytes": moved, "hops": len(hops), "floor_s": moved / bandwidth}


def run(ctx) -> list[dict[str, Any]]:
    """Cells for every (N, mode, method): time, peak memory, bandwidth floor."""
    hq, hkv, d = attention_shapes(ctx.config)
    ctx.log("  measuring copy bandwidth ...")
    bw = copy_bandwidth(ctx.device)
    ctx.log(f"  copy bandwidth {bw['gib_per_s']:.1f} GiB/s ({bw['method']})")
    ctx.info["attention"] = {
        "shapes": {"batch": ctx.spec.batch, "q_heads": hq, "kv_heads": hkv, "head_dim": d},
        "bandwidth": bw,
        "floor": "see ctxext/bench/bandwidth.py: per hop, fwd = in + out bytes, fwd+bwd = 3 in + 2 out",
    }
    problems = {m.name: method_problem(m, ctx.device, ctx.options, ctx.dtype, d) for m in ctx.methods}
    fns = {}
    inv_freq = None
    if ctx.options.rope == "axis":
        from ..attention.rope import inv_freq_from_config

        inv_freq = inv_freq_from_config(ctx.config).to(ctx.device)
    for m in ctx.methods:
        if problems[m.name] is None:
            try:
                fns[m.name] = attention_call(m, ctx.options, inv_freq)
            except ImportError as err:
                problems[m.name] = describe_error(err)
    too_slow: dict[tuple[str, str], str] = {}
    cells = []
    for n in ctx.lengths:
        for mode in MODES:
            inputs: dict[bool, Any] = {}
            for m in ctx.methods:
                cell = {"section": "attention", "mode": mode, "method": m.name, "n": n}
                cell.update(_floor(ctx, m, n, mode, bw["bytes_per_s"]))
                error = problems[m.name] or too_slow.get((m.name, mode))
                if error is None:
                    bnhd = m.kind == "flash2"
                    try:
                        if bnhd not in inputs:
                            inputs[bnhd] = _inputs(ctx, n, mode, bnhd)
                    except Exception as err:  # noqa: BLE001 - e.g. OOM allocating inputs
                        error = f"allocating inputs: {describe_error(err)}"
                if error is not None:
                    cell.update(median_s=None, peak_mib=None, error=error)
                else:
                    call = _step(fns[m.name], *inputs[bnhd])
                    cell.update(
                        measure(
                            call,
                            ctx.device,
                            warmup=ctx.spec.warmup,
                            repeats=ctx.spec.repeats,
                            max_call_s=ctx.spec.max_call_s,
                        )
                    )
                    profile_cell(ctx, cell, call)
                if cell.get("median_s"):
                    cell["x_floor"] = cell["median_s"] / cell["floor_s"]
                    if cell.get("over_limit"):
                        too_slow[(m.name, mode)] = (
                            f"skipped: N={n} took {cell['median_s']:.1f} s > --max-call-s {ctx.spec.max_call_s}"
                        )
                ctx.progress(cell)
                cells.append(cell)
            del inputs
            release(ctx.device)
    return cells
