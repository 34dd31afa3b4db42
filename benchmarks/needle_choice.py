"""Needle in a haystack, token by token: which answer tokens a retrieval model reads right, and
whether the far block it had to read each one from was chosen.

    python benchmarks/needle_choice.py runs/study/train/retrieve-b64/adapter --set rope=axis \\
        --lengths 2k,8k --depths 0.1,0.5,0.9 --seeds 0,1 --out runs/r12/needle_choice.json \\
        --plot runs/r12/needle_choice.png
    python benchmarks/needle_choice.py --overlay bound=runs/r12/nc-base.json exact=runs/r12/nc-exact.json \\
        --plot docs/study/round12/needle_choice_layers.png   # runs side by side, no model

``ctxext eval --tasks needle`` says whether a sample passed; this says why one failed. For each
(length, depth, seed) the eval's own needle sample (``ctxext.evaluate.tasks.make_sample``: "The
special magic number for {city} is {7 digits}" in real text) runs once through the model,
teacher-forced (each answer token predicted after the right ones before it, as the eval scores),
while every layer's far-block choice is recorded (``torch_backend.far_block_index``, as
``recall_misses.py`` does: the PyTorch backend, so run it on the CPU). The query that predicts
answer token ``i`` has to copy token ``i`` of the number in the needle sentence; its **chosen
share** is the share of (layer, query head) pairs whose choice held that token's block of
``retrieve_block`` slots. A wrong token with a chosen share like the right ones' was read wrong;
one with a low share was not found, and a larger or better choice would help it.

``--set KEY=VALUE`` overrides tensorized settings at load time as ``ctxext eval --set`` does (e.g.
``retrieve=16`` or ``retrieve_frame=ordered`` on a model trained with 8 stacked blocks), so the
same needles can be compared under several choices. ``--set retrieve_score_block=S`` scores a far
block by the largest bound on ``q . k`` over its sub-blocks of S slots instead of one bound over
the whole block: tighter as S shrinks, and at S = 1 the exact maximum of ``q . k`` over its keys
(an oracle that costs as much as full attention): would a better score with the same number of
blocks find the needle? ``--set retrieve_candidates=C`` chooses in two stages (the bound proposes
C far blocks, the exact ``max q . k`` over their keys picks the read ones): does it find what the
oracle finds?

``--read-needle`` is a different oracle: every (layer, query head) pair reads the needle's far
block(s) on the answer's queries (where its own choice left them out, they replace its last pick),
while the recorded chosen share stays the model's own. If a token the model missed comes right
when every head reads the needle, the choice lost it; if it stays wrong, reading it there was not
enough. ``--read-needle question`` forces the read from the question's first token on, so the
question's own tokens (the city's name) read the needle too.

``--choose-recent LENGTH`` asks whether the far blocks a long haystack adds hurt where the
question is asked: from the question's first token on, far blocks are chosen as if the haystack
had been cut to LENGTH (``--shorten``): only the keys such a cut keeps (the instruction and the
haystack's last tokens) are retrievable there, while every earlier token chooses from the whole
haystack as before. Here
the recorded chosen share is that of the choice the attention receives.
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

from recall_misses import ChoiceRecorder, chosen_share, is_far  # noqa: E402


def copy_sources(input_ids: list[int], needle_position: int, answer_start: int) -> list[int]:
    """Index in ``input_ids`` of the needle token each answer token copies.

    The answer tokens (``input_ids[answer_start:]``) appear once, in order, in the needle
    sentence that starts at ``needle_position``: the first occurrence after it is the source.
    """
    answer = input_ids[answer_start:]
    for start in range(needle_position, answer_start - len(answer) + 1):
        if input_ids[start : start + len(answer)] == answer:
            return list(range(start, start + len(answer)))
    raise ValueError(f"the answer tokens {answer} do not occur after the needle at {needle_position}")


class NeedleReader:
    """Wraps the far-block choice (``choose(qs, ks, key_ok, opts, ...)`` -> ``(B, Hq, L, top)``
    block numbers): on the query slots ``rows`` every head reads the far ``blocks`` too; for each
    one missing from a head's pick, its last other pick is dropped. Off while ``blocks`` is empty."""

    rows: torch.Tensor | None = None
    blocks: tuple[int, ...] = ()

    def __init__(self, choose, from_question: bool = False):
        self.choose, self.from_question = choose, from_question  # rows: the answer's queries, or from the question

    def __call__(self, qs, ks, key_ok, opts, *rest):
        index = self.choose(qs, ks, key_ok, opts, *rest)
        if not self.blocks:
            return index
        if len(self.blocks) > index.shape[-1]:
            raise SystemExit(
                f"--read-needle: the answer spans far blocks {self.blocks}, more than the {index.shape[-1]} read"
            )
        picked = index[:, :, self.rows]  # (B, Hq, R, top)
        forced = torch.tensor(self.blocks, dtype=index.dtype, device=index.device)
        is_forced = torch.isin(picked, forced)
        own = picked.gather(-1, torch.argsort(is_forced.int(), dim=-1, stable=True))  # its other picks first, in order
        keep = own[..., : picked.shape[-1] - len(self.blocks)]  # drops its last picks, one per block it lacked
        index = index.clone()
        index[:, :, self.rows] = torch.cat([keep, forced.expand(*keep.shape[:-1], len(self.blocks))], dim=-1)
        return index


class RecentChooser:
    """Wraps the far-block choice (``choose(qs, ks, key_ok, opts, n)``, a whole forward pass): on the
    query slots from ``first_row`` on, blocks are chosen again by ``fresh`` (the unwrapped choice)
    with only the keys before ``filler_start`` or from ``first_key`` on retrievable. ``keep``: the
    cut haystack's length in tokens. Off while ``first_row`` is None."""

    first_row: int | None = None
    first_key: int = 0
    filler_start: int = 0

    def __init__(self, fresh, keep: int):
        self.fresh, self.keep = fresh, keep

    def __call__(self, qs, ks, key_ok, opts, n):
        index = self.fresh(qs, ks, key_ok, opts, n)  # (B, Hq, L, top)
        if self.first_row is None:
            return index
        slots = torch.arange(self.first_row, qs.shape[2], device=qs.device)  # (R,)
        position = torch.arange(ks.shape[2], device=ks.device)
        recent = key_ok & ((position >= self.first_key) | (position < self.filler_start))[None]  # (B, L)
        index = index.clone()
        index[:, :, slots] = self.fresh(qs[:, :, slots], ks, recent, opts, n, q_slots=slots)
        return index


def score_sample(
    model,
    sample,
    recorder: ChoiceRecorder | None,
    opts,
    reader: NeedleReader | None = None,
    recent: RecentChooser | None = None,
) -> dict:
    """One needle: the prediction, log-probabilities and chosen share of every answer token
    (without a ``recorder``, a model without far-block retrieval: ``far`` and the shares None)."""
    from ctxext.evaluate.retrieval import teacher_forced_logprobs

    answer = sample.input_ids[sample.answer_start :]
    queries = list(range(sample.answer_start - 1, len(sample.input_ids) - 1))  # query i predicts answer token i
    sources = copy_sources(sample.input_ids, sample.needle_position, sample.answer_start)
    if recorder is not None:
        n, m, window = opts.block_sizes[-1], opts.retrieval_block, opts.local == "window"
        recorder.rows = torch.tensor(queries)
        recorder.calls.clear()
    if reader is not None:  # every head reads the blocks the answer is copied from
        rows = range(sample.question_start, len(sample.input_ids) - 1) if reader.from_question else queries
        reader.rows, reader.blocks = torch.tensor(list(rows)), tuple(sorted({source // m for source in sources}))
    if recent is not None:  # from the question on, choose among the far blocks a cut haystack would hold
        recent.first_row, recent.filler_start = sample.question_start, sample.filler_start
        recent.first_key = max(sample.filler_start, len(sample.input_ids) - recent.keep + sample.filler_start)
    with torch.inference_mode():
        logp = teacher_forced_logprobs(model, sample.input_ids, sample.answer_start)  # (A, V)
    predicted = logp.argmax(-1).tolist()
    if recorder is not None and not recorder.calls:
        raise SystemExit("no far-block choice was recorded: the model must run on the PyTorch backend (CPU)")
    tokens = []
    for i, (query, source) in enumerate(zip(queries, sources)):
        share, per_layer = chosen_share(recorder.calls, i, [source // m]) if recorder is not None else (None, None)
        tokens.append(
            {
                "query": query,
                "source": source,
                "distance": query - source,
                "far": is_far((source, source + 1), query, n, m, window) if recorder is not None else None,
                "correct": predicted[i] == answer[i],
                "logp_right": float(logp[i, answer[i]]),  # nats; the predicted token's below
                "logp_predicted": float(logp[i, predicted[i]]),
                "chosen_share": share,
                "per_layer": per_layer,
            }
        )
    return {
        "length": sample.length,
        "depth": sample.depth,
        "answer": sample.answer,
        "correct": predicted == answer,
        "tokens": tokens,
        "predicted": predicted,
        "layers": len(recorder.calls) if recorder is not None else None,
        **({"read_needle_blocks": list(reader.blocks), "read_needle_from": int(reader.rows[0])} if reader else {}),
        **({"choose_recent_from_key": recent.first_key} if recent else {}),
    }


def shortened(sample, length: int):
    """``sample`` with its haystack cut from the front to ``length`` tokens in all: the BOS and the
    instruction, the needle, the question and every token between them stay as they were, so a
    needle missed at its length can be scored with fewer far blocks to choose from and the same
    local text around the needle and the question."""
    import dataclasses

    cut = len(sample.input_ids) - length
    if cut <= 0 or sample.needle_position - cut < sample.filler_start:
        raise SystemExit(
            f"--shorten {length}: a needle at token {sample.needle_position} of {len(sample.input_ids)} keeps "
            f"{sample.needle_position - sample.filler_start} filler tokens before it; give a length between "
            f"{len(sample.input_ids) - (sample.needle_position - sample.filler_start)} and {len(sample.input_ids) - 1}"
        )
    ids, start = sample.input_ids, sample.filler_start
    return dataclasses.replace(
        sample,
        input_ids=ids[:start] + ids[start + cut :],
        answer_start=sample.answer_start - cut,
        question_start=sample.question_start - cut,
        needle_position=sample.needle_position - cut,
        length=length,
    )


def group_key(sample: dict) -> str:
    """A scored needle's group: its length, and the length it was cut from (``--shorten``)."""
    cut_from = sample.get("cut_from")
    return str(sample["length"]) if cut_from is None else f"{sample['length']} cut from {cut_from}"


def group_order(key: str) -> tuple[int, int]:
    """Sort key for :func:`group_key` strings: by length, then the length cut from (0: not cut)."""
    length, _, cut_from = key.partition(" cut from ")
    return int(length), int(cut_from or 0)


def group_title(key: str) -> str:
    """A :func:`group_key` string for a plot title, e.g. ``8,192 tokens (cut from 32,768)``."""
    length, _, cut_from = key.partition(" cut from ")
    return f"{int(length):,} tokens" + (f" (cut from {int(cut_from):,})" if cut_from else "")


def summary(samples: list[dict]) -> dict:
    """Per length: needles passed, numbers read to every digit (None for JSONs from before round 23),
    far answer tokens right, and the chosen share of right / wrong ones."""
    out = {}
    for key in sorted({group_key(s) for s in samples}, key=group_order):
        group = [s for s in samples if group_key(s) == key]
        far = [t for s in group for t in s["tokens"] if t["far"]]
        right = [t["chosen_share"] for t in far if t["correct"]]
        wrong = [t["chosen_share"] for t in far if not t["correct"]]
        out[key] = {
            "needles": len(group),
            "passed": sum(s["correct"] for s in group),
            "numbers_read": sum(s["number_read"] for s in group) if all("number_read" in s for s in group) else None,
            "far_tokens": len(far),
            "far_tokens_right": len(right),
            "chosen_share_right": float(np.mean(right)) if right else None,
            "chosen_share_wrong": float(np.mean(wrong)) if wrong else None,
            "wrong_under_10pct": sum(x < 0.10 for x in wrong),
        }
    return out


def plot(result: dict, path: Path) -> None:
    """Per length, share of heads choosing the copied token's block, by layer: right vs wrong tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({group_key(s) for s in result["samples"]}, key=group_order)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        far = [t for s in result["samples"] if group_key(s) == key for t in s["tokens"] if t["far"]]
        for name, color, want in (("right", "tab:blue", True), ("wrong", "tab:red", False)):
            group = [t["per_layer"] for t in far if t["correct"] == want]
            if group:
                ax.plot(100 * np.mean(group, axis=0), "o-", color=color, ms=3, label=f"{name} ({len(group)} tokens)")
        ax.set(title=group_title(key), xlabel="layer", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("% of heads choosing the needle token's block")
    fig.suptitle(f"{result['label']}: needle answer tokens, chosen share by layer")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def overlay(named: list[str], path: Path) -> dict:
    """Several saved runs (``LABEL=JSON``) in one figure: per length, the mean chosen share of the
    needle's far answer tokens by layer, and each run's needles passed. A label given twice joins
    its runs (e.g. one JSON per length), so one choice keeps one color. Returns the summaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for item in named:
        label, sep, file = item.partition("=")
        if not sep or not Path(file).is_file():
            raise SystemExit(f"--overlay: expected LABEL=JSON of an earlier run, got {item!r}")
        run = json.loads(Path(file).read_text())
        if label in runs:  # the same choice at other lengths (or more seeds): one line, one summary
            run = {**run, "samples": runs[label]["samples"] + run["samples"]}
            run["summary"] = summary(run["samples"])
        runs[label] = run
    keys = sorted({group_key(s) for r in runs.values() for s in r["samples"]}, key=group_order)
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        for color, (label, run) in enumerate(runs.items()):
            far = [t["per_layer"] for s in run["samples"] if group_key(s) == key for t in s["tokens"] if t["far"]]
            if far:
                s = run["summary"][key]
                name = (
                    f"{label}: {s['passed']}/{s['needles']} needles, {s['far_tokens_right']}/{s['far_tokens']} tokens"
                )
                ax.plot(100 * np.mean(far, axis=0), "o-", ms=3, color=f"C{color}", label=name)  # one color per run
        ax.set(title=group_title(key), xlabel="layer", ylim=(-2, 102))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("% of heads choosing the needle token's block")
    fig.suptitle("needle answer tokens beyond the window: chosen share by layer")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {label: run["summary"] for label, run in runs.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "model",
        nargs="?",
        help="a model: adapter or model directory, or a source (without far-block retrieval: predictions only)",
    )
    ap.add_argument("--set", dest="settings", action="append", default=[], help="KEY=VALUE tensorized override")
    ap.add_argument("--lengths", default="2k,8k", help="comma-separated lengths (k = 1,024)")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated needle depths in [0, 1]")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (each draws its own city, number, text)")
    ap.add_argument("--label", help="name in the plot title (default: the model and its --set)")
    ap.add_argument(
        "--read-needle",
        nargs="?",
        const="answer",
        choices=("answer", "question"),
        help="oracle: every head also reads the needle's far block(s) on the answer's queries "
        "(answer, the default) or from the question's first token on (question)",
    )
    ap.add_argument(
        "--choose-recent",
        default="",
        metavar="LENGTH",
        help="from the question on, choose far blocks only among those a haystack cut to LENGTH would hold",
    )
    ap.add_argument(
        "--shorten",
        default="",
        help="comma-separated lengths: each needle is scored again with its haystack cut from the front to each",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, help="JSON with every needle and token (required with a model)")
    ap.add_argument("--overlay", nargs="+", metavar="LABEL=JSON", help="draw saved runs side by side into --plot")
    ap.add_argument("--plot", type=Path, help="PNG: chosen share by layer, right vs wrong tokens")
    args = ap.parse_args(argv)
    if args.overlay:
        if not args.plot:
            ap.error("--overlay draws into --plot PNG; give one")
        return overlay(args.overlay, args.plot)
    if not args.model or not args.out:
        ap.error("give a MODEL and --out (or --overlay LABEL=JSON ... --plot PNG)")
    if args.threads:
        torch.set_num_threads(args.threads)

    import ctxext.attention.torch_backend as tb
    from ctxext.attention.hf import options_from_config
    from ctxext.config import parse_settings
    from ctxext.evaluate.runner import ModelEntry, load_entry, parse_length
    from ctxext.evaluate.tasks import make_sample

    settings = parse_settings(args.settings)
    shorten = [parse_length(x) for x in args.shorten.split(",") if x]
    lengths = [parse_length(x) for x in args.lengths.split(",")]
    keep = parse_length(args.choose_recent) if args.choose_recent else None
    if keep is not None and (args.read_needle or shorten):
        ap.error("--choose-recent is an oracle of its own: give it without --read-needle and --shorten")
    if shorten and max(shorten) >= min(lengths):
        ap.error(f"--shorten: every length must be below the shortest of --lengths ({min(lengths)})")
    model, tok = load_entry(ModelEntry(args.model, args.model, settings=settings or None), torch.device("cpu"))
    opts = options_from_config(model.config) if model.config._attn_implementation == "tensorized" else None
    choosing = opts is not None and bool(opts.retrieve)
    if not choosing:
        if args.read_needle or keep:
            raise SystemExit(f"{args.model}: --read-needle and --choose-recent need a model with far-block retrieval")
        print(f"{args.model}: no far-block retrieval, so no choice to record: predictions and log-probabilities only")
    forced = [f"--read-needle {args.read_needle}"] if args.read_needle else []
    forced += [f"--choose-recent {args.choose_recent}"] if keep else []
    label = args.label or " ".join([Path(args.model).name, *args.settings, *forced])
    options = opts.to_dict() if opts is not None else None
    result = {"label": label, "model": args.model, "settings": settings, "options": options, "samples": []}
    recent = RecentChooser(tb.far_block_index, keep) if keep else None
    recorder = ChoiceRecorder(recent or tb.far_block_index) if choosing else None
    reader = NeedleReader(recorder, args.read_needle == "question") if args.read_needle else None
    if recorder is not None:
        tb.far_block_index = reader or recorder
    try:
        for length in lengths:
            for depth in (float(x) for x in args.depths.split(",")):
                for seed in (int(x) for x in args.seeds.split(",")):
                    sample = make_sample("needle", tok, length, depth, seed)
                    result["samples"].append(
                        _score_and_report(model, tok, sample, seed, recorder, opts, reader, recent)
                    )
                    for short in shorten:
                        cut = shortened(sample, short)
                        scored = _score_and_report(model, tok, cut, seed, recorder, opts, reader, cut_from=length)
                        result["samples"].append(scored)
    finally:
        if recorder is not None:
            tb.far_block_index = recent.fresh if recent is not None else recorder.choose
    result["summary"] = summary(result["samples"])
    for length, s in result["summary"].items():
        print(
            f"{length}: {s['passed']}/{s['needles']} needles ({s['numbers_read']} numbers read to every digit); "
            f"far tokens right {s['far_tokens_right']}/{s['far_tokens']}, "
            f"chosen share right {_pct(s['chosen_share_right'])}, wrong {_pct(s['chosen_share_wrong'])} "
            f"({s['wrong_under_10pct']} wrong under 10%)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(result, args.plot)
    return result


def _score_and_report(
    model, tok, sample, seed: int, recorder, opts, reader, recent=None, cut_from: int | None = None
) -> dict:
    """Score one needle (:func:`score_sample`), print its line, and return it with its seed."""
    from ctxext.generation import answer_matches

    scored = {"seed": seed, **score_sample(model, sample, recorder, opts, reader, recent)}
    if cut_from is not None:
        scored["cut_from"] = cut_from
    # the digits alone, by `ctxext eval --scoring generate`'s rule: a needle "missed" for a newline
    # where it has a space (round 23) reads here
    scored["number_read"] = answer_matches(tok.decode(scored["predicted"]), sample.answer)
    far = [t for t in scored["tokens"] if t["far"]]
    first = scored["tokens"][0]
    choice = (
        f"; far tokens right {sum(t['correct'] for t in far)}/{len(far)}, chosen share "
        + " ".join(f"{100 * t['chosen_share']:.0f}{'' if t['correct'] else '!'}" for t in far)
        if recorder is not None
        else ""
    )
    print(
        f"{group_key(scored):>6} depth {sample.depth:.2f} seed {seed}: {'PASS' if scored['correct'] else 'miss'} "
        f"answer {sample.answer!r} predicted {tok.decode(scored['predicted'])!r}{choice}; first token p right "
        f"{math.exp(first['logp_right']):.3f}, p predicted {math.exp(first['logp_predicted']):.3f}",
        flush=True,
    )
    return scored


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


if __name__ == "__main__":
    main()
