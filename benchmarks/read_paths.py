"""Reading the chosen far blocks: over the union of 64 queries' choices, or pair by pair.

    python benchmarks/read_paths.py --lengths 2k,4k,8k,16k --repeats 3 --threads 2 --out docs/bench/read_paths.json

The torch backend reads each query's chosen far blocks (``retrieve = 8`` blocks of 64) either as
one score matrix per 64 queries over the union of the blocks any of them chose
(:func:`ctxext.attention.retrieve.retrieved_attention`: ``O(Q * U * m)`` scores, and the union
``U`` grows with the far blocks) or pair by pair, in tiles of pairs that share a key block
(:func:`ctxext.attention.retrieve.retrieved_attention_by_block`: ``O(Q * k * m)``, linear).
:func:`ctxext.attention.retrieve.read_chosen_blocks` picks by ``READ_UNION_MAX_RATIO``. This times
both on the same inputs and the same choice (median of ``--repeats`` calls, the two interleaved
so that a noisy machine hits them alike), and the whole attention call of the torch backend
(choice included) with the path forced each way. Shapes: SmolLM2-135M's attention (9 query heads,
3 key heads, head dim 64), batch 1, float32, the shipped settings (4 sinks, a window of 2 x 128,
8 far blocks of 64 chosen from 32 candidates); random q, k, v (the union of real text's choices may
be smaller).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ctxext.attention import retrieve
from ctxext.attention.options import TensorizedOptions
from ctxext.attention.torch_backend import torch_tensorized_attention
from ctxext.bench.runner import parse_lengths

OPTS = TensorizedOptions(
    block_sizes=(128,), sinks=4, local="window", long_range=False, retrieve=8, retrieve_block=64, retrieve_candidates=32
)
HQ, HKV, D = 9, 3, 64


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(length: int, repeats: int, whole: bool) -> dict:
    """One row: the two readings' seconds (medians), their ratio and largest difference; with
    ``whole``, the torch backend's attention call both ways."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, h, length, D, generator=gen) for h in (HQ, HKV, HKV))
    key_ok = retrieve.retrievable_keys(torch.ones(1, length, dtype=torch.bool), OPTS.sinks)
    qs = q * D**-0.5
    index = retrieve.far_block_index(q, k, key_ok, OPTS, 128)
    nb = -(-length // OPTS.retrieval_block)
    chosen = retrieve.index_mask(index, nb)
    m = OPTS.retrieval_block
    union = lambda: retrieve.retrieved_attention(qs, k, v, chosen, key_ok, m, None)  # noqa: E731
    by_block = lambda: retrieve.retrieved_attention_by_block(qs, k, v, index, key_ok, m, None)  # noqa: E731
    with torch.no_grad():
        (out_u, lse_u), (out_b, lse_b) = union(), by_block()
        times: dict[str, list[float]] = {"union": [], "by_block": [], "attention_union": [], "attention_default": []}
        for _ in range(repeats):
            times["union"].append(timed(union))
            times["by_block"].append(timed(by_block))
            if whole:
                for name, ratio in (("attention_union", 10**9), ("attention_default", retrieve.READ_UNION_MAX_RATIO)):
                    saved, retrieve.READ_UNION_MAX_RATIO = retrieve.READ_UNION_MAX_RATIO, ratio
                    try:
                        times[name].append(timed(lambda: torch_tensorized_attention(q, k, v, OPTS)))
                    finally:
                        retrieve.READ_UNION_MAX_RATIO = saved
    shipped = "by block" if nb > retrieve.READ_UNION_MAX_RATIO * OPTS.retrieve else "union"
    row = {"n": length, "far_blocks": nb, "path": shipped}
    row.update({f"{name}_s": statistics.median(t) for name, t in times.items() if t})
    row["read_speedup"] = row["union_s"] / row["by_block_s"]
    if whole:
        row["attention_speedup"] = row["attention_union_s"] / row["attention_default_s"]
    row["max_abs_diff"] = float((out_u - out_b).abs().max())
    row["lse_max_abs_diff"] = float((lse_u - lse_b).abs().nan_to_num(0.0).max())
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| N | far blocks | shipped path | union s | by block s | by block faster | attention: union s "
        "| attention: shipped s | max diff |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        whole = (
            f"{r['attention_union_s']:.2f} | {r['attention_default_s']:.2f}" if "attention_union_s" in r else "- | -"
        )
        lines.append(
            f"| {r['n']:,} | {r['far_blocks']} | {r['path']} | {r['union_s']:.3f} | {r['by_block_s']:.3f} | "
            f"{r['read_speedup']:.2f}x | {whole} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2k,4k,8k,16k")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole attention call")
    ap.add_argument("--out", type=Path, default=None, help="JSON of the rows")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for length in parse_lengths(args.lengths):
        rows.append(measure(length, args.repeats, not args.no_whole))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python benchmarks/read_paths.py " + " ".join(argv), "torch": torch.__version__}
        args.out.write_text(json.dumps({**meta, "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
