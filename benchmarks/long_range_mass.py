"""How much attention does the long-range hop route to earlier blocks? A diagnostic for issue 8.

For a tensorized model with two axes (``N/n x n``, ``causal=complete``), the causal stream of
the outer hop at position ``p`` is a softmax over the earlier fiber entries ``p - t*n``
(``t = 1..i_0``; each carries the full local stream of its block) and the diagonal (``p``'s
own local result, scored ``q.k`` or, with ``merge=lse``, by the log-sum-exp of its local
scores). The share of that softmax on the earlier entries, the **far mass**, is the most the
long-range path can contribute at ``p``: when it is near 0, the model is a sliding window
whatever the far blocks hold.

This script captures q and k (after RoPE) of every layer in one forward pass over a passkey
document and computes the far mass per layer, averaged over the positions past the first
block, and at the position that must produce the answer. Nothing is trained.

    python benchmarks/long_range_mass.py runs/demo/smollm2-tensorized runs/demo/finetune/merged \\
        --length 2048 --out docs/bench/long_range_mass.json --plot docs/img/long_range_mass.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import ctxext  # noqa: F401  (registers the tensorized attention)
from ctxext.attention.hf import options_from_config, tensorized_attention_forward

PROBE = "tensorized-probe"
_captured: list[tuple[torch.Tensor, torch.Tensor, float]] = []


def _probe(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Record (q, k, scaling) of the layer, then run tensorized attention unchanged."""
    _captured.append((query.detach(), key.detach(), scaling if scaling is not None else query.shape[-1] ** -0.5))
    return tensorized_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def far_mass(q: torch.Tensor, k: torch.Tensor, scaling: float, opts) -> torch.Tensor:
    """Far mass of every position: q ``(Hq, N, D)``, k ``(Hkv, N, D)`` -> ``(Hq, N)`` (NaN in block 0).

    Supports two axes, ``complete`` and ``rope=absolute``, with any ``local``, ``sinks`` and
    ``merge`` (the settings of the issue's table).
    """
    if len(opts.block_sizes) != 1 or opts.rope != "absolute" or opts.causal != "complete":
        raise SystemExit("this diagnostic covers two axes, causal=complete, rope=absolute")
    hq, n_tok, d = q.shape
    k = k.repeat_interleave(hq // k.shape[0], dim=0).float()  # (Hq, N, D)
    q = q.float()
    n = opts.block_sizes[0]
    blocks = math.ceil(n_tok / n)
    pad = blocks * n - n_tok
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(hq, blocks, n, d)
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(hq, blocks, n, d)
    # Outer fibers: the same offset c in every block.  s[h, c, i, t] = q(i, c) . k(t, c)
    s_outer = torch.einsum("hicd,htcd->hcit", qp, kp) * scaling  # (Hq, n, blocks, blocks)
    i = torch.arange(blocks)
    earlier = i[None, :] < i[:, None]  # t < i
    if opts.merge != "score":  # lse / mass: the diagonal carries the log-sum-exp of its local scores
        s_local = torch.einsum("hbqd,hbkd->hbqk", qp, kp) * scaling  # (Hq, blocks, n, n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s_local = s_local.masked_fill(~causal, float("-inf"))
        first_far = 1  # blocks before this one have their sinks inside the local key range
        if opts.local == "window":  # the whole previous block too (none before block 0)
            prev = torch.einsum("hbqd,hbkd->hbqk", qp[:, 1:], kp[:, :-1]) * scaling
            prev = torch.cat([torch.full_like(s_local[:, :1], float("-inf")), prev], dim=1)
            s_local = torch.cat([prev, s_local], dim=-1)
            first_far = 2
        if opts.sinks:
            sink = torch.einsum("hbqd,hsd->hbqs", qp, k[:, : opts.sinks]) * scaling
            sink[:, :first_far] = float("-inf")
            s_local = torch.cat([sink, s_local], dim=-1)
        diag = torch.logsumexp(s_local, dim=-1).permute(0, 2, 1)  # (Hq, n, blocks)
    else:
        diag = torch.diagonal(s_outer, dim1=-2, dim2=-1)  # (Hq, n, blocks)
    if opts.merge == "mass":  # each earlier entry summarises the n slots of its block
        s_outer = s_outer + math.log(n)
    far = s_outer.masked_fill(~earlier, float("-inf"))
    lse_far = torch.logsumexp(far, dim=-1)  # (Hq, n, blocks); -inf in block 0
    total = torch.logaddexp(lse_far, diag)
    mass = torch.exp(lse_far - total)  # (Hq, n, blocks)
    mass = mass.permute(0, 2, 1).reshape(hq, blocks * n)[:, :n_tok]
    mass[:, :n] = float("nan")
    return mass


def run(model_dir: str, length: int, depth: float) -> dict:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    from ctxext.evaluate.tasks import make_sample

    AttentionInterface.register(PROBE, _probe)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    opts = options_from_config(model.config)
    sample = make_sample("passkey", tokenizer, length, depth, seed=0)
    model.set_attn_implementation(PROBE)
    _captured.clear()
    with torch.no_grad():
        model(torch.tensor([sample.input_ids]), use_cache=False)
    answer_query = sample.answer_start - 1  # predicts the first answer token
    layers = []
    for q, k, scaling in _captured:
        mass = far_mass(q[0], k[0], scaling, opts)  # (Hq, N)
        layers.append(
            {
                "mean_far_mass": float(mass[:, opts.block_sizes[0] :].nanmean()),
                "max_head_far_mass": float(mass[:, opts.block_sizes[0] :].nanmean(dim=-1).max()),
                "answer_far_mass": float(mass[:, answer_query].mean()),
            }
        )
    return {
        "model": model_dir,
        "settings": opts.to_dict(),
        "length": length,
        "passkey_depth": depth,
        "needle_position": sample.needle_position,
        "answer_query": answer_query,
        "layers": layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="converted or fine-tuned tensorized model directories")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=0.1, help="passkey depth (0.1: far before the answer)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/long_range_mass.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/long_range_mass.png"))
    args = parser.parse_args()
    results = []
    for m in args.models:
        r = run(m, args.length, args.depth)
        results.append(r)
        means = [x["mean_far_mass"] for x in r["layers"]]
        answers = [x["answer_far_mass"] for x in r["layers"]]
        print(
            f"{m}: far mass mean over layers {sum(means) / len(means):.3f} (max layer {max(means):.3f}); "
            f"at the answer query {sum(answers) / len(answers):.3f} (max layer {max(answers):.3f})"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        s = r["settings"]
        label = f"{Path(r['model']).name} (merge={s['merge']}, sinks={s['sinks']})"
        ax.plot([x["mean_far_mass"] for x in r["layers"]], marker="o", ms=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("far mass (outer hop, mean over positions)")
    ax.set_title(f"Attention routed to earlier blocks, passkey document of {args.length} tokens")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
