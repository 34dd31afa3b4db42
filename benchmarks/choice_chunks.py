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

``--fused`` adds a row per length for the Triton backend's fused choice
(:mod:`ctxext.attention.fused_choice`: its operator calls plus its Triton launches, on the
float32 queries and keys the backend passes it, ``tl.dot`` in tf32 as for a bfloat16 model). On
CUDA it is timed with the others; without CUDA its launches are counted, not run (the kernels run
on a CPU only in Triton's interpreter, whose time means nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ctxext.attention import fused_choice, retrieve, score_budget
from ctxext.attention.options import TensorizedOptions
from ctxext.bench.launches import OpCounter, counted_launches
from ctxext.bench.runner import parse_lengths


def choose(q, k, ok, opts) -> torch.Tensor:
    index = retrieve.far_block_index(q, k, ok, opts, 128)
    if q.is_cuda:
        torch.cuda.synchronize()
    return index


def choose_fused(q, k, ok, opts) -> torch.Tensor:
    """The fused choice as the Triton backend calls it: float32 queries and keys, tf32 bound."""
    index = fused_choice.choose(q.float(), k.float(), ok, opts, 128, "tf32")
    if q.is_cuda:
        torch.cuda.synchronize()
    return index


def fused_row(length: int, q, k, ok, opts, reference: torch.Tensor, repeats: int) -> dict:
    """Operator calls + launches of the fused choice; on CUDA also its time and its agreement with scale 1."""
    run = q.is_cuda
    with counted_launches(run) as launches, OpCounter() as counter:
        index = choose_fused(q, k, ok, opts)
    row = {"n": length, "scale": "fused", "op_calls": counter.calls, "launches": sum(launches.values()), "seconds": []}
    if run:  # the same blocks per query (order aside), but for rounding
        same = index.long().sort(-1).values == reference.sort(-1).values
        row["choices_as_scale_1"] = same.all(-1).float().mean().item()
        for _ in range(repeats):
            start = time.perf_counter()
            choose_fused(q, k, ok, opts)
            row["seconds"].append(time.perf_counter() - start)
    return row


def measure(
    length: int, scales: list[int], repeats: int, device: torch.device, heads=(32, 8, 128), fused: bool = False
) -> list[dict]:
    """One row per scale (and with ``fused`` one for the fused choice): operator calls, median seconds,
    and the share of choices equal to scale 1's."""
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
    out = list(rows.values())
    if fused:
        out.append(fused_row(length, q, k, ok, opts, reference, repeats))
    for row in out:
        row["median_s"] = statistics.median(row["seconds"]) if row["seconds"] else None
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8k,32k", help="comma-separated lengths (8k, 32768, ...)")
    parser.add_argument("--scales", default="1,8,64", help="chunk scales to compare (1: as shipped)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per scale (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch threads")
    parser.add_argument("--fused", action="store_true", help="add the Triton backend's fused choice (see above)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scales = [int(s) for s in args.scales.split(",")]
    out = []
    print("| N | scale | operator calls (+ Triton launches) | median s | vs scale 1 | choices as at scale 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length in parse_lengths(args.lengths):
        rows = measure(length, scales, args.repeats, torch.device(args.device), fused=args.fused)
        for row in rows:
            calls = f"{row['op_calls']:,}" + (f" + {row['launches']}" if "launches" in row else "")
            timed = row["median_s"] is not None
            median = f"{row['median_s']:.3f}" if timed else "not run"
            ratio = f"{rows[0]['median_s'] / row['median_s']:.2f}x" if timed else "-"
            same = f"{row['choices_as_scale_1']:.2%}" if "choices_as_scale_1" in row else "-"
            print(f"| {length} | {row['scale']} | {calls} | {median} | {ratio} | {same} |", flush=True)
        out += rows
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": args.device, "rows": out}, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
