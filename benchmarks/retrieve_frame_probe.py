"""Which half of the axis frame costs retrieval its recall: the choice of blocks or the attention?

Round 4 of the quality study (docs/RESULTS.md) found that a window + sinks + ``retrieve`` model
recalls fewer records beyond its window with ``rope="axis"`` than with ``absolute`` RoPE, zero-shot
and after training, and round 5 that laying the retrieved blocks end to end
(``retrieve_frame="ordered"``) does not recover it. The retrieval path uses its frame twice: to
*choose* the far blocks (the bound on ``q . k``) and to *attend* to them. This probe sets the two
apart on a model converted with ``rope=axis`` (whose sinks and outer hops stay in the axis
frame): the torch backend chooses the blocks in the ``--choose`` frame and reads them in the
``--attend`` frame, and the recall test of ``benchmarks/quality_study.py`` runs. Nothing is
trained; the weights are not changed.

    M=runs/r4/conv/win-r4-axis   # ctxext convert smollm2 M --no-long-range --rope axis --force
    python benchmarks/retrieve_frame_probe.py $M --choose absolute --attend axis --out runs/r5/recall/a.json
    python benchmarks/retrieve_frame_probe.py $M --choose axis --attend absolute --out runs/r5/recall/b.json
    python benchmarks/retrieve_frame_probe.py $M --choose axis --attend axis --gap 1024 --out runs/r5/recall/c.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def split_frames(choose: str, attend: str, gap: int = 0) -> None:
    """Make the torch backend choose far blocks in frame ``choose`` and read them in ``attend``.

    gap: in the axis frame, move the retrieved keys ``gap`` positions further back (a slot at
    offset o sits at ``o - n - gap``): as far from the query as a far block really is, in offsets
    the model was trained on.
    """
    import torch

    import ctxext.attention.torch_backend as tb
    from ctxext.attention.rope import rerotate

    frame_of = tb.selection_frame
    select = tb.far_block_index
    inputs: dict = {}

    def in_frame(frame: str):
        o = dataclasses.replace(inputs["opts"], rope=frame)
        qs, ks = frame_of(inputs["q"], inputs["k"], inputs["positions"], o, inputs["inv_freq"], inputs["n"])
        if frame == "axis" and gap:
            ks = rerotate(ks, torch.tensor(-float(gap)), inputs["inv_freq"])
        return qs, ks

    def attending(q, k, positions, opts, inv_freq, n):  # the frame retrieved_attention reads in
        if opts.rope != "axis":
            raise SystemExit("convert the model with --rope axis: the probe needs its RoPE frequencies")
        inputs.update(q=q, k=k, positions=positions, opts=opts, inv_freq=inv_freq, n=n)
        return in_frame(attend)

    def choosing(qs, ks, key_ok, opts, n, *rest):
        return select(*in_frame(choose), key_ok, opts, n, *rest)

    tb.selection_frame, tb.far_block_index = attending, choosing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a tensorized model converted with --rope axis and retrieve > 0")
    ap.add_argument("--choose", choices=("absolute", "axis"), required=True, help="the frame blocks are chosen in")
    ap.add_argument("--attend", choices=("absolute", "axis"), required=True, help="the frame they are read in")
    ap.add_argument("--gap", type=int, default=0, help="axis frame: retrieved keys this many positions further back")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    from quality_study import recall_one

    split_frames(args.choose, args.attend, args.gap)
    recall_one(args.model, args.out, args.blocks, args.length, args.records, args.window)


if __name__ == "__main__":
    main()
