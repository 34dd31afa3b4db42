"""The benchmark's outputs: ``bench.md`` (markdown tables), ``bench.json`` (every cell) and
``bench.png`` (time against length, log-log, one line per method; speedup against SDPA).

Cells are grouped by (section, mode), in the order they were measured; any section a
future engineer registers (``decode``) is reported by the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "bench.json", "bench.md", "bench.png"
TITLES = {
    ("attention", "fwd"): "Attention alone, forward",
    ("attention", "fwdbwd"): "Attention alone, forward + backward",
    ("model", "prefill"): "Whole model, prefill (forward, no cache)",
    ("model", "train"): "Whole model, one training step (forward + backward)",
    ("model", "train+ckpt"): "Whole model, one training step with gradient checkpointing",
}


def groups(cells: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        out.setdefault((c["section"], c["mode"]), []).append(c)
    return out


def _num(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def _seconds(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if x < 10 else f"{x:.1f}"


def markdown_table(cells: list[dict[str, Any]]) -> str:
    """One table: a row per (N, method); columns only where some cell has the value."""
    has = {key: any(c.get(key) is not None for c in cells) for key in ("tokens_per_s", "x_floor", "peak_mib")}
    cols = ["N", "method", "time s", "vs SDPA"]
    cols += ["tokens/s"] if has["tokens_per_s"] else []
    cols += ["peak MiB", "mem vs SDPA"] if has["peak_mib"] else []
    cols += ["x floor"] if has["x_floor"] else []
    cols += ["error"] if any(c.get("error") for c in cells) else []
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if c not in ("method", "error") else "---" for c in cols) + "|",
    ]
    for c in sorted(cells, key=lambda c: c["n"]):
        row = [str(c["n"]), c["method"], _seconds(c.get("median_s")), _num(c.get("speedup_vs_sdpa"), ".2f", "x")]
        row += [_num(c.get("tokens_per_s"), ",.0f")] if has["tokens_per_s"] else []
        row += [_num(c.get("peak_mib"), ".1f"), _num(c.get("memory_vs_sdpa"), ".2f", "x")] if has["peak_mib"] else []
        row += [_num(c.get("x_floor"), ".1f", "x")] if has["x_floor"] else []
        if "error" in cols:
            row.append((c.get("error") or "").replace("|", "/"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    where = env.get("gpu") or f"{env['cpu_count']} CPUs, {env['torch_threads']} torch threads"
    lines = [
        f"# ctxext bench: {result['model']}",
        "",
        f"Command: `{result['command']}`" if result.get("command") else "",
        f"{env['date']}; {env['device']} ({where}); torch {env['torch']}, transformers {env['transformers']}; "
        f"{result['dtype']}, batch {result['batch']}; total {result['wall_s']:.0f} s.",
        "",
        "Tensorized settings: " + ", ".join(f"{k}={v}" for k, v in result["tensorized_options"].items()) + ".",
        f"Time: {result['timing']}. vs SDPA = SDPA time / this time (> 1: faster than SDPA), measured in this run.",
        result["memory_method"],
    ]
    if result.get("score_budget_scale", 1) != 1:
        lines.append(f"Score chunks {result['score_budget_scale']}x the default (`--score-budget-scale`).")
    if not result.get("fused_choice", True):
        lines.append("Far-block choice of the Triton backend in PyTorch chunks (`--no-fused-choice`).")
    att = result["info"].get("attention")
    if att:
        s, bw = att["shapes"], att["bandwidth"]
        lines.append(
            f"Attention shapes: B={s['batch']}, Hq={s['q_heads']}, Hkv={s['kv_heads']}, D={s['head_dim']}. "
            f"x floor = time / (least bytes moved / copy bandwidth {bw['gib_per_s']:.1f} GiB/s); "
            "formula in ctxext/bench/bandwidth.py."
        )
    mod = result["info"].get("model")
    if mod and mod.get("architecture"):
        lines.append(
            f"Model: {mod['architecture']}, {mod['layers']} of {mod['layers_in_config']} layers, "
            f"{mod['parameters']:,} parameters ({mod['weights_gib']:.2f} GiB), random weights."
        )
    lines += [f"Note: {n}" for n in result["notes"]]
    noise = [c["foreign_cpu_frac"] for c in result["cells"] if c.get("foreign_cpu_frac") is not None]
    if noise:
        lines.append(
            f"Noise: other processes used on average {sum(noise) / len(noise):.0%} of the machine's CPU during the "
            f"timed calls (worst {max(noise):.0%}; per cell: foreign_cpu_frac in the JSON)."
        )
    for (section, mode), cells in groups(result["cells"]).items():
        lines += ["", f"## {TITLES.get((section, mode), f'{section}, {mode}')}", "", markdown_table(cells)]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Top row: median time against N (log-log), one line per method; bottom row: speedup vs SDPA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(result["cells"])
    cols = max(1, len(grouped))
    fig, axes = plt.subplots(2, cols, figsize=(4.6 * cols, 8), squeeze=False)
    methods = result["methods"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lengths = result["lengths"]
    for col, ((section, mode), cells) in enumerate(grouped.items()):
        ax_t, ax_s = axes[0][col], axes[1][col]
        for i, method in enumerate(methods):
            ok = sorted((c for c in cells if c["method"] == method and c.get("median_s")), key=lambda c: c["n"])
            if not ok:
                continue
            color = colors[i % len(colors)]
            ax_t.plot([c["n"] for c in ok], [c["median_s"] for c in ok], "-o", color=color, label=method)
            if method != "sdpa":
                pts = [c for c in ok if c.get("speedup_vs_sdpa")]
                ax_s.plot([c["n"] for c in pts], [c["speedup_vs_sdpa"] for c in pts], "-o", color=color, label=method)
        failed = [m for m in methods if not any(c["method"] == m and c.get("median_s") for c in cells)]
        if failed:
            ax_t.text(0.02, 0.02, "no result: " + ", ".join(failed), transform=ax_t.transAxes, fontsize=7, color="red")
        ax_s.axhline(1.0, color="gray", lw=1, ls=":")
        ax_t.set_title(TITLES.get((section, mode), f"{section} {mode}"), fontsize=9)
        ax_t.set_ylabel("seconds (median)")
        ax_s.set_ylabel("speedup vs SDPA (SDPA time / time)")
        for ax in (ax_t, ax_s):
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths)
            ax.set_xticklabels([f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths], fontsize=8)
            ax.set_xlabel("sequence length N")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        ax_t.set_yscale("log")
        speedups = [c["speedup_vs_sdpa"] for c in cells if c.get("speedup_vs_sdpa")]
        if speedups and max(speedups) / max(min(speedups), 1e-12) > 10 and min(speedups) > 0:
            ax_s.set_yscale("log")
    env = result["environment"]
    fig.suptitle(
        f"ctxext bench: {result['model']} on {env.get('gpu') or env['device']}, {result['dtype']}, "
        f"batch {result['batch']} (torch {env['torch']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out`` (created; same names replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME, "plot": out / PLOT_NAME}
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown(result) + "\n")
    plot(result, paths["plot"])
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    return paths
