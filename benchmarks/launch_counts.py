"""Operator calls and Triton launches of one call of the shipped attention on the Triton backend.

    python benchmarks/launch_counts.py --lengths 8k,32k,128k --out docs/bench/launch_counts.json

On an H200 the shipped tensorized attention ran 740x-3,500x above its bandwidth floor, a chain of
many small calls (docs/RESULTS.md). This counts, for one layer's call at Llama-3.1-8B's attention
shape (32 query heads, 8 key heads, head dim 128, batch 1, bfloat16 inputs; the shipped options:
4 sinks, a window of 2 x 128, 8 far blocks of 64 chosen from 32 candidates, outer hops off), the
ATen operator calls (:class:`ctxext.bench.launches.OpCounter`) and the launches of the project's
Triton kernels, with the far-block choice on its fused kernels and in PyTorch chunks
(``--no-fused-choice`` of ``ctxext bench``), forward and, with ``--backward``, forward + backward.
Without CUDA the kernels are counted, not run (their outputs are left as allocated), so the counts
come from any machine; the PyTorch parts run for real, which at 128k takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ctxext.attention import fused_choice
from ctxext.attention.options import TensorizedOptions
from ctxext.bench.launches import OpCounter, counted_launches
from ctxext.bench.runner import parse_lengths

SHIPPED = dict(
    block_sizes=(128,), sinks=4, local="window", long_range=False, retrieve=8, retrieve_block=64,
    retrieve_candidates=32,
)  # fmt: skip


def count(length: int, fused: bool, backward: bool, heads=(32, 8, 128)) -> dict:
    """One row: ATen operator calls and Triton launches (by kernel) of one call."""
    from ctxext.attention.triton_backend import triton_tensorized_attention

    hq, hkv, d = heads
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, h, length, d, generator=g).to(device, torch.bfloat16).requires_grad_(backward)
        for h in (hq, hkv, hkv)
    )
    opts = TensorizedOptions(**SHIPPED).validate()
    run = device.type == "cuda"
    with fused_choice.switched(fused), counted_launches(run) as launches, OpCounter() as ops:
        out = triton_tensorized_attention(q, k, v, opts)
        if backward:
            out.float().sum().backward()
    return {
        "n": length,
        "choice": "fused" if fused else "pytorch",
        "mode": "fwd+bwd" if backward else "forward",
        "op_calls": ops.calls,
        "launches": sum(launches.values()),
        "by_kernel": dict(sorted(launches.items())),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8k,32k", help="comma-separated lengths (8k, 32768, ...)")
    parser.add_argument("--choices", default="fused,pytorch", help="fused, pytorch or both")
    parser.add_argument("--backward", action="store_true", help="also count forward + backward")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    choices = args.choices.split(",")
    if unknown := sorted(set(choices) - {"fused", "pytorch"}):
        parser.error(f"--choices: unknown {unknown}; choose fused, pytorch or both")
    rows = []
    print("| N | mode | far-block choice | ATen operator calls | Triton launches | total |")
    print("|---:|---|---|---:|---:|---:|")
    for length in parse_lengths(args.lengths):
        for backward in (False, True) if args.backward else (False,):
            for choice in choices:
                row = count(length, choice == "fused", backward)
                total = row["op_calls"] + row["launches"]
                print(f"| {length} | {row['mode']} | {choice} | {row['op_calls']:,} | {row['launches']} | {total:,} |",
                      flush=True)  # fmt: skip
                rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
