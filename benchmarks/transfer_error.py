"""How far is each tensorized layer from exact attention on the same inputs? A diagnostic for issue 8.

For each model, one forward pass per held-out document runs as the original full-attention
model (``ctxext.attention.transfer``: every layer continues with exact causal attention), and in
every layer tensorized attention on the same q, k, v is compared with the exact output:
``|TA - exact|^2 / |exact|^2`` over the layer's heads, positions and channels. Inside the exact
window the two agree, so the error measures what the long-range path misses of what full
attention fetches from farther back: the quantity ``distill.attention_transfer`` fits. Nothing
is trained.

    python benchmarks/transfer_error.py runs/study/mass runs/study/train/transfer/adapter \\
        --length 2048 --docs 2 --out docs/bench/transfer_error.json --plot docs/img/transfer_error.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import ctxext  # noqa: F401  (registers the tensorized attention)
from ctxext.attention import transfer


def layer_errors(model, documents: list[torch.Tensor]) -> np.ndarray:
    """Relative error per (document, layer): ``(docs, layers)``."""
    rows = []
    with torch.no_grad():
        for ids in documents:
            with transfer.attention_transfer() as errors:
                model(ids[None], use_cache=False)
            rows.append([float(e) for e in errors])
    return np.asarray(rows)


def held_out_documents(tokenizer, length: int, docs: int) -> list[torch.Tensor]:
    """The first ``docs`` held-out standard-library files with at least ``length`` tokens, cut to ``length``."""
    import sysconfig

    from ctxext.data import iter_documents

    root = Path(sysconfig.get_paths()["stdlib"])
    source = ",".join(str(root / p) for p in ("pydoc_data", "email", "tkinter", "unittest") if (root / p).is_dir())
    out = []
    for text in iter_documents(source):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= length:
            out.append(torch.tensor(ids[:length]))
        if len(out) == docs:
            break
    return out


def main() -> None:
    from ctxext.evaluate.runner import ModelEntry, load_entry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="tensorized model directories or adapters; LABEL=PATH to name one")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/transfer_error.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/img/transfer_error.png"))
    args = ap.parse_args()
    results = {}
    for spec in args.models:
        label, _, path = spec.rpartition("=") if "=" in spec else (spec, "", spec)
        model, tok = load_entry(ModelEntry(label=label, source=path), torch.device("cpu"))
        if model.config._attn_implementation != "tensorized":
            raise SystemExit(f"{path}: not a tensorized model")
        errors = layer_errors(model, held_out_documents(tok, args.length, args.docs))
        results[label] = {"source": path, "per_layer": errors.mean(0).tolist(), "mean": float(errors.mean())}
        print(
            f"{label}: mean relative error {errors.mean():.4f} (layers {errors.mean(0).min():.4f} to "
            f"{errors.mean(0).max():.4f})",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    protocol = {"length": args.length, "docs": args.docs, "data": "held-out standard-library packages"}
    args.out.write_text(json.dumps({"protocol": protocol, "models": results}, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in results.items():
        ax.plot(range(len(r["per_layer"])), r["per_layer"], marker="o", ms=3, label=f"{label} (mean {r['mean']:.3f})")
    ax.set_xlabel("layer")
    ax.set_ylabel("|TA - exact|² / |exact|²")
    ax.set_title(f"Tensorized vs exact attention on the same inputs ({args.length:,} tokens)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
