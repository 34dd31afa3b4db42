"""Recall beyond the exact window, several runs side by side, with 95% intervals: one bar chart.

Each input is a recall JSON written by ``benchmarks/quality_study.py`` (``--recall-one``, or the
study's ``<out>/recall/``) or by ``benchmarks/retrieve_frame_probe.py``. The interval is Wilson's
score interval for a binomial share: with about 126 records per run, differences of a few points
are noise, and the chart shows which are not.

    python benchmarks/recall_bars.py "absolute=runs/r4/recall/win-r4.json" \\
        "axis, stacked=runs/r4/recall/win-r4-axis.json" --title "zero-shot" --out docs/img/recall_frames.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% score interval ``(low, high)`` of a share ``hits / n`` (``n > 0``)."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def counted_rows(path: Path, at_least: int = 0) -> list[dict]:
    """The records of one recall JSON beyond its window (and farther than ``at_least`` tokens)."""
    raw = json.loads(path.read_text())
    return [r for r in raw["rows"] if r["distance"] > max(raw["window"], at_least)]


def beyond(path: Path, at_least: int = 0) -> tuple[int, int]:
    """``(hits, n)`` of the records beyond the window in one recall JSON.

    at_least: count only records farther than this many tokens too, so that runs with different
    exact windows (blocks of 64 against 128) are compared on the same records.
    """
    rows = counted_rows(path, at_least)
    return sum(bool(r["correct"]) for r in rows), len(rows)


def split_run(item: str) -> tuple[str, str]:
    """``"LABEL=path"`` -> ``(label, path)``. Labels and paths may both hold ``=`` (``rope=axis``):
    the split is at the first ``=`` whose right side is an existing file."""
    cuts = [i for i, ch in enumerate(item) if ch == "=" and i > 0]
    for i in cuts:
        if Path(item[i + 1 :]).is_file():
            return item[:i], item[i + 1 :]
    if not cuts:
        raise SystemExit(f"expected LABEL=path/to/recall.json, got {item!r}")
    raise SystemExit(f"{item!r}: no recall JSON found after any '=' (expected LABEL=path/to/recall.json)")


def mcnemar(first: list[dict], other: list[dict]) -> tuple[int, int, float]:
    """Paired comparison of two runs on the same records: ``(only_first, only_other, p)``.

    Records pair by order (the recall test draws the same records for the same seed and length);
    ``p`` is the exact two-sided McNemar p-value, the binomial test of the discordant pairs.
    """
    if [r["distance"] for r in first] != [r["distance"] for r in other]:
        raise ValueError("runs were not scored on the same records (their distances differ)")
    only_first = sum(bool(a["correct"]) and not b["correct"] for a, b in zip(first, other))
    only_other = sum(bool(b["correct"]) and not a["correct"] for a, b in zip(first, other))
    discordant = only_first + only_other
    tail = sum(math.comb(discordant, i) for i in range(min(only_first, only_other) + 1)) / 2**discordant
    return only_first, only_other, min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/recall.json, in plot order (top first)")
    ap.add_argument("--title", default="")
    ap.add_argument(
        "--beyond", type=int, default=0, help="count only records farther than this many tokens (and the window)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows, paths = [], []
    for item in args.runs:
        label, path = split_run(item)
        hits, n = beyond(Path(path), args.beyond)
        if n == 0:
            raise SystemExit(f"{path}: no record beyond the window")
        rows.append((label, hits, n, *wilson(hits, n)))
        paths.append(Path(path))
    where = "beyond the window" + (f" and {args.beyond} tokens" if args.beyond else "")
    print(f"| run | recalled {where} | 95% interval |\n|---|---|---|")
    for label, hits, n, lo, hi in rows:
        print(f"| {label} | {hits / n:.1%} ({hits} / {n}) | {lo:.0%}-{hi:.0%} |")
    if len(paths) > 1:
        first = counted_rows(paths[0], args.beyond)
        print(f"\n| against {rows[0][0]} | only the first | only this one | exact McNemar p |\n|---|---|---|---|")
        for (label, *_), path in zip(rows[1:], paths[1:]):
            try:
                only_first, only_other, p = mcnemar(first, counted_rows(path, args.beyond))
            except ValueError:
                print(f"| {label} | - | - | not the same records (try --beyond) |")
                continue
            print(f"| {label} | {only_first} | {only_other} | {p:.2g} |")
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    shares = [h / n for _, h, n, _, _ in rows]
    errors = [[s - lo for s, (*_, lo, _) in zip(shares, rows)], [hi - s for s, (*_, hi) in zip(shares, rows)]]
    ax.barh(y, shares, xerr=errors, capsize=3, color="#4c72b0")
    ax.set_yticks(y, [r[0] for r in rows])
    ax.set_xlabel(f"records recalled exactly {where} (bars: 95% interval)")
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.set_xlim(0, max(0.2, max(hi for *_, hi in rows) * 1.1))
    if args.title:
        ax.set_title(args.title, fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
