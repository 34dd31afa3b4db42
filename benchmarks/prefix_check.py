"""Does a longer pass score a prefix as a shorter pass does? Per-token NLL of a document's first
``--short`` tokens, from a ``--short``-token pass and from inside a ``--long``-token pass.

    python benchmarks/prefix_check.py runs/study/train/retrieve-b64-c32/adapter --set rope=axis \\
        --short 4k --long 8k --threads 2 --out runs/r24/prefix_check.json

Round 24 subtracted the NLL sum of a 64k pass from that of a 128k pass to get the perplexity of
the tokens from 64k to 128k alone; that holds when the longer pass scores the prefix as the
shorter one did. Attention that is causal at every length does (a token sees only its past);
what may still differ is float rounding that depends on the pass's shapes, and in a model that
chooses its far blocks, a near-tie that the rounding flips. This measures the difference; run it
again with ``--set retrieve=0`` (no far blocks) to see what the choice adds, and with ``--float64``
to see how much of it is float32 rounding. The document is the
first held-out one long enough (``pydoc_data/topics.py`` by default; ``--text`` another file).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import torch

THRESHOLDS = (1e-5, 1e-4, 1e-3, 1e-2)  # nats


def compare(short_nll: torch.Tensor, long_nll: torch.Tensor) -> dict:
    """Summary of ``|short - long|`` over the prefix: ``short_nll`` ``(S,)``, ``long_nll`` ``(L,)`` with L >= S,
    per-token NLL in nats; the first S of ``long_nll`` are the same tokens."""
    if long_nll.numel() < short_nll.numel():
        raise ValueError(
            f"the long pass scored {long_nll.numel()} tokens, fewer than the short pass's {short_nll.numel()}"
        )
    short, long = short_nll.double(), long_nll[: short_nll.numel()].double()
    diff = (short - long).abs()
    over = torch.nonzero(diff > THRESHOLDS[0]).flatten()
    return {
        "tokens": short.numel(),
        "nll_sum_short": short.sum().item(),
        "nll_sum_long_prefix": long.sum().item(),
        "max_abs_diff": diff.max().item() if diff.numel() else 0.0,
        "tokens_over": {f"{t:g}": int((diff > t).sum()) for t in THRESHOLDS},
        "first_position_over_1e-05": int(over[0]) + 1 if over.numel() else None,  # +1: position of the token scored
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="adapter or model directory, or a source (as ctxext eval takes)")
    ap.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE tensorized override")
    ap.add_argument("--short", default="4k", help="prefix length (k = 1,024)")
    ap.add_argument("--long", default="8k", help="the longer pass's length")
    ap.add_argument("--text", type=Path, help="the document (default: the standard library's pydoc_data/topics.py)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--float64", action="store_true", help="run the model in float64 (default: float32)")
    ap.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = ap.parse_args(argv)

    from ctxext.config import parse_settings
    from ctxext.evaluate.runner import ModelEntry, load_entry, parse_length
    from ctxext.loss import sequence_nll

    short, long = parse_length(args.short), parse_length(args.long)
    if not 1 < short < long:
        ap.error(f"need 1 < --short < --long, got {short} and {long}")
    text_path = args.text or Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not text_path.is_file():
        ap.error(f"--text: {text_path} is not a file")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = parse_settings(args.settings)
    model, tok = load_entry(ModelEntry(args.model, args.model, settings=settings or None), torch.device("cpu"))
    dtype = torch.float64 if args.float64 else torch.float32
    model = model.to(dtype)
    ids = tok(text_path.read_text(), add_special_tokens=False)["input_ids"][:long]
    if len(ids) < long:
        ap.error(f"{text_path} has {len(ids)} tokens, fewer than --long {long}")
    x = torch.tensor([ids])  # (1, long)
    with torch.no_grad():
        short_nll = sequence_nll(model, x[:, :short])[0]  # (short - 1,)
        long_nll = sequence_nll(model, x)[0]  # (long - 1,)
    result = {"model": args.model, "settings": settings, "text": str(text_path), "short": short, "long": long}
    ran_in = next(model.parameters()).dtype  # what the passes ran in, not what was asked for
    result |= {"dtype": str(ran_in).removeprefix("torch.")} | compare(short_nll, long_nll)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
