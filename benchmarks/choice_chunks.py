"""The far-block choice in chunks of queries: operator calls and time against the chunk size.

    python benchmarks/choice_chunks.py --lengths 8k,32k --scales 1,8,64 --out docs/bench/choice_chunks.json

:func:`ctxext.attention.retrieve.far_block_index` (the shipped choice: the bound proposes 32 far
blocks of 64, the exact ``max q.k`` picks 8) scores queries in chunks sized for a CPU's memory
(``SELECT_SCORE_BUDGET``, ``EXACT_SCORE_BUDGET``), each a dozen or more operator calls whatever
its size. On a GPU every call is a kernel launch, so the calls, not the arithmetic, may set the
time at long lengths. This counts the ATen operator calls of one choice (a ``TorchDispatchMode``
counter: about the kernels a GPU launches) and times it (median of ``--repeats`` calls, the scales
interleaved so that a noisy machine hits them alike) with the chunks ``--scales`` times larger
(``ctxext.attention.score_budget.SCALE``). Shapes: Llama-3.1-8B's attention (32 query heads, 8
key heads, head dim 128), batch 1; float32 on a CPU, bfloat16 on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ctxext.attention import retrieve, score_budget
from ctxext.attention.options import TensorizedOptions
from ctxext.bench.runner import parse_lengths


class OpCounter(TorchDispatchMode):
    """Counts the ATen operator calls made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def choose(q, k, ok, opts) -> torch.Tensor:
    index = retrieve.far_block_index(q, k, ok, opts, 128)
    if q.is_cuda:
        torch.cuda.synchronize()
    return index


def measure(length: int, scales: list[int], repeats: int, device: torch.device, heads=(32, 8, 128)) -> list[dict]:
    """One row per scale: operator calls, median seconds, and the share of choices equal to scale 1's."""
    hq, hkv, d = heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    opts = TensorizedOptions(
        block_sizes=(128,), sinks=4, local="window", long_range=False, retrieve=8, retrieve_block=64,
        retrieve_candidates=32,
    ).validate()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, length, d, generator=g).to(device, dtype)
    k = torch.randn(1, hkv, length, d, generator=g).to(device, dtype)
    ok = retrieve.retrievable_keys(torch.ones(1, length, dtype=torch.bool, device=device), opts.sinks)
    rows, reference = {}, None
    for scale in scales:
        with score_budget.scaled(scale), OpCounter() as counter:
            index = choose(q, k, ok, opts)
        reference = index if reference is None else reference
        agreement = (index == reference).float().mean().item()  # < 1 only by rounding (bfloat16 matmul shapes)
        rows[scale] = {"n": length, "scale": scale, "op_calls": counter.calls, "seconds": [],
                       "choices_as_scale_1": agreement}  # fmt: skip
    for _ in range(repeats):
        for scale in scales:  # interleaved
            with score_budget.scaled(scale):
                start = time.perf_counter()
                choose(q, k, ok, opts)
                rows[scale]["seconds"].append(time.perf_counter() - start)
    for row in rows.values():
        row["median_s"] = statistics.median(row["seconds"])
    return list(rows.values())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8k,32k", help="comma-separated lengths (8k, 32768, ...)")
    parser.add_argument("--scales", default="1,8,64", help="chunk scales to compare (1: as shipped)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per scale (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = [int(s) for s in args.scales.split(",")]
    out = []
    print("| N | scale | operator calls | median s | vs scale 1 | choices as at scale 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length in parse_lengths(args.lengths):
        rows = measure(length, scales, args.repeats, torch.device(args.device))
        for row in rows:
            ratio = rows[0]["median_s"] / row["median_s"]
            print(f"| {length} | {row['scale']} | {row['op_calls']:,} | {row['median_s']:.3f} | {ratio:.2f}x | "
                  f"{row['choices_as_scale_1']:.2%} |", flush=True)  # fmt: skip
        out += rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": args.device, "rows": out}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
