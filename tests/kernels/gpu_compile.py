"""Compile the kernels for NVIDIA GPUs on a machine without one (run by ``test_gpu_compile.py``).

Triton's interpreter accepts code that its compiler rejects (block shapes, dtypes of
loop-carried values, constexpr use), so the CPU tests alone do not show that the kernels
build. This script runs the Triton backend on CPU tensors with every kernel launch captured
instead of executed, then compiles each distinct launch (signature + constexprs) for the
given CUDA architecture down to a cubin, with the ptxas that ships in the triton wheel.

Usage: ``python -m tests.kernels.gpu_compile [ARCH ...]`` (default 80 90); prints one line per
kernel and exits 1 if any fails. Needs triton imported in compiled mode (no TRITON_INTERPRET).
"""

from __future__ import annotations

import sys

import torch

DTYPES = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.bfloat16: "*bf16",
    torch.float16: "*fp16",
    torch.uint8: "*u8",
    torch.int32: "*i32",
    torch.int64: "*i64",
}

# (dtype, head dim, block_sizes, N, causal, rope, merge, local[, more options]): realistic tiles,
# every flag combination; the last four add sinks and retrieved far blocks (side streams), the last two
# with the two-stage choice (both fused choice kernels), the last scoring far blocks by sub-blocks of 16
CONFIGS = [
    (torch.bfloat16, 128, (64,), 200, "complete", "axis", "score", "block"),
    (torch.float16, 64, (32, 16), 700, "dominance", "absolute", "lse", "block"),
    (torch.float32, 128, (16, 16), 600, "complete", "absolute", "lse", "block"),
    (torch.bfloat16, 256, (128,), 300, "complete", "axis", "lse", "block"),
    (torch.bfloat16, 80, (128,), 300, "dominance", "axis", "score", "block"),
    (torch.bfloat16, 128, (64,), 300, "complete", "axis", "mass", "window"),
    (torch.float16, 64, (32,), 100, "dominance", "absolute", "score", "window"),
    (torch.bfloat16, 64, (128,), 700, "complete", "axis", "lse", "window",
     dict(sinks=4, retrieve=8, retrieve_block=64, long_range=False)),
    (torch.float16, 128, (32,), 300, "complete", "absolute", "lse", "window", dict(sinks=4, retrieve=2, softcap=0)),
    (torch.bfloat16, 128, (128,), 1100, "complete", "axis", "lse", "window",
     dict(sinks=4, retrieve=8, retrieve_block=64, retrieve_candidates=32, long_range=False)),
    (torch.bfloat16, 64, (128,), 1100, "complete", "axis", "lse", "window",
     dict(sinks=4, retrieve=8, retrieve_block=64, retrieve_score_block=16, retrieve_candidates=32, long_range=False)),
]  # fmt: skip


def capture_launches() -> list[tuple]:
    """Run forward + backward of every config with launches captured: [(jit fn, args, kwargs)]."""
    from ctxext.bench.launches import counted_launches

    captured = []
    with counted_launches(run=False, on_launch=lambda fn, args, kwargs: captured.append((fn, args, kwargs))):
        for config in CONFIGS:
            run_config(*config)
    return captured


def run_config(dtype, dim, block_sizes, n, causal, rope, merge, local, *more) -> None:
    """Forward and backward of one entry of :data:`CONFIGS` on CPU tensors (the caller captures the launches)."""
    from ctxext.attention.options import TensorizedOptions
    from ctxext.attention.triton_backend import triton_tensorized_attention

    more = dict(more[0]) if more else {}
    softcap = more.pop("softcap", 30.0)
    q = torch.randn(1, 4, n, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 2, n, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 2, n, dim, dtype=dtype, requires_grad=True)
    opts = TensorizedOptions(block_sizes=block_sizes, causal=causal, rope=rope, merge=merge, local=local, **more)
    opts = opts.validate()
    valid = torch.ones(1, n, dtype=torch.bool)
    valid[0, -3:] = False
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim - dim % 32, 2) / dim) if rope == "axis" else None
    out = triton_tensorized_attention(
        q, k, v, opts, valid=valid, inv_freq=inv_freq, positions=torch.arange(n)[None] + 3, softcap=softcap
    )
    out.float().sum().backward()


def signature(fn, args, kwargs) -> tuple[dict, dict, dict]:
    """Triton signature and constexprs of one captured launch, and its launch options (num_warps, num_stages)."""
    values = dict(zip([p.name for p in fn.params], args))
    values.update(kwargs)
    sig, constexprs = {}, {}
    for p in fn.params:
        value = values[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if abs(value) < 2**31 else "i64"
        elif isinstance(value, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={value!r}")
    return sig, constexprs, {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}


def main(archs: list[int]) -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    launches = capture_launches()
    failures, seen = 0, set()
    for fn, args, kwargs in launches:
        sig, constexprs, launch_options = signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        flags = " ".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper() and k not in ("ACC", "PREC"))
        for arch in archs:
            try:
                compiled = triton_compile(
                    ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": 4, **launch_options},
                )
                print(f"ok   sm_{arch} {fn.__name__} {flags} shared={compiled.metadata.shared}")
            except Exception as err:  # noqa: BLE001 - report every failure, then exit 1
                failures += 1
                print(f"FAIL sm_{arch} {fn.__name__} {flags}: {type(err).__name__}: {str(err)[:3000]}")
    print(f"{len(seen)} distinct launches x {len(archs)} archs, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    archs = [int(a) for a in sys.argv[1:]] or [80, 90]
    sys.exit(main(archs))
