"""A needle's question and answer, scored from a decode cache of its haystack: how much of each
head's attention its far blocks take there, and what the answer does when that share is lowered.

    python benchmarks/far_share.py runs/study/train/retrieve-b64-c32/adapter --set rope=axis \\
        --set retrieve_candidate_share=0.5 --lengths 32k --depths 0.9 --seeds 0,1 --shorten 8k,16k \\
        --bias 0,1,2,inf --reads 4,2 --out runs/r28/far_share.json --plot runs/r28/far_share.png

Round 27 (``docs/RESULTS.md``) found that at 32k the needle is read but the first answer token
is lost, and that choosing the question's far blocks among an 8k cut's alone brings it back: the
other far blocks a long haystack offers take the question's attention. This measures that share
and tries two ways of lowering it where the question is asked, without a pass per variant:

* Each needle's haystack, up to the question's first token, is prefilled **once** into a
  :class:`ctxext.attention.cache.TensorizedCache`. Each variant then gets a copy of that cache and
  runs the question and the answer through it, teacher-forced (the answer's true tokens), so a
  variant costs a few dozen decode-cache tokens, not a 32k forward pass. The cached path equals one
  forward pass over the whole sequence (tested in ``tests/unit/test_decode.py``; the bias-0 variant
  here is compared with ``ctxext.evaluate.retrieval.teacher_forced_logprobs`` in the unit tests).
* **Far share**: in each layer, the weight of the far-block read when it merges with the local
  softmax (sinks and window): ``exp(lse_far - logaddexp(lse_local, lse_far))``, i.e. the share
  of a head's attention on its chosen far blocks; averaged over the query heads.
* ``--bias B`` (nats): from the question on, every far key's attention logit is lowered by ``B``
  (the far read's log-sum-exp minus ``B`` before the merge); ``inf`` removes the far read there.
* ``--reads K``: from the question on, each head reads only its ``K`` best far blocks (of
  ``retrieve``; the choice ranks them best first).
* ``--task passkey``: the same for a pass key in repeated noise (round 32: the 128k passkey whose
  first answer token a far bias of 1-2 nats lost), instead of a needle in Python source.

Only the question and answer change; every haystack token is computed as the model computes it.
``--shorten`` cuts the haystack from the front as ``needle_choice.py --shorten`` does (the same
local text with fewer far blocks), so a cut's far share is the baseline for the full length's.
Tensorized models with far-block retrieval only (the PyTorch backend: run on the CPU).
"""

# no `from __future__ import annotations`: the dataclasses below must resolve their annotations while
# tests load this file as a module outside sys.modules (tests/benchmark_script.py)
import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from needle_choice import group_key, group_order, group_title, shortened  # noqa: E402

from ctxext.attention.retrieve import lower_far_lse  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """What changes from the question on: far logits lowered by ``bias`` nats (``inf``: no far
    read), and at most ``reads`` far blocks read per head (None: the model's ``retrieve``)."""

    bias: float = 0.0
    reads: int | None = None

    @property
    def name(self) -> str:
        if self.reads is not None:
            return f"reads {self.reads}"
        return "no far read" if math.isinf(self.bias) else f"bias {self.bias:g}"


@dataclass
class FarReadProbe:
    """Stands in for ``ctxext.attention.decode``'s ``merge_far`` and ``far_block_index`` while
    a variant runs: applies its bias (on top of the model's ``retrieve_bias``) and read limit and
    records every layer's far share.

    ``shares``: one ``(Q,)`` tensor per layer call, the far share of each new query averaged over
    the query heads (after the bias: the share the attention receives)."""

    merge: object
    choose: object
    variant: Variant = field(default_factory=Variant)
    shares: list = field(default_factory=list)

    def merge_far(self, out_local, lse_local, out_far, lse_far, bias):
        # out: (Hq, Q, D), lse: (Hq, Q); lse_far is -inf where a query chose nothing; bias: the model's own
        lse_far = lower_far_lse(lse_far, bias + self.variant.bias)  # the model's bias (float or (Q,)) + the variant's
        share = torch.exp(lse_far - torch.logaddexp(lse_local, lse_far))  # (Hq, Q), 0 where lse_far = -inf
        self.shares.append(share.float().mean(0).cpu())
        return self.merge(out_local, lse_local, out_far, lse_far, 0.0)

    def far_block_index(self, *args, **kwargs):
        index = self.choose(*args, **kwargs)  # (B, Hq, Q, top), best first
        return index if self.variant.reads is None else index[..., : self.variant.reads]


def prefill(model, prefix: list[int]):
    """A :class:`TensorizedCache` holding ``prefix`` (no logits beyond the last token's)."""
    from ctxext.attention.cache import TensorizedCache, cache_argument

    cache = TensorizedCache(config=model.config)
    with torch.inference_mode():
        model(torch.tensor([prefix]), use_cache=True, logits_to_keep=1, **cache_argument(cache))
    return cache


def score_variant(model, cache, sample, probe: FarReadProbe, variant: Variant) -> dict:
    """The question and answer of ``sample`` through a copy of ``cache`` (which holds the tokens
    before ``sample.question_start``) under ``variant``: per answer token the log-probabilities of
    the right and the predicted token, and per layer the far share on the first answer token's
    query and over the question's tokens."""
    from ctxext.attention.cache import cache_argument

    rest = sample.input_ids[sample.question_start :]
    first = sample.answer_start - 1 - sample.question_start  # the query that predicts the first answer token
    answer = sample.input_ids[sample.answer_start :]
    probe.variant, probe.shares = variant, []
    with torch.inference_mode():
        logits = model(torch.tensor([rest]), use_cache=True, **cache_argument(copy.deepcopy(cache))).logits
    logp = logits[0, first:-1].float().log_softmax(-1)  # (A, V): query first + i predicts answer token i
    predicted = logp.argmax(-1).tolist()
    if not probe.shares:
        raise SystemExit("no far read was recorded: far_share.py needs a tensorized model with `retrieve` > 0")
    shares = torch.stack(probe.shares)  # (layers, Q)
    return {
        "variant": variant.name,
        "bias": variant.bias if not math.isinf(variant.bias) else "inf",
        "reads": variant.reads,
        "correct": predicted == answer,
        "predicted": predicted,
        "logp_right": [float(logp[i, t]) for i, t in enumerate(answer)],
        "logp_predicted": [float(logp[i, t]) for i, t in enumerate(predicted)],
        "far_share_first": shares[:, first].tolist(),  # per layer
        "far_share_question": shares[:, : first + 1].mean(1).tolist(),  # per layer, question tokens and the first query
    }


def score_needle(model, tok, sample, probe: FarReadProbe, variants: list[Variant], seed: int, cut_from=None) -> dict:
    """Every variant on one needle, from one prefill; prints a line per variant."""
    from ctxext.generation import answer_matches

    probe.variant = Variant()  # the haystack as the model computes it
    cache = prefill(model, sample.input_ids[: sample.question_start])
    scored = {"length": sample.length, "depth": sample.depth, "seed": seed, "answer": sample.answer}
    scored |= {"cut_from": cut_from} if cut_from is not None else {}
    scored["variants"] = []
    for variant in variants:
        v = score_variant(model, cache, sample, probe, variant)
        v["number_read"] = answer_matches(tok.decode(v["predicted"]), sample.answer)
        scored["variants"].append(v)
        print(
            f"{group_key(scored):>6} depth {sample.depth:.2f} seed {seed} {variant.name:>12}: "
            f"{'PASS' if v['correct'] else 'miss'} {tok.decode(v['predicted'])!r}; first token p right "
            f"{math.exp(v['logp_right'][0]):.3f}, p predicted {math.exp(v['logp_predicted'][0]):.3f}; "
            f"far share on it {100 * np.mean(v['far_share_first']):.1f}% (layer mean)",
            flush=True,
        )
    return scored


def summary(samples: list[dict]) -> dict:
    """Per group (length, cut) and variant: needles passed, numbers read, the mean p(right first
    token) and the far share on the first answer token (mean over layers and needles)."""
    out = {}
    for key in sorted({group_key(s) for s in samples}, key=group_order):
        group = [s for s in samples if group_key(s) == key]
        out[key] = {}
        for i, v in enumerate(group[0]["variants"]):
            runs = [s["variants"][i] for s in group]
            out[key][v["variant"]] = {
                "needles": len(runs),
                "passed": sum(r["correct"] for r in runs),
                "numbers_read": sum(r["number_read"] for r in runs),
                "p_right_first": float(np.mean([math.exp(r["logp_right"][0]) for r in runs])),
                "far_share_first": float(np.mean([r["far_share_first"] for r in runs])),
            }
    return out


def plot(result: dict, path: Path) -> None:
    """Left: the far share on the first answer token by layer, each length and cut (no variant).
    Right: p(right first token) against the bias, one line per needle and length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_share, ax_bias) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in result["samples"]:
        base = next((v for v in s["variants"] if v["bias"] == 0 and v["reads"] is None), None)
        label = f"{group_title(group_key(s))}, seed {s['seed']}"
        if base is not None:
            ax_share.plot(100 * np.array(base["far_share_first"]), marker=".", label=label)
        biased = [v for v in s["variants"] if v["reads"] is None]
        finite = [v for v in biased if v["bias"] != "inf"]
        p_right = [math.exp(v["logp_right"][0]) for v in finite]
        ax_bias.plot([v["bias"] for v in finite], p_right, marker="o", label=label)
    ax_share.set(xlabel="layer", ylabel="far share on the first answer token (%)", title="attention on far blocks")
    options = result.get("options", {})
    own = (
        " beyond the model's own far bias"
        if options.get("retrieve_bias") or options.get("retrieve_bias_growth")
        else ""
    )
    ax_bias.set(xlabel=f"far logits lowered by (nats), from the question on{own}", ylabel="p(right first answer token)")
    ax_bias.axhline(0.5, color="grey", lw=0.5)
    for ax in (ax_share, ax_bias):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(result["label"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_variants(biases: str, reads: str) -> list[Variant]:
    """``--bias 0,1,inf`` and ``--reads 4,2`` as variants; bias 0 (the model as it is) always first."""
    values = [float(x) for x in biases.split(",") if x]
    if any(x < 0 or math.isnan(x) for x in values):
        raise SystemExit(f"--bias: nats to lower the far logits by, 0 or more (or inf); got {biases!r}")
    counts = [int(x) for x in reads.split(",") if x]
    if any(x < 1 for x in counts):
        raise SystemExit(f"--reads: far blocks a head still reads, 1 or more; got {reads!r}")
    variants = [Variant(0.0)] + [Variant(x) for x in values if x != 0]
    return variants + [Variant(reads=k) for k in counts]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a tensorized model with far-block retrieval: adapter or model directory")
    ap.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE tensorized override")
    ap.add_argument(
        "--task",
        choices=["needle", "passkey"],
        default="needle",
        help="needle: a number in Python source (the default); passkey: a pass key in repeated noise",
    )
    ap.add_argument("--lengths", default="8k", help="comma-separated lengths (k = 1,024)")
    ap.add_argument("--depths", default="0.9", help="comma-separated needle depths in [0, 1]")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (each draws its own city, number, text)")
    ap.add_argument("--shorten", default="", help="comma-separated lengths: each needle again, cut to each")
    ap.add_argument("--bias", default="1,2,inf", help="comma-separated nats to lower the far logits by (inf: none)")
    ap.add_argument("--reads", default="", help="comma-separated far blocks each head still reads")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--label", help="the plot's title (default: the model and its --set)")
    ap.add_argument("--out", type=Path, required=True, help="JSON with every needle, variant and layer")
    ap.add_argument("--plot", type=Path, help="PNG: far share by layer; p(right first token) against the bias")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import ctxext.attention.decode as decode
    from ctxext.attention.hf import options_from_config
    from ctxext.config import parse_settings
    from ctxext.evaluate.runner import ModelEntry, load_entry, parse_length
    from ctxext.evaluate.tasks import make_sample

    variants = parse_variants(args.bias, args.reads)
    settings = parse_settings(args.settings)
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    shorten = [parse_length(x) for x in args.shorten.split(",") if x]
    if shorten and max(shorten) >= min(lengths):
        ap.error(f"--shorten: every length must be below the shortest of --lengths ({min(lengths)})")
    model, tok = load_entry(ModelEntry(args.model, args.model, settings=settings or None), torch.device("cpu"))
    opts = options_from_config(model.config) if model.config._attn_implementation == "tensorized" else None
    if opts is None or not opts.retrieve:
        raise SystemExit(f"{args.model}: far_share.py needs a tensorized model with far-block retrieval (retrieve > 0)")
    too_many = [v.reads for v in variants if v.reads is not None and v.reads >= opts.retrieve]
    if too_many:
        raise SystemExit(f"--reads {too_many[0]}: the model reads {opts.retrieve} far blocks; give fewer")
    label = args.label or " ".join([Path(args.model).name, *args.settings])
    result = {"label": label, "model": args.model, "task": args.task, "settings": settings, "options": opts.to_dict()}
    result["samples"] = []
    probe = FarReadProbe(decode.merge_far, decode.far_block_index)
    decode.merge_far, decode.far_block_index = probe.merge_far, probe.far_block_index
    try:
        for length in lengths:
            for depth in (float(x) for x in args.depths.split(",")):
                for seed in (int(x) for x in args.seeds.split(",")):
                    sample = make_sample(args.task, tok, length, depth, seed)
                    result["samples"].append(score_needle(model, tok, sample, probe, variants, seed))
                    for short in shorten:
                        cut = shortened(sample, short)
                        result["samples"].append(score_needle(model, tok, cut, probe, variants, seed, length))
    finally:
        decode.merge_far, decode.far_block_index = probe.merge, probe.choose
    result["summary"] = summary(result["samples"])
    for key, by_variant in result["summary"].items():
        for name, s in by_variant.items():
            print(
                f"{key}, {name}: {s['passed']}/{s['needles']} needles ({s['numbers_read']} numbers read); "
                f"p(right first token) {s['p_right_first']:.3f}; far share on it {100 * s['far_share_first']:.1f}%"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
