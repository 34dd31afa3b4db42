"""Learning curves of a fine-tuning run from its checkpoints: held-out loss and recall against the
tokens trained on, to see where the curves flatten.

    python benchmarks/checkpoint_curve.py runs/study/train/long-b64 --every 40 \\
        --out runs/study/curve/long-b64.json --plot docs/study/round8/curve.png [--set rope=axis]

The run's own ``recipe.yaml`` rebuilds its model (base model, tensorized attention, LoRA); each
checkpoint ``checkpoints/step-N`` (every ``--every`` steps) loads its trainable tensors into it,
and step 0 is the converted model before training (``--no-step0`` skips it). Per step:

* **held-out loss**: mean NLL (nats/token) over ``--seqs`` sequences of ``--length`` tokens of
  held-out text (the standard-library packages that training never reads), the same sequences
  for every step;
* **recall**: teacher-forced recall of held-out retrieval blocks (``--recall-blocks`` blocks, the
  quality study's records) within the exact window and beyond it.

Scores are kept in ``--out`` by step: rerunning while the run trains scores only new checkpoints.
The plot adds the training loss (running mean over ``--smooth`` steps) from ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def checkpoint_steps(run: Path, every: int) -> list[int]:
    """Steps of the run's checkpoints that are multiples of ``every``, ascending, with 0 first."""
    steps = []
    for path in sorted((run / "checkpoints").glob("step-*")):
        step = int(path.name.split("-")[1])
        if step % every == 0 and (path / "state.json").is_file():
            steps.append(step)
    return [0, *steps]


def held_out_sequences(stream: list[int], count: int, length: int, skip: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens of the held-out ``stream``, after its first ``skip`` tokens."""
    need = skip + count * length
    if len(stream) < need:
        raise SystemExit(f"held-out text has {len(stream)} tokens; --seqs {count} x --length {length} needs {need}")
    return [stream[skip + i * length : skip + (i + 1) * length] for i in range(count)]


def held_out_loss(model, seqs: list[list[int]]) -> float:
    """Mean NLL (nats/token) of ``seqs`` (each scored on its own, tokens 2..L)."""
    from ctxext.evaluate.perplexity import document_nll

    total, count = 0.0, 0
    with torch.no_grad():
        for ids in seqs:
            nll, n = document_nll(model, ids)
            total, count = total + nll, count + n
    return total / count


def load_run_recipe(run: Path):
    """The recipe a ``ctxext finetune`` run saved in its output directory."""
    from ctxext import config

    path = run / "recipe.yaml"
    if not path.is_file():
        raise SystemExit(f"{run} has no recipe.yaml: pass the train.output_dir of a `ctxext finetune` run")
    return config.load(path)


def run_window(recipe) -> int:
    """Tokens of the run's exact local window (``quality_study.exact_window``); 0 for full attention."""
    from quality_study import exact_window

    if recipe.model.attention != "tensorized":
        return 0
    return exact_window(recipe.tensorized_options().to_dict(), 0)  # with the operator's defaults filled in


def build_model(recipe, settings: dict | None):
    """The run's model before training (base model -> tensorized attention -> LoRA), in eval mode."""
    from ctxext.evaluate.runner import override_settings
    from ctxext.train import add_adapter, load_base_model

    model, tok = load_base_model(recipe)
    model = add_adapter(recipe, model)
    if settings:
        override_settings(model, settings)
    return model.eval(), tok


def score_run(run: Path, steps: list[int], known: dict, args, window: int, log=print) -> dict:
    """Score every step of ``steps`` not in ``known``; returns ``known`` with the new rows (by step)."""
    from quality_study import held_out_tokens, recall_rows, recall_split

    from ctxext.train import load_trainable

    todo = [s for s in steps if str(s) not in known]
    if not todo:
        return known
    model, tok = build_model(load_run_recipe(run), dict(args.settings) or None)
    skip = args.recall_blocks * args.length  # recall reads the first blocks, the loss the ones after
    stream = held_out_tokens(tok, skip + args.seqs * args.length)  # tokenised once for every step
    seqs = held_out_sequences(stream, args.seqs, args.length, skip)
    for step in sorted(todo):  # step 0 (the model as built, before training) comes first
        t0 = time.perf_counter()
        if step:
            load_trainable(run / "checkpoints" / f"step-{step:06d}", model)
        row = {"step": step, "loss": held_out_loss(model, seqs)}
        if args.recall_blocks:
            rows = recall_rows(model, tok, args.recall_blocks, args.length, args.recall_records, stream)
            row.update(recall_split(rows, window))
        known[str(step)] = row
        beyond = row.get("beyond", {}).get("accuracy")
        log(
            f"step {step}: held-out loss {row['loss']:.4f}"
            + (f", recall beyond {window}: {beyond:.1%}" if beyond is not None else "")
            + f" ({time.perf_counter() - t0:.0f} s)"
        )
    return known


def train_loss(run: Path, smooth: int) -> list[tuple[int, float]]:
    """(step, running mean of the LM loss over the last ``smooth`` steps) from ``metrics.jsonl``."""
    from quality_study import _loss_curve

    losses = _loss_curve({"output_dir": run})
    out = []
    for i, (step, _) in enumerate(losses):
        window = [v for _, v in losses[max(0, i + 1 - smooth) : i + 1]]
        out.append((step, sum(window) / len(window)))
    return out


def plot(result: dict, path: Path) -> None:
    """Three panels against millions of tokens trained: train loss, held-out loss, recall beyond the window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = result["tokens_per_step"] / 1e6
    rows = sorted(result["scores"].values(), key=lambda r: r["step"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    curve = result["train_loss"]
    axes[0].plot([s * tokens for s, _ in curve], [v for _, v in curve], color="tab:gray")
    axes[0].set(title=f"training loss (mean of {result['smooth']} steps)", ylabel="nats / token")
    axes[1].plot([r["step"] * tokens for r in rows], [r["loss"] for r in rows], "o-")
    axes[1].set(title=f"held-out loss ({result['seqs']} x {result['length']} tokens)", ylabel="nats / token")
    recall = [r for r in rows if r.get("beyond", {}).get("accuracy") is not None]
    if recall:
        axes[2].plot([r["step"] * tokens for r in recall], [100 * r["beyond"]["accuracy"] for r in recall], "o-")
        for r in recall:
            if r.get("within", {}).get("accuracy") is not None:
                axes[2].plot(r["step"] * tokens, 100 * r["within"]["accuracy"], "s", color="tab:green", ms=4)
    axes[2].set(title=f"recall: beyond {result['window']} tokens (o), within (s)", ylabel="%", ylim=(-2, 102))
    for ax in axes:
        ax.set_xlabel("tokens trained (millions)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['run']}" + (f"  (at eval: {result['settings']})" if result["settings"] else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setting(text: str) -> tuple[str, object]:
    from ctxext.config import parse_settings

    return next(iter(parse_settings([text]).items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="train.output_dir of a `ctxext finetune` run")
    ap.add_argument("--every", type=int, default=20, help="score checkpoints whose step is a multiple of this")
    ap.add_argument("--seqs", type=int, default=4, help="held-out sequences for the loss")
    ap.add_argument("--length", type=int, default=2048, help="tokens per held-out sequence and recall block")
    ap.add_argument("--recall-blocks", type=int, default=4, help="held-out retrieval blocks (0: no recall)")
    ap.add_argument("--recall-records", type=int, default=16, help="records per retrieval block")
    ap.add_argument("--recall-window", type=int, default=0, help="exact window (default: 2 x the inner block)")
    ap.add_argument("--set", dest="settings", action="append", type=_setting, default=[], help="KEY=VALUE at eval")
    ap.add_argument(
        "--no-step0",
        action="store_true",
        help="skip step 0 (the converted model before training: the same for every run whose recipe has the same "
        "model section, so score it once)",
    )
    ap.add_argument("--smooth", type=int, default=20, help="steps in the running mean of the training loss")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, required=True, help="JSON of scores (kept and extended)")
    ap.add_argument("--plot", type=Path, help="PNG of the three curves")
    args = ap.parse_args(argv)
    if args.every <= 0:
        ap.error(f"--every must be > 0, got {args.every}")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = {
        "run": str(args.run),
        "settings": dict(args.settings),
        "seqs": args.seqs,
        "length": args.length,
        "recall_blocks": args.recall_blocks,
        "recall_records": args.recall_records,
    }
    known: dict = {}
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        if {k: previous.get(k) for k in protocol} != protocol:
            raise SystemExit(f"{args.out} holds scores of another protocol; pass another --out or delete it")
        known = previous["scores"]
    recipe = load_run_recipe(args.run)
    window = args.recall_window or run_window(recipe)
    steps = checkpoint_steps(args.run, args.every)
    known = score_run(args.run, steps[1:] if args.no_step0 else steps, known, args, window)
    result = {
        **protocol,
        "window": window,
        "tokens_per_step": recipe.data.seq_len * recipe.train.batch_size * recipe.train.grad_accum,
        "smooth": args.smooth,
        "train_loss": train_loss(args.run, args.smooth),
        "scores": known,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    if args.plot:
        plot(result, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
