"""What far-block retrieval (``retrieve=k``) costs: forward time beside the window-only model and
full attention, side by side in one process, and how many far blocks a query block's heads choose.

    python benchmarks/retrieve_cost.py MODEL_DIR --lengths 2048,8192 --retrieve 2,4 --out docs/bench/retrieve_cost.json
    python benchmarks/retrieve_cost.py MODEL_DIR --lengths 2048,8192 --retrieve 4 --axis-frames stacked,ordered
    python benchmarks/retrieve_cost.py MODEL_DIR --lengths 8192 --shapes 128:4,64:8,128:8:64  # block:retrieve[:of]
    python benchmarks/retrieve_cost.py MODEL_DIR --lengths 2048,8192 --shapes 128:8:64 --hops  # outer hops on vs off
    python benchmarks/retrieve_cost.py MODEL_DIR --lengths 8192 --shapes 128:8:64,128:8:64:16,128:8:64:1  # score block
    python benchmarks/retrieve_cost.py MODEL_DIR --lengths 8192 --shapes 128:8:64:64:32  # 32 candidates, exact re-rank

MODEL_DIR is a tensorized model (``ctxext convert``); its settings are changed in place per run
(``retrieve``, ``long_range``, and ``block_sizes`` with ``--shapes``), and ``sdpa`` runs the same
weights with full attention. Time is the median of ``--repeats`` forward passes (no grad, batch 1)
on held-out text; on a CPU only the ratios mean anything. "union" is, per query block of n tokens,
the number of distinct far blocks its queries chose over all heads: the masked-union path of
``retrieve.py`` computes scores against that many blocks, so it sets the CPU cost (a fused kernel
would read only the ``k`` blocks per query).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def held_out_ids(tokenizer, length: int) -> torch.Tensor:
    from quality_study import held_out_data

    from ctxext.data import iter_documents

    ids: list[int] = []
    for text in iter_documents(held_out_data()):
        ids += tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= length:
            return torch.tensor(ids[:length])[None]
    raise SystemExit(f"held-out text has fewer than {length} tokens")


def union_sizes(model, ids: torch.Tensor) -> list[float]:
    """Mean number of distinct far blocks chosen per chunk of m queries (the masked-union path's
    unit, m = the retrieved block's size), per layer (hooks the chooser)."""
    import ctxext.attention.torch_backend as tb

    sizes: list[float] = []
    from ctxext.attention.retrieve import index_mask

    choose = tb.far_block_index

    def counting(qs, ks, key_ok, opts, n, *rest):
        index = choose(qs, ks, key_ok, opts, n, *rest)
        chosen = index_mask(index, -(-ks.shape[2] // opts.retrieval_block))  # (B, Hq, L, nb)
        b, hq, length, nb = chosen.shape
        m = opts.retrieval_block
        per_block = chosen.view(b, hq, length // m, m, nb).any(dim=(1, 3)).sum(-1).float()  # (B, L/m)
        sizes.append(per_block[:, 2:].mean().item() if per_block.shape[1] > 2 else 0.0)
        return index

    tb.far_block_index = counting  # the name the torch backend calls
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        tb.far_block_index = choose
    return sizes


def shape_variants(text: str, hops: bool = False) -> list[tuple[str, dict]]:
    """``"128:4,64:8,128:8:64"`` -> per block size, the window-only run and the run retrieving that
    many far blocks (of the inner block, or of the optional third field's size: ``retrieve_block``,
    scored by sub-blocks of the optional fourth field's size: ``retrieve_score_block``, with the
    optional fifth field's number of candidates re-ranked by the exact score: ``retrieve_candidates``); with
    ``hops``, each retrieval run again with the tensorized outer hops on (``long_range``)."""
    variants, windows = [], set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split(":")
        if not (2 <= len(fields) <= 5 and all(f.isdigit() and int(f) > 0 for f in fields)):
            raise SystemExit(
                "--shapes: expected BLOCK:RETRIEVE[:RETRIEVE_BLOCK[:SCORE_BLOCK[:CANDIDATES]]] such as "
                "128:4,64:8,128:8:64:16,128:8:64:64:32, "
                f"got {item!r}"
            )
        size, k, *of = (int(f) for f in fields)
        scored, proposed = of[1:2], of[2:]
        blocks = {"block_sizes": [size], "long_range": False}
        if size not in windows:
            windows.add(size)
            variants.append((f"blocks of {size}, window only", {**blocks, "retrieve": 0}))
        label = f"blocks of {size}, window + retrieve {k}" + (f" of {of[0]}" if of else "")
        label += f", scored by sub-blocks of {scored[0]}" if scored else ""
        label += f", exact re-rank of {proposed[0]} candidates" if proposed else ""
        retrieval = {"retrieve": k, "retrieve_block": of[0] if of else 0}
        retrieval |= {"retrieve_score_block": scored[0]} if scored else {}
        retrieval |= {"retrieve_candidates": proposed[0]} if proposed else {}
        variants.append((label, {**blocks, **retrieval}))
        if hops:
            variants.append((f"{label} + outer hops", {**variants[-1][1], "long_range": True}))
    return variants


def timed(model, ids: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--retrieve", default="2,4")
    ap.add_argument(
        "--axis-frames", default="", help="also time retrieval with rope=axis in these frames, e.g. stacked,ordered"
    )
    ap.add_argument(
        "--shapes",
        default="",
        help="block size:retrieve[:retrieve block[:score block[:candidates]]], e.g. 128:4,128:8:64,128:8:64:64:32 "
        "(each with its window-only run); replaces --retrieve and --axis-frames",
    )
    ap.add_argument("--hops", action="store_true", help="with --shapes: each retrieval run also with outer hops")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ctxext  # noqa: F401  (registers the attention implementation)
    from ctxext.attention.hf import CONFIG_KEY

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = dict(getattr(model.config, CONFIG_KEY))
    variants = [("window only", {"retrieve": 0, "long_range": False})]
    if args.shapes:
        variants = shape_variants(args.shapes, hops=args.hops)
    else:
        variants += [
            (f"window + retrieve {r}", {"retrieve": int(r), "long_range": False}) for r in args.retrieve.split(",")
        ]
        variants += [
            (f"window + retrieve {r}, rope axis, {frame}", {"retrieve": int(r), "long_range": False, "rope": "axis",
                                                            "retrieve_frame": frame})
            for r in args.retrieve.split(",")
            for frame in filter(None, args.axis_frames.split(","))
        ]  # fmt: skip
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        ids = held_out_ids(tokenizer, length)
        model.set_attn_implementation("sdpa")
        sdpa = timed(model, ids, args.repeats)
        model.set_attn_implementation("tensorized")
        rows.append({"length": length, "variant": "full attention (sdpa)", "seconds": sdpa, "vs_sdpa": 1.0})
        for label, settings in variants:
            setattr(model.config, CONFIG_KEY, {**base, **settings})
            seconds = timed(model, ids, args.repeats)
            row = {"length": length, "variant": label, "seconds": seconds, "vs_sdpa": seconds / sdpa}
            if settings["retrieve"]:
                sizes = union_sizes(model, ids)
                row["union_blocks_mean"] = statistics.mean(sizes)
                n = list(settings.get("block_sizes", base["block_sizes"]))[-1]
                row["far_blocks"] = (length // n - 2) * n // (settings.get("retrieve_block") or n)
            rows.append(row)
            print(json.dumps(row), flush=True)
    setattr(model.config, CONFIG_KEY, base)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
