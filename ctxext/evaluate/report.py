"""The evaluation report: ``report.md`` (one table per task, every model a row) and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _fmt_ppl(cell: dict[str, Any]) -> str:
    if cell.get("not_run"):
        return "not run"
    if cell.get("oom"):
        return "OOM"
    if not cell.get("docs"):
        return "n/a"
    return f"{cell['ppl']:.2f}"


def _mean_accuracy(row: dict[str, Any]) -> str:
    measured = [v for v in row.values() if v is not None]  # None: not run (an interrupted evaluation)
    if not measured:
        return "not run"
    values = [v for v in measured if v != "oom"]
    if len(values) < len(measured):
        return "OOM" if not values else f"{100 * sum(values) / len(values):.0f}% (some OOM)"
    mean = f"{100 * sum(values) / len(values):.0f}%"
    return mean if len(measured) == len(row) else f"{mean} ({len(measured)} of {len(row)} depths)"


def _depth_cell(value) -> str:
    return "not run" if value is None else "OOM" if value == "oom" else f"{100 * value:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    proto = report["protocol"]
    lengths = [str(n) for n in proto["lengths"]]
    lines = ["# ctxext evaluation", ""]
    if proto.get("stopped"):
        lines += [f"**Partial report:** {proto['stopped']}.", ""]
    lines.append("| model | source | attention | notes |")
    lines.append("|---|---|---|---|")
    for m in report["models"]:
        ta = m.get("tensorized_attention")
        attn = m.get("attn_implementation", "?")
        if attn == "tensorized" and ta:
            attn += " " + ", ".join(f"{k}={v}" for k, v in ta.items() if k != "backend")
        lines.append(f"| {m['label']} | `{m['source']}` | {attn} | {m['description']} |")
    for m in report["models"]:
        lines += [f"\n**Note on {m['label']}:** {note}" for note in m.get("advice", [])]
    if report["perplexity"]:
        p = proto["perplexity"]
        lines += ["", "## Perplexity against length", ""]
        lines.append(
            f"Data: `{p['data']}`, up to {p['documents_per_length']} documents per length; {p['scoring']}. "
            "Lower is better; n/a: no document that long."
        )
        lines += ["", "| model | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
        for label, rows in report["perplexity"].items():
            lines.append(f"| {label} | " + " | ".join(_fmt_ppl(rows[n]) for n in lengths) + " |")
        docs = report["perplexity"][next(iter(report["perplexity"]))]
        lines.append("")
        lines.append(
            "Documents scored per length: "
            + ", ".join(
                f"{n}: {docs[n].get('docs', 0)} (skipped {docs[n].get('skipped_short', 0)} short)" for n in lengths
            )
        )
    r = proto["retrieval"]
    for task, grid in report["tasks"].items():
        lines += ["", f"## {task}: accuracy against length (mean over depths)", ""]
        lines.append(
            f"Depths {r['depths']}, {r['trials_per_cell']} trials per cell, seeds {r['seeds']}; {r['scoring']}."
        )
        lines += ["", "| model | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
        for label, rows in grid.items():
            lines.append(f"| {label} | " + " | ".join(_mean_accuracy(rows[n]) for n in lengths) + " |")
        for label, rows in grid.items():
            depths = list(next(iter(rows.values())).keys())
            lines += ["", f"{task}, {label}: accuracy by depth (rows) and length (columns)", ""]
            lines += ["| depth | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
            for d in depths:
                cells = [rows[n][d] for n in lengths]
                lines.append(f"| {d} | " + " | ".join(_depth_cell(c) for c in cells) + " |")
        lines += _misses_table(task, report.get("misses", {}).get(task, {}), r.get("scoring_mode", "teacher"))
    lines += ["", f"Device: {proto['device']} ({proto['dtype']}), torch {proto['torch']}.", ""]
    return "\n".join(lines)


MISSES_SHOWN = 12


def _misses_table(task: str, misses: dict[str, list[dict[str, Any]]], mode: str) -> list[str]:
    """What each model answered where it was wrong (the first ``MISSES_SHOWN`` per model); mode: the scoring."""
    lines = []
    how = "greedy continuation" if mode == "generate" else "argmax at each answer position, teacher-forced"
    for label, rows in misses.items():
        if not rows:
            continue
        lines += ["", f"{task}, {label}: wrong answers ({how}; {len(rows)} in all)", ""]
        lines += ["| length | depth | trial | answer | predicted |", "|---|---|---|---|---|"]
        for m in rows[:MISSES_SHOWN]:
            said = m["predicted"].replace("|", "\\|").replace("\n", "\\n")
            lines.append(f"| {m['length']} | {m['depth']:g} | {m['trial']} | `{m['answer']}` | `{said}` |")
        if len(rows) > MISSES_SHOWN:
            lines.append(f"| ... | | | | {len(rows) - MISSES_SHOWN} more in report.json |")
    return lines


def plot_perplexity(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in report["perplexity"].items():
        xs, ys = [], []
        for n, cell in rows.items():
            if cell.get("docs") and not cell.get("oom") and cell.get("ppl") and math.isfinite(cell["ppl"]):
                xs.append(int(n))
                ys.append(cell["ppl"])
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({int(n) for rows in report["perplexity"].values() for n in rows})
    ax.set_xticks(ticks, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity against length")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(
            0.5, 0.5, "no perplexity measured (OOM or no long-enough documents)", ha="center", transform=ax.transAxes
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_heatmap(ax, task: str, label: str, rows: dict[str, dict[str, Any]]):
    """Accuracy (%) by depth (rows) and length (columns) on ``ax``; returns the image.

    rows: ``{length: {depth: share in 0..1, "oom", or None (not run)}}`` as in
    ``report["tasks"][task][label]``."""
    import numpy as np

    lengths = list(rows)
    depths = list(next(iter(rows.values())))
    grid = np.array(
        [[np.nan if rows[n][d] in ("oom", None) else 100 * rows[n][d] for n in lengths] for d in depths],
        dtype=float,
    )
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(depths)), depths)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            value = rows[lengths[j]][depths[i]]
            text = "OOM" if value == "oom" else "-" if value is None else f"{grid[i, j]:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_title(f"{task}: {label}")
    return image


def plot_heatmap(task: str, label: str, rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_lengths, n_depths = len(rows), len(next(iter(rows.values())))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n_lengths, 1.2 + 0.5 * n_depths))
    image = draw_heatmap(ax, task, label, rows)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write report.md and the plots into ``out``; return the written paths."""
    written = [out / "report.md"]
    (out / "report.md").write_text(markdown(report))
    if report["perplexity"]:
        plot_perplexity(report, out / "ppl_vs_length.png")
        written.append(out / "ppl_vs_length.png")
    for task, grid in report["tasks"].items():
        for label, rows in grid.items():
            path = out / f"{task}_{safe_name(label)}.png"
            plot_heatmap(task, label, rows, path)
            written.append(path)
    return written
