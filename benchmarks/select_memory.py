"""Peak memory of the far-block choice (``retrieve=k``): scored in chunks of queries against all at once.

    python benchmarks/select_memory.py --lengths 8192,32768 --out docs/bench/select_memory.json

The choice scores every eligible far block for every query head: a ``(B, Hq, L, L / m)`` bound
tensor when done at once (``O(L^2)``: 1.2 GiB for SmolLM2's 9 heads at 32k with blocks of 64).
:func:`ctxext.attention.retrieve.far_block_index` scores queries in chunks so that this tensor
stays below ``SELECT_SCORE_BUDGET`` elements. Each cell runs in a fresh process (CPU) and reports
the peak resident memory above the inputs (``ru_maxrss``, with glibc's mmap threshold at 64 KiB so
that freed tensors leave the resident set; shapes: SmolLM2-135M, float32, batch 1), with the
budget as shipped and with one chunk (the budget raised past the whole tensor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CELL = r"""
import json, resource, sys, time, torch
from ctxext.attention import retrieve
from ctxext.attention.options import TensorizedOptions
length, hq, hkv, d, budget = (int(x) for x in sys.argv[1:6])
torch.set_num_threads(1)
opts = TensorizedOptions(block_sizes=(128,), sinks=4, local="window", long_range=False, retrieve=8,
                         retrieve_block=64).validate()
g = torch.Generator().manual_seed(0)
q = torch.randn(1, hq, length, d, generator=g)
k = torch.randn(1, hkv, length, d, generator=g)
ok = retrieve.retrievable_keys(torch.ones(1, length, dtype=torch.bool), opts.sinks)
if budget > 0:
    retrieve.SELECT_SCORE_BUDGET = budget
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
index = retrieve.far_block_index(q, k, ok, opts, 128)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (peak - base) / 1024, "seconds": seconds, "chosen": int((index >= 0).sum())}))
"""


def cell(length: int, budget: int, hq: int, hkv: int, d: int) -> dict:
    """One measurement in a fresh process (budget 0: as shipped)."""
    args = [sys.executable, "-c", CELL, str(length), str(hq), str(hkv), str(d), str(budget)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors leave RSS: its peak tracks live ones
    proc = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768", help="comma-separated sequence lengths")
    parser.add_argument("--heads", default="9,3,64", help="Hq,Hkv,head dim (default: SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=None, help="write the cells as JSON here")
    args = parser.parse_args(argv)
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        whole = 2 * hq * length * (length // 64 + 1)  # budget past the bound tensor: one chunk
        chunked, at_once = cell(length, 0, hq, hkv, d), cell(length, whole, hq, hkv, d)
        if chunked["chosen"] != at_once["chosen"]:
            raise SystemExit(f"L={length}: the chunked choice differs from the one-chunk choice")
        rows.append({"length": length, "chunked": chunked, "one_chunk": at_once})
    print("| L | peak MiB, chunked (as shipped) | peak MiB, one chunk | time s, chunked / one chunk |")
    print("|---|---|---|---|")
    for r in rows:
        c, o = r["chunked"], r["one_chunk"]
        times = f"{c['seconds']:.2f} / {o['seconds']:.2f}"
        print(f"| {r['length']} | {c['peak_mib']:.0f} | {o['peak_mib']:.0f} | {times} |")
    result = {"command": "python benchmarks/select_memory.py " + " ".join(argv or sys.argv[1:]), "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
