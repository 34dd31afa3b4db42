"""One plot of perplexity against length across quality-study rounds (their ``study.json`` files).

    python benchmarks/study_compare.py docs/study/study.json docs/study/round3/study.json \
        --models "full;base;base+yarn4;window;window, rope=axis at eval;retrieve;retrieve, rope=axis at eval" \
        --extra "retrieve, rope=axis at eval=runs/study/eval/retrieve-axis-ppl32k/report.json" \
        --out docs/img/study_rounds_ppl.png

``--extra LABEL=REPORT`` adds the points of a ``ctxext eval`` report (lengths evaluated by hand,
such as 32k) to a model's curve. Lengths past the base model's native context are shaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def report_points(path: Path) -> dict[int, float]:
    """``{length: perplexity}`` of the model under test in a ``ctxext eval`` report.json."""
    raw = json.loads(path.read_text())
    label = raw["models"][0]["label"]
    return {int(n): float(cell["ppl"]) for n, cell in raw["perplexity"][label].items() if cell.get("ppl") is not None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="*", type=Path, help="study.json files (none: --extra reports only)")
    ap.add_argument("--models", required=True, help="labels separated by ;, in legend order")
    ap.add_argument("--extra", action="append", default=[], help="LABEL=path/to/report.json")
    ap.add_argument("--native", type=int, default=8192)
    ap.add_argument("--title", default="SmolLM2-135M, fine-tuned at 2,048 tokens (60 LoRA steps)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not args.studies and not args.extra:
        ap.error("give study.json files, --extra LABEL=REPORT, or both")

    curves: dict[str, dict[int, float]] = {}
    for path in args.studies:
        for label, points in json.loads(path.read_text())["ppl"].items():
            curves.setdefault(label, {}).update({int(n): float(p) for n, p in points.items() if p is not None})
    for item in args.extra:
        label, _, report = item.rpartition("=")  # labels may hold "=" (rope=axis)
        curves.setdefault(label, {}).update(report_points(Path(report)))
    wanted = [m.strip() for m in args.models.split(";") if m.strip()]
    missing = [m for m in wanted if m not in curves]
    if missing:
        raise SystemExit(f"no perplexity for {missing}; known: {sorted(curves)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label in wanted:
        xs = sorted(curves[label])
        style = "--" if "rope=axis" in label else "-"
        ax.plot(xs, [curves[label][x] for x in xs], style, marker="o", label=label)
    right = max(max(c) for c in (curves[m] for m in wanted))
    ax.axvspan(args.native, right * 1.2, color="0.9", zorder=0, label=f"past the native {args.native:,}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens")
    ax.set_ylabel("perplexity (held-out text)")
    ax.set_title(args.title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
