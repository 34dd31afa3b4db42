"""Retrieval grids of several `ctxext eval` runs in one figure and one table.

`ctxext eval` writes one heatmap per (task, model) and one report per run. A study often splits
its lengths over runs (a baseline only inside its native context, the long lengths alone); this
merges the ``report.json`` files: for every task and model label, the cells of every run, lengths
in order (a later run's cell replaces an earlier one's). The figure has one row per task and one
column per model; the table (``--table``, Markdown) gives the passed cells per task, model and
length.

    python benchmarks/retrieval_grid.py runs/r11/eval-grid-2k-8k runs/r11/eval-needle-16k \\
        --rename "smollm2->SmolLM2 (full attention)" --out docs/study/round11/retrieval_grid.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

Cells = dict[str, dict[str, Any]]  # {length: {depth: share in 0..1 or "oom"}}


def merge_reports(reports: list[dict], rename: dict[str, str] | None = None) -> dict[str, dict[str, Cells]]:
    """``{task: {label: cells}}`` over the runs, lengths sorted numerically, depths in run order
    (None where a run did not cover a depth); ``rename`` maps report labels to shown ones."""
    merged: dict[str, dict[str, Cells]] = {}
    for report in reports:
        for task, by_label in report.get("tasks", {}).items():
            for label, cells in by_label.items():
                shown = (rename or {}).get(label, label)
                merged.setdefault(task, {}).setdefault(shown, {}).update(cells)
    for by_label in merged.values():
        for label, cells in by_label.items():
            depths = list(dict.fromkeys(d for row in cells.values() for d in row))
            by_label[label] = {n: {d: cells[n].get(d) for d in depths} for n in sorted(cells, key=int)}
    return merged


def markdown_table(merged: dict[str, dict[str, Cells]]) -> str:
    """Cells passed (share 1) over cells run, per task, model and length."""
    lengths = sorted({n for by_label in merged.values() for cells in by_label.values() for n in cells}, key=int)
    lines = ["| task | model | " + " | ".join(f"{int(n):,}" for n in lengths) + " |"]
    lines.append("|---|---|" + "---|" * len(lengths))
    for task, by_label in merged.items():
        for label, cells in by_label.items():
            row = []
            for n in lengths:
                values = [v for v in cells.get(n, {}).values() if v not in ("oom", None)]
                row.append(f"{sum(values):g} / {len(values)}" if values else "-")
            lines.append(f"| {task} | {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(merged: dict[str, dict[str, Cells]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctxext.evaluate.report import draw_heatmap

    tasks = list(merged)
    labels = list(dict.fromkeys(label for by_label in merged.values() for label in by_label))
    widest = max(len(c) for by_label in merged.values() for c in by_label.values())
    deepest = max(len(next(iter(c.values()))) for by_label in merged.values() for c in by_label.values())
    fig, axes = plt.subplots(
        len(tasks),
        len(labels),
        figsize=(0.5 + (1.6 + 0.9 * widest) * len(labels), (1.4 + 0.45 * deepest) * len(tasks)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for i, task in enumerate(tasks):
        for j, label in enumerate(labels):
            ax = axes[i][j]
            if label in merged[task]:
                image = draw_heatmap(ax, task, label, merged[task][label])
            else:
                ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy (%)", shrink=0.6)
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="`ctxext eval --out` directories (or report.json files)")
    ap.add_argument("--out", type=Path, required=True, help="PNG of the merged grids")
    ap.add_argument("--table", type=Path, help="Markdown table of the merged grids")
    ap.add_argument("--title", default="")
    ap.add_argument(
        "--rename", action="append", default=[], help="'LABEL->SHOWN': show a model label as SHOWN (may hold '=')"
    )
    args = ap.parse_args()
    reports = []
    for run in args.runs:
        path = run / "report.json" if run.is_dir() else run
        if not path.is_file():
            ap.error(f"{run}: no report.json (give a `ctxext eval --out` directory or its report.json)")
        reports.append(json.loads(path.read_text()))
    rename = {}
    for item in args.rename:
        if "->" not in item:
            ap.error(f"--rename {item!r}: expected 'LABEL->SHOWN'")
        label, shown = item.split("->", 1)
        rename[label] = shown
    merged = merge_reports(reports, rename)
    if not merged:
        ap.error("no retrieval task in these reports (run ctxext eval with --tasks passkey,needle,...)")
    plot(merged, args.out, args.title)
    table = markdown_table(merged)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table)
    print(table, end="")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
