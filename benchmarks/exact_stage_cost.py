"""What the exact stage of the two-stage far-block choice (``retrieve_candidates = C``) costs on
each of its two paths, side by side in one process: the matmul over the union of a chunk's
candidate blocks (``retrieve.exact_scores_over_union``) and each candidate block scored only by
the queries that proposed it (``retrieve.exact_scores_by_block``), and which one
``retrieve.exact_block_scores`` picks at each length.

    python benchmarks/exact_stage_cost.py --lengths 2048,4096,8192,16384,32768 \
        --out docs/study/round14/exact_stage_cost.json --plot docs/study/round14/exact_stage_cost.png
    python benchmarks/exact_stage_cost.py --replot docs/study/round14/exact_stage_cost.json --plot out.png  # no timing

Shapes are SmolLM2-135M's (9 query heads over 3 key heads of 64 channels), far blocks of 64 slots
outside a window of two blocks of 128, as the ``retrieve-b64`` recipe; the candidates are the
bound's top C on random queries and keys (``far_block_index`` with ``retrieve = C``), so the union
a chunk of queries proposes is as spread as the bound makes it. One call scores every query of one
layer's forward pass; time is the median of ``--repeats`` calls. On a CPU only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ctxext.attention import retrieve  # noqa: E402
from ctxext.attention.options import TensorizedOptions  # noqa: E402


def candidates(qs, ks, key_ok, c: int, m: int, n: int) -> torch.Tensor:
    """``(B, Hq, Q, C)`` the bound's C best far blocks per query (``-1``, where fewer exist, made 0)."""
    opts = TensorizedOptions(block_sizes=(n,), sinks=4, local="window", long_range=False, retrieve=c, retrieve_block=m)
    return retrieve.far_block_index(qs, ks, key_ok, opts, n).clamp_min(0)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plot(result: dict, path: Path) -> None:
    """Seconds per call of both paths against the length (log-log), the path taken marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    tokens = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, colour in (("union_s", "over the union", "tab:red"), ("by_block_s", "by block", "tab:blue")):
        ax.plot(tokens, [r[key] for r in rows], "o-", color=colour, label=label)
        taken = [r for r in rows if r["path"] == label]
        ax.plot([r["tokens"] for r in taken], [r[key] for r in taken], "o", ms=11, mfc="none", color=colour)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the forward pass")
    ax.set_ylabel("seconds per layer call (all queries)")
    c = rows[0]["candidates"]
    ax.set_title(f"exact stage of the two-stage choice, {c} candidates (circled: the path taken)", fontsize=9)
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, help="PNG of seconds against length for both paths")
    ap.add_argument("--replot", type=Path, help="plot this earlier --out JSON instead of timing (needs --plot)")
    args = ap.parse_args(argv)
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot PATH")
        result = json.loads(args.replot.read_text())
        plot(result, args.plot)
        return result
    torch.set_num_threads(args.threads)
    hq, hkv, d, m, n, c = 9, 3, 64, 64, 128, args.candidates
    rows = []
    print("| tokens | far blocks | C | over the union (s) | by block (s) | union / by block | path taken |")
    print("|---|---|---|---|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        torch.manual_seed(0)
        qs, ks = torch.randn(1, hq, length, d), torch.randn(1, hkv, length, d)
        key_ok = retrieve.retrievable_keys(torch.ones(1, length, dtype=torch.bool), sinks=4)
        index = candidates(qs, ks, key_ok, c, m, n)
        nb = -(-length // m)
        k_pad, ok_pad = F.pad(ks, (0, 0, 0, nb * m - length)), F.pad(key_ok, (0, nb * m - length))
        union = retrieve.exact_scores_over_union(qs, k_pad, ok_pad, index, m)
        by_block = retrieve.exact_scores_by_block(qs, k_pad, ok_pad, index, m)
        finite = torch.isfinite(union)
        assert torch.equal(finite, torch.isfinite(by_block)), "the two paths disagree on which blocks have keys"
        diff = float((union[finite] - by_block[finite]).abs().max())
        t_union = timed(lambda: retrieve.exact_scores_over_union(qs, k_pad, ok_pad, index, m), args.repeats)
        t_block = timed(lambda: retrieve.exact_scores_by_block(qs, k_pad, ok_pad, index, m), args.repeats)
        path = "over the union" if nb <= retrieve.UNION_MAX_RATIO * c else "by block"
        row = {"tokens": length, "far_blocks": nb, "candidates": c, "union_s": t_union, "by_block_s": t_block,
               "ratio": t_union / t_block, "path": path, "max_abs_diff": diff}  # fmt: skip
        rows.append(row)
        times = f"{t_union:.3f} | {t_block:.3f} | {t_union / t_block:.2f}x"
        print(f"| {length} | {nb} | {c} | {times} | {path} |", flush=True)
    meta = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    meta["shape"] = {"query_heads": hq, "key_heads": hkv, "head_dim": d, "retrieve_block": m, "block": n}
    result = {"meta": meta, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
