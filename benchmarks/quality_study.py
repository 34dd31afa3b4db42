"""The quality study of issue 8 in one command: fine-tune every recipe of ``recipes/study/``,
evaluate each result and the base model, and write one report with tables and plots.

    python benchmarks/quality_study.py                     # train what is missing, evaluate, report
    python benchmarks/quality_study.py --stage report      # rebuild the report from finished runs
    python benchmarks/quality_study.py --only window,learned --jobs 2

Every stage skips work whose output already exists (delete a run's directory to redo it), so
an interrupted study resumes where it stopped. Per model:

* **perplexity** against length on held-out text: Python standard-library *packages*
  (``email``, ``tkinter``, ``pydoc_data``, ...). Training reads only the top-level modules
  (``data.source: stdlib``), so none of these files was trained on.
* **passkey** (``ctxext eval``'s wording, never seen in training) at lengths T..8T and
  depths 0.1 / 0.5 / 0.9, teacher-forced argmax. At T = 2048 with an exact window of 256
  tokens, depths 0.1 and 0.5 lie beyond the window at every length: a window-only model
  cannot retrieve them except through 30 layers of window hops.
* **recall** of held-out retrieval blocks (the training data's format, new records, held-out
  text): the share of recalled codes predicted exactly, split by the distance from the
  statement (within the exact window or beyond it). This isolates whether the long-range
  path carries information on the trained task from whether the skill transfers to passkey.

Outputs: ``<out>/eval/<model>-{ppl,passkey}/`` (``ctxext eval`` reports), ``<out>/recall/``,
and ``docs/study/report.md`` with ``ppl_vs_length.png``, ``passkey.png``, ``recall.png`` and
``train_loss.png`` (or ``--report-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_PACKAGES = ("pydoc_data", "tkinter", "email", "unittest", "idlelib", "urllib", "logging", "http", "xml")
# Trained models evaluated with other settings (``ctxext eval --set``): label -> (recipe,
# overrides, tasks). rope=axis at evaluation moves sinks (and far entries) to bounded RoPE
# offsets; with absolute RoPE a query at 16k sees the sinks 16k positions away.
EVAL_VARIANTS = {
    "window, rope=axis at eval": ("window", ["--set", "rope=axis"], ("ppl",)),
    "learned, rope=axis at eval": ("learned", ["--set", "rope=axis"], ("ppl",)),
    "retrieve, rope=axis at eval": ("retrieve", ["--set", "rope=axis"], ("ppl", "passkey", "recall")),
    "retrieve, ordered axis frame at eval": (
        "retrieve",
        ["--set", "rope=axis", "--set", "retrieve_frame=ordered"],
        ("recall",),
    ),
}


def held_out_data() -> str:
    """Comma-separated standard-library package directories (never in the training data)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return ",".join(str(root / p) for p in HELD_OUT_PACKAGES if (root / p).is_dir())


def load_recipes(folder: Path, only: set[str] | None) -> dict[str, dict]:
    import yaml

    out = {}
    for path in sorted(folder.glob("*.yaml")):
        name = path.stem
        if only and name not in only:
            continue
        raw = yaml.safe_load(path.read_text())
        out[name] = {"path": path, "output_dir": ROOT / raw["train"]["output_dir"], "raw": raw}
    return out


def run(cmd: list[str], log: Path, threads: int) -> None:
    """Run a command with ``threads`` intra-op threads, its output to ``log``; raise on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_MININTERVAL": "30"}
    start = time.time()
    print(f"[study] {' '.join(cmd)}  (log: {log})", flush=True)
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code:
        raise SystemExit(f"[study] failed ({code}) after {time.time() - start:.0f} s: see {log}")
    print(f"[study] done in {time.time() - start:.0f} s: {' '.join(cmd[:4])}", flush=True)


def train_jobs(recipes: dict[str, dict], out: Path) -> list[tuple[list[str], Path]]:
    """Fine-tune commands for the recipes not trained yet (``--merge``: a later stage may start from it)."""
    jobs = []
    for name, r in recipes.items():
        if (r["output_dir"] / "adapter" / "adapter_config.json").is_file():
            continue
        jobs.append(
            (
                [sys.executable, "-m", "ctxext", "finetune", "--recipe", str(r["path"]), "--merge"],
                out / "logs" / f"train-{name}.log",
            )
        )
    return jobs


def training_waves(recipes: dict[str, dict]) -> list[dict[str, dict]]:
    """Recipes in the order they can train: a recipe whose ``model.source`` lies in another
    recipe's output directory (a second stage) waits for it. Raises on a cycle."""
    left, done, waves = dict(recipes), set(), []
    while left:
        ready = {}
        for name, r in left.items():
            source = (ROOT / str(r["raw"]["model"].get("source", ""))).resolve()
            needs = {o for o, other in recipes.items() if o != name and other["output_dir"].resolve() in source.parents}
            if needs <= done:
                ready[name] = r
        if not ready:
            raise SystemExit(f"[study] recipes depend on each other in a cycle: {sorted(left)}")
        waves.append(ready)
        done |= set(ready)
        left = {k: v for k, v in left.items() if k not in ready}
    return waves


def models(recipes: dict[str, dict], with_baselines: bool) -> dict[str, tuple[str, list[str], bool]]:
    """label -> (source, extra eval arguments, full attention?)."""
    out = {
        name: (str(r["output_dir"] / "adapter"), [], r["raw"]["model"].get("attention", "tensorized") != "tensorized")
        for name, r in recipes.items()
    }
    for label, (recipe, extra, _) in EVAL_VARIANTS.items():
        if recipe in recipes:
            out[label] = (out[recipe][0], extra, out[recipe][2])
    if with_baselines:
        out["base"] = ("smollm2", [], True)
    return out


def eval_jobs(models_: dict, out: Path, args) -> list[tuple[list[str], Path]]:
    jobs = []
    data = held_out_data()
    for label, (source, extra, full) in models_.items():
        variant = label in EVAL_VARIANTS
        # full attention is quadratic: keep to the lengths it can afford here
        ppl_lengths = args.ppl_lengths_full if full else args.ppl_lengths
        passkey_lengths = args.passkey_lengths_full if full else args.passkey_lengths
        for task, lengths, more in (
            ("ppl", ppl_lengths, ["--data", data, "--docs", str(args.docs)]),
            ("passkey", passkey_lengths, ["--depths", args.depths, "--trials", str(args.trials)]),
        ):
            report = out / "eval" / f"{_slug(label)}-{task}"
            if (report / "report.json").is_file() or (variant and task not in EVAL_VARIANTS[label][2]):
                continue
            compare = ["--compare", "base+yarn4"] if label == "base" else []
            cmd = [sys.executable, "-m", "ctxext", "eval", source, "--out", str(report), "--tasks", task]
            cmd += ["--lengths", lengths, "--force", *more, *compare, *extra]
            jobs.append((cmd, out / "logs" / f"eval-{_slug(label)}-{task}.log"))
    return jobs


def exact_window(tensorized: dict | None, default: int) -> int:
    """Tokens of the exact local window of tensorized attention with these options: two inner blocks
    with ``local: window``, one with ``local: block`` (the default); ``default`` without block sizes."""
    ta = tensorized or {}
    if not ta.get("block_sizes"):
        return default
    block = int(ta["block_sizes"][-1])
    return 2 * block if ta.get("local", "block") == "window" else block


def recall_window(recipe: dict | None, default: int) -> int:
    """The exact window of a study recipe's model in tokens (:func:`exact_window`), else ``default``."""
    return exact_window(((recipe or {}).get("raw", {}).get("model") or {}).get("tensorized"), default)


def recall_jobs(models_: dict, out: Path, args, recipes: dict | None = None) -> list[tuple[list[str], Path]]:
    jobs = []
    for label, (source, extra, _) in models_.items():
        path = out / "recall" / f"{label}.json"
        variant = EVAL_VARIANTS.get(label)
        if path.is_file() or (variant and "recall" not in variant[2]):
            continue
        window = recall_window((recipes or {}).get(variant[0] if variant else label), args.recall_window)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--recall-one", source, "--recall-out", str(path)]
        cmd += ["--recall-blocks", str(args.recall_blocks), "--recall-length", str(args.recall_length)]
        cmd += ["--recall-records", str(args.recall_records), "--recall-window", str(window)]
        cmd += [x for flag, value in zip(extra[::2], extra[1::2]) if flag == "--set" for x in ("--recall-set", value)]
        jobs.append((cmd, out / "logs" / f"recall-{_slug(label)}.log"))
    return jobs


def _recall_settings(items: list[str]) -> dict | None:
    """``--recall-set KEY=VALUE`` items as tensorized settings (``ctxext eval --set``), None for none."""
    from ctxext.config import parse_settings

    return parse_settings(items) or None


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in label).strip("-")


def held_out_tokens(tok, need: int) -> list[int]:
    """The held-out text (:func:`held_out_data`) as token ids, at least ``need`` of them when it has that many."""
    from ctxext.data import iter_documents

    stream: list[int] = []
    for text in iter_documents(held_out_data()):
        stream += tok(text, add_special_tokens=False).input_ids
        if len(stream) >= need:
            break
    return stream


def recall_rows(
    model,
    tok,
    blocks: int,
    length: int,
    records: int = 16,
    stream: list[int] | None = None,
    with_positions: bool = False,
) -> list[dict]:
    """Teacher-forced recall of held-out retrieval blocks: one row per recalled code.

    Each row is ``{"distance": tokens from statement to answer, "correct": bool}``; the blocks are
    ``blocks`` windows of ``length`` tokens of held-out text, ``records`` records each, the same
    records for every model (fixed seeds). ``stream``: :func:`held_out_tokens` computed once by a
    caller that scores several models (else tokenised here). with_positions: rows also carry
    ``block`` (which forward pass), ``statement`` ``[start, end)`` and ``answer`` ``[start, end)``
    token offsets.
    """
    import torch

    from ctxext.retrieval_data import retrieval_layout

    torch.manual_seed(0)
    if stream is None:
        stream = held_out_tokens(tok, blocks * length)
    rng = np.random.default_rng([2026, 11])
    rows = []
    with torch.no_grad():
        for b in range(blocks):
            layout = retrieval_layout(np.asarray(stream[b * length : (b + 1) * length]), tok, records, rng)
            ids = torch.as_tensor(layout.ids)[None]
            logits = model(ids, use_cache=False).logits[0]  # (length', vocab)
            pred = logits.argmax(-1)
            spans = zip(layout.statements, layout.statement_lengths, layout.answers)
            for start, size, (a0, a1) in spans:
                ok = bool((pred[a0 - 1 : a1 - 1] == ids[0, a0:a1]).all())
                rows.append({"distance": a0 - start, "correct": ok})
                if with_positions:
                    rows[-1].update(block=b, statement=[start, start + size], answer=[a0, a1])
    return rows


def recall_split(rows: list[dict], window: int) -> dict[str, dict]:
    """Accuracy within the exact window (distance <= window) and beyond it: ``{"within"|"beyond": {n, accuracy}}``."""
    within = [r["correct"] for r in rows if r["distance"] <= window]
    beyond = [r["correct"] for r in rows if r["distance"] > window]
    return {
        "within": {"n": len(within), "accuracy": float(np.mean(within)) if within else None},
        "beyond": {"n": len(beyond), "accuracy": float(np.mean(beyond)) if beyond else None},
    }


def recall_one(
    source: str,
    out: Path,
    blocks: int,
    length: int,
    records: int = 16,
    window: int = 256,
    settings: dict | None = None,
) -> None:
    """Teacher-forced recall accuracy on held-out retrieval blocks, by statement distance.

    settings: tensorized-attention settings to evaluate with (``ctxext eval --set``), or None.
    """
    import torch

    from ctxext.evaluate.runner import ModelEntry, load_entry

    torch.manual_seed(0)
    model, tok = load_entry(ModelEntry(label="m", source=source, settings=settings), torch.device("cpu"))
    rows = recall_rows(model, tok, blocks, length, records)
    result = {
        "source": source,
        "settings": settings or {},
        "blocks": blocks,
        "length": length,
        "records": records,
        "window": window,
        **recall_split(rows, window),
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


def run_jobs(jobs, jobs_at_once: int, threads: int) -> None:
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=jobs_at_once) as pool:
        for f in [pool.submit(run, cmd, log, threads) for cmd, log in jobs]:
            f.result()


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _loss_curve(recipe: dict) -> list[tuple[int, float]]:
    """(step, loss) of a recipe's training run, empty before it ran."""
    metrics = recipe["output_dir"] / "metrics.jsonl"
    if not metrics.is_file():
        return []
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    # the language-model loss, comparable across models (a distilled run's objective also holds its KL;
    # an attention-transfer run has none)
    return [(x["step"], x.get("lm_loss", x["loss"])) for x in rows if "transfer_error" not in x]


def _settings(recipe: dict | None) -> str:
    if recipe is None:
        return "SmolLM2-135M as shipped (full attention, SDPA), not fine-tuned"
    m = recipe["raw"]["model"]
    if m.get("attention", "tensorized") != "tensorized":
        scaling = f", {m['rope_scaling']} rope scaling x{m['rope_factor']:g}" if m.get("rope_scaling") else ""
        return f"full attention ({m['attention']}){scaling}, fine-tuned"
    t = m.get("tensorized", {})
    text = ", ".join(f"{k}={v}" for k, v in t.items())
    distill = recipe["raw"].get("distill") or {}
    if distill.get("weight"):
        text += f"; distilled from {distill.get('teacher', 'base')} (KL weight {distill['weight']})"
    if distill.get("attention_transfer"):
        text += "; attention transfer (only the learned summaries train, no LM loss)"
    if m.get("source", "smollm2") != "smollm2":
        text += f"; starts from `{m['source']}`"
    return text


def report(
    recipes: dict, models_: dict, out: Path, report_dir: Path, recipes_dir: Path = ROOT / "recipes" / "study"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    ppl: dict[str, dict[int, float]] = {}
    passkey: dict[str, dict[int, dict[str, float]]] = {}
    protocol = {}
    for label in models_:
        for task in ("ppl", "passkey"):
            path = out / "eval" / f"{_slug(label)}-{task}" / "report.json"
            if not path.is_file():
                continue
            rep = json.loads(path.read_text())
            protocol[task] = rep["protocol"]
            for m in rep["models"]:
                name = label if m["label"] == rep["models"][0]["label"] else f"{label}+{m['label'].split('+')[-1]}"
                if task == "ppl":
                    ppl[name] = {int(n): c["ppl"] for n, c in rep["perplexity"][m["label"]].items() if c.get("ppl")}
                else:
                    passkey[name] = {int(n): cell for n, cell in rep["tasks"]["passkey"][m["label"]].items()}
    recall = {}
    for label in models_:
        path = out / "recall" / f"{label}.json"
        if path.is_file():
            recall[label] = json.loads(path.read_text())

    lengths_t = sorted({r["raw"]["data"]["seq_len"] for r in recipes.values()})
    lines = [f"# Quality study (issue 8): fine-tuned at T = {', '.join(f'{n:,}' for n in lengths_t)}", ""]
    where = recipes_dir.resolve().relative_to(ROOT) if recipes_dir.resolve().is_relative_to(ROOT) else recipes_dir
    lines += [f"Generated by `python benchmarks/quality_study.py`; recipes in `{where}/`.", ""]
    lines += ["| model | settings | steps | train tokens | final LM loss (mean of last 10) |", "|---|---|---|---|---|"]
    for name in models_:
        r = recipes.get(name)
        note = ""
        if name in EVAL_VARIANTS:
            recipe_name, extra, _ = EVAL_VARIANTS[name]
            r, note = recipes[recipe_name], f"; evaluated with {' '.join(extra)}"
        if r is None:
            lines.append(f"| {name} | {_settings(None)} | 0 | 0 | - |")
            continue
        curve = _loss_curve(r)
        losses = [loss for _, loss in curve]
        t = r["raw"]["train"]
        planned = t["steps"]
        steps = curve[-1][0] if curve else planned  # fewer when train.max_minutes stopped the run
        tokens = steps * r["raw"]["data"]["seq_len"] * t.get("batch_size", 1) * t.get("grad_accum", 1)
        final = f"{np.mean(losses[-10:]):.3f}" if losses else "-"
        shown = f"{steps} (of {planned}: train.max_minutes)" if steps < planned else f"{steps}"
        lines.append(f"| {name} | {_settings(r)}{note} | {shown} | {tokens:,} | {final} |")

    if ppl:
        lengths = sorted({n for row in ppl.values() for n in row})
        lines += ["", "## Perplexity against length (held-out standard-library packages)", ""]
        lines += ["| model | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for name, row in ppl.items():
            lines.append(f"| {name} | " + " | ".join(f"{row[n]:.2f}" if n in row else "-" for n in lengths) + " |")
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, row in ppl.items():
            xs = sorted(row)
            ax.plot(xs, [row[x] for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens scored (document prefix length)")
        ax.set_ylabel("perplexity (log scale)")
        ax.axvline(8192, color="grey", ls=":", lw=1)
        trained = ", ".join(f"{n:,}" for n in lengths_t)
        ax.set_title(f"Perplexity vs length (trained at {trained}; SmolLM2 native 8,192 dotted)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(report_dir / "ppl_vs_length.png", dpi=120)
        plt.close(fig)
        if "ppl" in protocol:
            p = protocol["ppl"]["perplexity"]
            lines += ["", f"Documents per length: {p.get('documents_per_length')}; scoring: {p.get('scoring')}."]

    if passkey:
        lengths = sorted({n for row in passkey.values() for n in row})
        depths = sorted({d for row in passkey.values() for cell in row.values() for d in cell}, key=float)
        lines += ["", "## Passkey (teacher-forced), accuracy per length and depth", ""]
        head = [f"{n:,} @ {d}" for n in lengths for d in depths]
        lines += ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for name, row in passkey.items():
            cells = [f"{row[n][d]:.0%}" if n in row and d in row[n] else "-" for n in lengths for d in depths]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "passkey" in protocol:
            p = protocol["passkey"]["retrieval"]
            lines += ["", f"Trials per cell: {p['trials_per_cell']} (seeds {p['seeds']}); {p['scoring']}."]
        fig, axes = plt.subplots(1, len(passkey), figsize=(2.6 * len(passkey), 2.8), squeeze=False)
        for ax, (name, row) in zip(axes[0], passkey.items()):
            grid = np.array([[row.get(n, {}).get(d, np.nan) for n in lengths] for d in depths])
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), depths, fontsize=7)
            ax.set_title(name, fontsize=8)
        axes[0][0].set_ylabel("depth")
        fig.suptitle("Passkey accuracy (yellow = 100%)", fontsize=9)
        fig.tight_layout()
        fig.savefig(report_dir / "passkey.png", dpi=120)
        plt.close(fig)

    if recall:
        lines += ["", "## Recall of held-out retrieval blocks (training format, new records and text)", ""]
        lines += ["| model | exact window (tokens) | within the window | beyond the window |", "|---|---|---|---|"]
        for name, r in recall.items():
            w, b = r["within"], r["beyond"]
            cells = [f"{c['accuracy']:.0%} (n={c['n']})" if c["n"] else "- (n=0)" for c in (w, b)]
            lines.append(f"| {name} | {r['window']} | {cells[0]} | {cells[1]} |")
        fig, ax = plt.subplots(figsize=(7, 4))
        window = next(iter(recall.values()))["window"]
        bins = np.array([0, window // 2, window, 2 * window, 4 * window, 8 * window])
        for k, (name, r) in enumerate(recall.items()):
            dist = np.array([x["distance"] for x in r["rows"]])
            ok = np.array([x["correct"] for x in r["rows"]], dtype=float)
            idx = np.digitize(dist, bins[1:-1])
            acc = [ok[idx == i].mean() if (idx == i).any() else np.nan for i in range(len(bins) - 1)]
            style = ("-", "--", ":", "-.")[k % 4]  # equal curves (often all zero) stay visible
            ax.plot(range(len(acc)), acc, marker="o", ls=style, ms=8 - 1.5 * (k % 4), label=name)
        ax.set_xticks(range(len(bins) - 1), [f"{a}-{b}" for a, b in zip(bins[:-1], bins[1:])])
        ax.set_xlabel("tokens from statement to recall")
        ax.set_ylabel("codes recalled exactly")
        ax.axvline(1.5, color="grey", ls=":", lw=1)
        ax.set_title(f"Recall vs distance (the exact window ends at {window}, dotted)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(report_dir / "recall.png", dpi=120)
        plt.close(fig)

    curves = {name: curve for name, r in recipes.items() if (curve := _loss_curve(r))}
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, pts in curves.items():
            steps, losses = zip(*pts)
            w = min(5, len(losses))
            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
            ax.plot(steps[w - 1 :], smooth, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training LM loss (moving mean of 5)")
        ax.set_title("Training loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(report_dir / "train_loss.png", dpi=120)
        plt.close(fig)
        lines += ["", "![training loss](train_loss.png)"]
    for img in ("ppl_vs_length.png", "passkey.png", "recall.png"):
        if (report_dir / img).is_file():
            lines += ["", f"![{img[:-4]}]({img})"]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (report_dir / "study.json").write_text(
        json.dumps(
            {
                "ppl": ppl,
                "passkey": passkey,
                "recall": {k: {"within": v["within"], "beyond": v["beyond"]} for k, v in recall.items()},
            },
            indent=1,
        )
    )
    return path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", type=Path, default=ROOT / "recipes" / "study")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "study")
    ap.add_argument("--report-dir", type=Path, default=ROOT / "docs" / "study")
    ap.add_argument("--stage", choices=("all", "train", "eval", "report"), default="all")
    ap.add_argument("--only", default="", help="comma-separated recipe names, 'base' for the baselines (default: all)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the base model and base+yarn4")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (each gets --threads threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ppl-lengths", default="2k,4k,8k,16k,32k")
    ap.add_argument("--ppl-lengths-full", default="2k,4k,8k,16k", help="full-attention models (quadratic on CPU)")
    ap.add_argument("--passkey-lengths", default="2k,4k,8k,16k")
    ap.add_argument("--passkey-lengths-full", default="2k,4k,8k", help="full-attention models")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--docs", type=int, default=1)
    ap.add_argument("--recall-blocks", type=int, default=8)
    ap.add_argument("--recall-length", type=int, default=2048)
    ap.add_argument("--recall-records", type=int, default=16)
    ap.add_argument("--recall-window", type=int, default=256, help="exact window of the models (2 x block)")
    ap.add_argument("--recall-one", help=argparse.SUPPRESS)
    ap.add_argument("--recall-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--recall-set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.recall_one:
        recall_one(
            args.recall_one,
            args.recall_out,
            args.recall_blocks,
            args.recall_length,
            args.recall_records,
            args.recall_window,
            _recall_settings(args.recall_set),
        )
        return
    only = {s for s in args.only.split(",") if s} or None
    recipes = load_recipes(args.recipes, only)
    if not recipes and not (only and "base" in only):
        raise SystemExit(f"no recipes in {args.recipes}" + (f" named {sorted(only)}" if only else ""))
    models_ = models(recipes, with_baselines=not args.no_baselines and (only is None or "base" in only))
    if args.stage in ("all", "train"):
        for wave in training_waves(recipes):
            run_jobs(train_jobs(wave, args.out), args.jobs, args.threads)
    if args.stage in ("all", "eval"):
        ready = {
            k: v for k, v in models_.items() if v[0] == "smollm2" or (Path(v[0]) / "adapter_config.json").is_file()
        }
        jobs = recall_jobs(ready, args.out, args, recipes) + eval_jobs(ready, args.out, args)
        run_jobs(jobs, args.jobs, args.threads)
    if args.stage in ("all", "report"):
        print(f"[study] report: {report(recipes, models_, args.out, args.report_dir, args.recipes)}")


if __name__ == "__main__":
    main()
