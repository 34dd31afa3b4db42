"""Why a retrieval model misses a record beyond its window: the far-block choice, or the reading?

    python benchmarks/recall_misses.py runs/study/train/long-b64 --steps 0,200 \\
        --out docs/study/round10/recall_misses.json --plot docs/study/round10/recall_misses.png

Runs the quality study's recall (``quality_study.recall_rows``: the same held-out blocks and
records as ``checkpoint_curve.py``) on checkpoints of a ``ctxext finetune`` run with tensorized
attention and ``retrieve > 0``, and records, in every layer, which far blocks each query head
chose (``far_block_index`` of the torch backend). For each record stated beyond the exact window
the query that predicts the code's first token is looked at: in how many (layer, head) pairs its
choice held a block of ``retrieve_block`` slots overlapping the record's statement (**chosen
share**). A missed record whose statement was rarely chosen is a choice failure (more or better
far blocks would help); a miss with a chosen share like the recalled records' is a reading
failure (the model read the statement and still answered wrong: more training, not retrieval).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


class ChoiceRecorder:
    """Wraps ``torch_backend.far_block_index`` (arguments ``qs, ks, key_ok, opts, ...``): keeps each
    call's ``(Hq, L, nb)`` choice as a mask (batch 1), or only the query slots in ``rows``
    (``(Hq, R, nb)``) when it is set."""

    rows: torch.Tensor | None = None

    def __init__(self, choose):
        self.choose, self.calls = choose, []

    def __call__(self, qs, ks, key_ok, opts, *rest):
        from ctxext.attention.retrieve import index_mask

        index = self.choose(qs, ks, key_ok, opts, *rest)
        picked = index[0] if self.rows is None else index[0][:, self.rows]
        self.calls.append(index_mask(picked, -(-ks.shape[2] // opts.retrieval_block)))
        return index


def far_blocks_of(span: tuple[int, int], m: int) -> list[int]:
    """Blocks of ``m`` slots overlapping the token span ``[start, end)``."""
    return list(range(span[0] // m, (span[1] - 1) // m + 1))


def chosen_share(calls: list[torch.Tensor], query: int, blocks: list[int]) -> tuple[float, list[float]]:
    """Share of (layer, head) pairs whose choice for ``query`` holds one of ``blocks``; and per layer."""
    per_layer = [float(c[:, query, blocks].any(dim=-1).float().mean()) for c in calls]
    return float(np.mean(per_layer)), per_layer


def is_far(span: tuple[int, int], query: int, n: int, m: int, window: bool) -> bool:
    """Whether every block of the statement lies wholly before the query's local range (so only
    retrieval can read it)."""
    start = query // n * n - (n if window else 0)
    return ((span[1] - 1) // m + 1) * m <= max(start, 0)


def score_step(model, tok, recorder: ChoiceRecorder, opts, args, stream) -> dict:
    """Recall rows of one model with the chosen share of every far record."""
    from quality_study import recall_rows

    n, m = opts.block_sizes[-1], opts.retrieval_block
    calls_by_block = []

    def forward_hook(*_):  # one forward per recall block: keep its layers' choices
        calls_by_block.append(recorder.calls[:])
        recorder.calls.clear()

    handle = model.register_forward_hook(forward_hook)
    try:
        rows = recall_rows(model, tok, args.recall_blocks, args.length, args.recall_records, stream, True)
    finally:
        handle.remove()
    far = []
    for row in rows:
        query = row["answer"][0] - 1  # the logits here predict the code's first token
        if not is_far(tuple(row["statement"]), query, n, m, opts.local == "window"):
            continue
        share, per_layer = chosen_share(calls_by_block[row["block"]], query, far_blocks_of(row["statement"], m))
        far.append({**row, "chosen_share": share, "per_layer": per_layer})
    return {"rows": far, "layers": len(calls_by_block[0]) if calls_by_block else 0}


def summary(far: list[dict]) -> dict:
    """Recalled vs missed: counts, mean chosen share, and how many were (almost) never chosen."""
    out = {}
    for name, group in (
        ("recalled", [r for r in far if r["correct"]]),
        ("missed", [r for r in far if not r["correct"]]),
    ):
        shares = [r["chosen_share"] for r in group]
        out[name] = {
            "n": len(group),
            "chosen_share_mean": float(np.mean(shares)) if shares else None,
            "chosen_share_median": float(np.median(shares)) if shares else None,
            "under_10pct": sum(s < 0.10 for s in shares),
        }
    return out


def plot(result: dict, path: Path) -> None:
    """Per layer, share of heads that chose the statement's block: recalled vs missed, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(result["steps"], key=int)
    fig, axes = plt.subplots(1, len(steps), figsize=(6 * len(steps), 4), squeeze=False)
    for ax, step in zip(axes[0], steps):
        far = result["steps"][step]["rows"]
        for name, color, want in (("recalled", "tab:blue", True), ("missed", "tab:red", False)):
            group = [r["per_layer"] for r in far if r["correct"] == want]
            if group:
                ax.plot(100 * np.mean(group, axis=0), "o-", color=color, ms=3, label=f"{name} ({len(group)})")
        ax.set(title=f"step {step}", xlabel="layer", ylabel="% of heads choosing the statement", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['run']}: far records, chosen share by layer")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="train.output_dir of a `ctxext finetune` run with retrieve > 0")
    ap.add_argument("--steps", default="0", help="comma-separated checkpoint steps (0: the model before training)")
    ap.add_argument("--length", type=int, default=2048, help="tokens per recall block")
    ap.add_argument("--recall-blocks", type=int, default=4, help="held-out retrieval blocks")
    ap.add_argument("--recall-records", type=int, default=16, help="records per block")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, required=True, help="JSON with every far record and the summary")
    ap.add_argument("--plot", type=Path, help="PNG: chosen share by layer, recalled vs missed")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from checkpoint_curve import build_model, load_run_recipe
    from quality_study import held_out_tokens

    import ctxext.attention.torch_backend as tb
    from ctxext.train import load_trainable

    recipe = load_run_recipe(args.run)
    opts = recipe.tensorized_options() if recipe.model.attention == "tensorized" else None
    if opts is None or not opts.retrieve:
        raise SystemExit(f"{args.run}: its recipe has no far-block retrieval (tensorized retrieve > 0)")
    model, tok = build_model(recipe, None)
    stream = held_out_tokens(tok, args.recall_blocks * args.length)
    recorder = ChoiceRecorder(tb.far_block_index)
    result = {"run": str(args.run), "retrieve": opts.retrieve, "retrieve_block": opts.retrieval_block, "steps": {}}
    tb.far_block_index = recorder
    try:
        for step in (int(s) for s in args.steps.split(",")):
            if step:
                load_trainable(args.run / "checkpoints" / f"step-{step:06d}", model)
            scored = score_step(model, tok, recorder, opts, args, stream)
            scored["summary"] = summary(scored["rows"])
            result["steps"][str(step)] = scored
            s = scored["summary"]
            print(
                f"step {step}: far records {len(scored['rows'])}; recalled {s['recalled']['n']} "
                f"(chosen share {_pct(s['recalled']['chosen_share_mean'])}), missed {s['missed']['n']} "
                f"(chosen share {_pct(s['missed']['chosen_share_mean'])}, {s['missed']['under_10pct']} under 10%)"
            )
    finally:
        tb.far_block_index = recorder.choose
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


if __name__ == "__main__":
    main()
