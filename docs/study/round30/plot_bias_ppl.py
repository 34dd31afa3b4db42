"""Round 30's figure: perplexity against length for the default model at bias 0, a fixed 1 nat and the
biases that grow past 8,192 tokens (left), and the bias each schedule puts on a query's far logits (right).

Reads the ``ctxext eval`` report JSONs of rounds 15, 21, 24, 28, 30, 31, 32 and 33 (one held-out document per
length); a curve shows only the lengths that were run, up to ``--longest``. A report named ``file@L`` gives only
its lengths up to ``L`` (a capped growth equals the uncapped one below its cap, so it shares those points). Run
from the repository root after round 30's ``chain2.sh`` and ``chain3.sh`` (and rounds 31-33's chains for the
longer figures)::

    python docs/study/round30/plot_bias_ppl.py --out docs/study/round30/ppl_by_bias.png
    python docs/study/round30/plot_bias_ppl.py --longest 131072 --out docs/study/round32/ppl_by_bias.png
    python docs/study/round30/plot_bias_ppl.py --longest 131072 --out docs/study/round33/ppl_by_bias.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

STUDY = Path("docs/study")
CURVES = {  # label -> (fixed bias, growth per doubling past 8,192 tokens, cap (0: none), report JSONs)
    "bias 0 (the default to round 32)": (0.0, 0.0, 0.0, ["round28/eval-ppl-bias0/report.json",
                                                         "round15/eval-ppl-long.json",
                                                         "round21/eval-ppl-32k-64k.json",
                                                         "round24/eval-ppl-128k.json"]),
    "fixed 1 nat (rounds 28, 30)": (1.0, 0.0, 0.0, ["round28/eval-ppl-bias1/report.json",
                                               "round30/eval-ppl-16k-b1/report.json",
                                               "round28/eval-ppl-32k-bias1/report.json",
                                               "round31/eval-ppl-b1/report.json"]),
    "0.5 nat per doubling from 8k": (0.0, 0.5, 0.0, ["round30/eval-ppl-g0.5/report.json",
                                                     "round31/eval-ppl-g0.5/report.json"]),
    "0.25 nat per doubling from 8k": (0.0, 0.25, 0.0, ["round30/eval-ppl-g0.25/report.json"]),
    "0.5 nat per doubling, capped at 0.5 (the default)": (0.0, 0.5, 0.5, ["round30/eval-ppl-g0.5/report.json@16384",
                                                                           "round32/eval-ppl-cap0.5/report.json",
                                                                           "round33/eval-ppl-cap0.5/report.json"]),
}  # fmt: skip
START = 8192


def read_ppl(paths: list[str], longest: int) -> dict[int, float]:
    """Length (tokens) -> perplexity over the reports that exist (later files win on a shared length);
    ``file@L`` keeps that file's lengths up to ``L``."""
    points = {}
    for entry in paths:
        rel, _, upto = entry.partition("@")
        path, upto = STUDY / rel, min(longest, int(upto or longest))
        if not path.exists():
            continue
        for by_length in json.loads(path.read_text())["perplexity"].values():
            points |= {int(length): cell["ppl"] for length, cell in by_length.items() if int(length) <= upto}
    return dict(sorted(points.items()))


def schedule(bias: float, growth: float, cap: float, lengths: list[int]) -> list[float]:
    """The far-logit bias of a query that has seen each length of tokens (``far_logit_bias``'s rule)."""
    grown = [bias + growth * max(0.0, math.log2(t / START)) for t in lengths]
    return [min(b, cap) for b in grown] if cap else grown


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=STUDY / "round30" / "ppl_by_bias.png")
    ap.add_argument("--longest", type=int, default=32768, help="tokens: the longest length drawn")
    args = ap.parse_args()
    fig, (ax_ppl, ax_bias) = plt.subplots(1, 2, figsize=(12, 4.5))
    doublings = round(math.log2(args.longest / 2048))
    lengths = [2048 * 2 ** (i / 8) for i in range(8 * doublings + 1)]  # 2k .. longest
    for color, (label, (bias, growth, cap, paths)) in enumerate(CURVES.items()):
        points, style = read_ppl(paths, args.longest), {"color": f"C{color}", "label": label}
        if points:
            ax_ppl.plot(list(points), list(points.values()), marker="o", **style)
            for length, ppl in points.items():
                ax_ppl.annotate(f"{ppl:.2f}", (length, ppl), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax_bias.plot(lengths, schedule(bias, growth, cap, lengths), **style)
    for ax in (ax_ppl, ax_bias):
        ax.set_xscale("log", base=2)
        ticks = [2048 * 2**i for i in range(doublings + 1)]
        ax.set_xticks(ticks, [f"{t // 1024}k" for t in ticks])
        ax.set_xlabel("tokens (one held-out document's first L; for the bias: the query's length)")
        ax.grid(alpha=0.3)
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.set_title("SmolLM2-135M, default model (T = 2k), rope=axis, zero-shot biases")
    ax_bias.set_ylabel("nats off every far logit")
    ax_bias.set_title("the bias each schedule applies")
    ax_ppl.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
