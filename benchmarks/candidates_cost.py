"""What the two-stage far-block choice costs as its candidates grow: the torch backend's attention call
with ``retrieve_candidates`` = C for several C, and with ``retrieve_candidate_share`` = s (candidates a
share of each query's far blocks, at least the shipped 32) for several s, and with the shipped 32 proposed by
the bound over sub-blocks of g slots (``retrieve_score_block`` = g, round 35) for several g, side by side,
beside SDPA.

    python benchmarks/candidates_cost.py --lengths 8k,16k,32k --candidates 0,32,64,128 --shares 0.25 \
        --score-blocks 16 --repeats 2 --threads 2 --out docs/bench/candidates_cost.json \
        --plot docs/bench/candidates_cost.png

Round 22 found the 2k-trained default model's needles lost at 32k with 32 candidates (the bound
proposes 32 of 512 far blocks) and found with 128: this says what the larger choice costs. C = 0 is
the bound alone. Shapes: one layer of SmolLM2-135M (9 query heads, 3 key heads, head dim 64),
batch 1, float32, the shipped settings otherwise (4 sinks, a window of 2 x 128, 8 far blocks of 64);
random q, k, v. Each cell is the median of ``--repeats`` calls, the settings interleaved within each
repeat so that a noisy machine hits them alike. On a CPU only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from read_paths import HKV, HQ, OPTS, D, timed  # noqa: E402

from ctxext.attention.torch_backend import torch_tensorized_attention  # noqa: E402
from ctxext.bench.runner import parse_lengths  # noqa: E402


def settings(candidates: list[int], shares: list[float], score_blocks: list[int] = ()) -> dict[str, tuple[str, object]]:
    """Column key -> (label, options): each fixed count C, then each share s over the shipped count, then the
    shipped count proposed by the bound over sub-blocks of g slots."""
    out = {f"c{c}": (f"C = {c}", dataclasses.replace(OPTS, retrieve_candidates=c)) for c in candidates}
    for share in shares:
        out[f"s{share:g}"] = (f"s = {share:g}", dataclasses.replace(OPTS, retrieve_candidate_share=share))
    for grain in score_blocks:
        out[f"g{grain}"] = (f"g = {grain}", dataclasses.replace(OPTS, retrieve_score_block=grain))
    return out


def measure(
    length: int, candidates: list[int], repeats: int, shares: list[float] = (), score_blocks: list[int] = ()
) -> dict:
    """One row: seconds (medians) of SDPA and of the attention call at each candidate count and share."""
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, h, length, D, generator=gen) for h in (HQ, HKV, HKV))  # (1, H, N, D)
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)}
    for key, (_, opts) in settings(candidates, shares, score_blocks).items():
        calls[key] = lambda opts=opts: torch_tensorized_attention(q, k, v, opts)
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(repeats):
            for name, call in calls.items():
                times[name].append(timed(call))
    row = {"n": length, "far_blocks": -(-length // OPTS.retrieval_block)}
    row.update({f"{name}_s": statistics.median(t) for name, t in times.items()})
    return row


def table(rows: list[dict], candidates: list[int], shares: list[float] = (), score_blocks: list[int] = ()) -> str:
    """Seconds per setting, then each setting's time over the shipped count's (or the first count's)."""
    columns = settings(candidates, shares, score_blocks)
    base = f"c{OPTS.retrieve_candidates}" if OPTS.retrieve_candidates in candidates else f"c{candidates[0]}"
    others = [key for key in columns if key != base]
    head = ["N", "far blocks", "SDPA s", *(f"{label} s" for label, _ in columns.values())]
    head += [f"{columns[key][0]} / {columns[base][0]}" for key in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [f"{r['n']:,}", str(r["far_blocks"]), f"{r['sdpa_s']:.3f}"]
        cells += [f"{r[f'{key}_s']:.3f}" for key in columns]
        cells += [f"{r[f'{key}_s'] / r[f'{base}_s']:.2f}x" for key in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    rows: list[dict], candidates: list[int], path: Path, shares: list[float] = (), score_blocks: list[int] = ()
) -> None:
    """Seconds against length, one line per candidate count or share and one for SDPA (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = [r["n"] for r in rows]
    lines = [
        ("sdpa", "SDPA (full attention)"),
        *((key, label) for key, (label, _) in settings(candidates, shares, score_blocks).items()),
    ]
    for name, label in lines:
        ax.plot(lengths, [r[f"{name}_s"] for r in rows], marker="o", label=label)
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="seconds per attention call (one layer)")
    ax.minorticks_off()
    ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
    ax.set_title("two-stage far-block choice: candidates against time (CPU)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="8k,16k,32k")
    ap.add_argument("--candidates", default="0,32,64,128", help="comma-separated retrieve_candidates (0: the bound)")
    ap.add_argument(
        "--shares", default="", help="comma-separated retrieve_candidate_share, each over the shipped count (e.g. 0.25)"
    )
    ap.add_argument(
        "--score-blocks",
        default="",
        help="comma-separated retrieve_score_block g: the shipped candidates proposed by the bound over sub-blocks "
        "of g slots (a divisor of the far block's 64, below it)",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=None, help="JSON of the rows")
    ap.add_argument("--plot", type=Path, default=None, help="PNG: seconds against length")
    args = ap.parse_args(argv)
    candidates = [int(c) for c in args.candidates.split(",")]
    bad = [c for c in candidates if c != 0 and c < OPTS.retrieve]
    if bad:
        ap.error(f"--candidates: {bad} below retrieve = {OPTS.retrieve} (use 0 for the bound alone)")
    shares = [float(x) for x in args.shares.split(",") if x.strip()]
    if any(not 0 < x <= 1 for x in shares):
        ap.error(f"--shares: {shares}: each a share of the far blocks in (0, 1], e.g. 0.25")
    score_blocks = [int(g) for g in args.score_blocks.split(",") if g.strip()]
    m = OPTS.retrieval_block
    if any(not 0 < g < m or m % g for g in score_blocks):
        ap.error(f"--score-blocks: {score_blocks}: each a divisor of the far block's {m} slots below it, e.g. 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for length in parse_lengths(args.lengths):
        rows.append(measure(length, candidates, args.repeats, shares, score_blocks))
        print(table(rows[-1:], candidates, shares, score_blocks).splitlines()[-1], flush=True)
    print(table(rows, candidates, shares, score_blocks))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python benchmarks/candidates_cost.py " + " ".join(argv), "torch": torch.__version__}
        rows_out = {"threads": torch.get_num_threads(), "candidates": candidates, "shares": shares}
        rows_out.update(score_blocks=score_blocks, rows=rows)
        args.out.write_text(json.dumps({**meta, **rows_out}, indent=2) + "\n")
    if args.plot:
        plot(rows, candidates, args.plot, shares, score_blocks)
    return rows


if __name__ == "__main__":
    main()
