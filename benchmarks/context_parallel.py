"""Context-parallel tensorized attention: communication volume, and a SIMULATION of step time.

Three parts (``python benchmarks/context_parallel.py --help``):

1. **Volume** (exact, from the sharding code): bytes each rank sends per layer through the
   all-to-alls of ``ctxext.attention.context_parallel`` (the outermost hop's sequence-to-head
   exchange and the way back, plus the sink/halo exchange), for a model's head shapes, against
   the size of the layer's input activation on that rank, and against plain DeepSpeed Ulysses
   (all-to-all of q, k, v and of the output).
2. **Check** (measured): 2 gloo processes run the operator forward and backward on a small
   sequence while every ``all_to_all_single`` call is counted; the counted bytes must equal
   the formula of part 1 (forward), and backward must send the same volume again.
3. **Simulation** (not a measurement): time per training step of one sequence on 1 vs R GPUs
   at 128k tokens and beyond, from a FLOP model (dense layers and tensorized attention),
   assumed device throughputs (``--dense-tflops``, ``--attn-tflops``: no GPU was measured)
   and link bandwidths (NVLink 450 GB/s, PCIe 32 GB/s, InfiniBand 50 GB/s per GPU). The FLOP
   model's scaling with N is checked against the torch backend timed on the local device at
   small sizes (``--calibrate``).

Writes a markdown section (``--out docs/results_context_parallel.md``) and prints it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ctxext.attention.context_parallel import (  # noqa: E402
    _extra_ranges,
    head_ranges,
    kv_range,
    shard_blocks,
)
from ctxext.attention.layout import compact_axes  # noqa: E402
from ctxext.attention.options import TensorizedOptions  # noqa: E402

LINKS = {"NVLink 4 (H100 SXM)": 450e9, "InfiniBand NDR 400 Gb/s": 50e9, "PCIe 4 x16": 32e9}  # bytes/s per GPU


@dataclass(frozen=True)
class Shapes:
    """What the simulation needs of a model."""

    name: str
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    layer_params: float  # weights of one decoder layer (attention projections + MLP)
    head_params: float  # LM head (and embeddings, which cost no FLOPs)


MODELS = {
    "llama-3.1-8b": Shapes(
        "Llama-3.1-8B", 32, 4096, 32, 8, 128, 4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336, 4096 * 128256
    ),
    "smollm2-135m": Shapes("SmolLM2-135M", 30, 576, 9, 3, 64, 576 * (2 * 576 + 2 * 192) + 3 * 576 * 1536, 576 * 49152),
}


# ---------------------------------------------------------------- 1. volume (mirrors context_parallel.py)


def exchange_bytes(n_tokens: int, world: int, shapes: Shapes, opts: TensorizedOptions, bytes_per: int = 4):
    """Bytes each rank sends to *other* ranks in one forward call of the operator (one layer).

    Returns a list over ranks of ``{"extras", "to_heads", "to_sequence"}``. ``bytes_per`` is
    the element size the operator communicates in: it computes (and sends) in float32 even for
    bf16 models, so 4 is what the code does today; 2 is what a bf16 exchange would send.
    """
    axes = compact_axes(n_tokens, opts.block_sizes)
    span, inner = math.prod(axes[1:]), axes[-1]
    blocks = shard_blocks(n_tokens, world, opts.block_sizes)
    slots = [(b0 * span, b1 * span) for b0, b1 in blocks]
    hq, hkv, d = shapes.q_heads, shapes.kv_heads, shapes.head_dim
    heads = head_ranges(hq, world)
    kv = [kv_range(h, hq // hkv) for h in heads]
    complete = opts.causal == "complete"
    lse = opts.merge == "lse"
    width = d * (3 if complete else 2) + lse  # q, C, F (complete) and lse_C (merge=lse) per query head
    sinks = min(opts.sinks, n_tokens)
    needs = (
        [_extra_ranges(s, sinks, opts.local == "window", inner) for s, _ in slots]
        if sinks or opts.local == "window"
        else None
    )
    out = []
    for r, (s, e) in enumerate(slots):
        ls = e - s
        extras = 0
        if needs is not None:
            for dest, wanted in enumerate(needs):
                if dest != r:
                    extras += sum(max(0, min(hi, e) - max(lo, s)) for lo, hi in wanted) * (2 * hkv * d + 1)
        to_heads = sum(
            (h1 - h0) * ls * width + (k1 - k0) * ls * d
            for dest, ((h0, h1), (k0, k1)) in enumerate(zip(heads, kv))
            if dest != r
        )
        mine = heads[r][1] - heads[r][0]
        to_seq = sum(mine * (e2 - s2) * d for dest, (s2, e2) in enumerate(slots) if dest != r)
        if not opts.long_range:
            to_heads = to_seq = 0
        out.append({"extras": extras * bytes_per, "to_heads": to_heads * bytes_per, "to_sequence": to_seq * bytes_per})
    return out


def ulysses_bytes(n_tokens: int, world: int, shapes: Shapes, bytes_per: int = 2) -> float:
    """Bytes per rank per layer of plain Ulysses: all-to-all q, k, v in, the output back (even split)."""
    ns = n_tokens / world
    frac = (world - 1) / world
    return ns * frac * (2 * shapes.q_heads + 2 * shapes.kv_heads) * shapes.head_dim * bytes_per


def volume_table(shapes: Shapes, opts: TensorizedOptions, lengths, worlds) -> list[str]:
    rows = [
        "| N | ranks | sent per rank per layer, fp32 as implemented (MB) | of which outer hop (MB) | "
        "sinks/halo (MB) | / layer input shard (bf16) | plain Ulysses, bf16 (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in lengths:
        for world in worlds:
            per_rank = exchange_bytes(n, world, shapes, opts)
            worst = max(per_rank, key=lambda x: sum(x.values()))
            total = sum(worst.values())
            activation = n / world * shapes.hidden * 2  # the layer's input hidden states on a rank, bf16
            outer = worst["to_heads"] + worst["to_sequence"]
            ulysses = ulysses_bytes(n, world, shapes)
            rows.append(
                f"| {_k(n)} | {world} | {total / 1e6:,.0f} | {outer / 1e6:,.0f} | {worst['extras'] / 1e6:.2f} | "
                f"{total / activation:.1f}x | {ulysses / 1e6:,.0f} |"
            )
    return rows


# ---------------------------------------------------------------- 2. check against a real gloo run


def _count_worker(rank, world, port, n, shapes_args, opts_dict, out_dir):
    import torch.distributed as dist

    from ctxext.attention import collectives
    from ctxext.attention.context_parallel import context_parallel_attention, shard_ranges

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=_dt.timedelta(seconds=60))
    sent = {"forward": 0, "backward": 0}
    phase = {"now": "forward"}
    original = dist.all_to_all_single

    def counting(output, inp, output_split_sizes=None, input_split_sizes=None, group=None):
        sizes = input_split_sizes
        sent[phase["now"]] += (sum(sizes) - sizes[rank]) * inp.element_size()
        return original(output, inp, output_split_sizes, input_split_sizes, group=group)

    collectives.dist.all_to_all_single = counting
    hq, hkv, d = shapes_args
    opts = TensorizedOptions.from_dict(opts_dict)
    s, e = shard_ranges(n, world, opts.block_sizes)[rank]
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(1, hq, e - s, d, generator=g, requires_grad=True)
    k = torch.randn(1, hkv, e - s, d, generator=g, requires_grad=True)
    v = torch.randn(1, hkv, e - s, d, generator=g, requires_grad=True)
    out = context_parallel_attention(q, k, v, opts)
    phase["now"] = "backward"
    out.sum().backward()
    torch.save(sent, Path(out_dir) / f"sent{rank}.pt")
    dist.destroy_process_group()


def check_volume(n: int, world: int, shapes: Shapes, opts: TensorizedOptions, tmp: Path) -> list[str]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (world, port, n, (shapes.q_heads, shapes.kv_heads, shapes.head_dim), opts.to_dict(), str(tmp))
    mp.start_processes(_count_worker, args=args, nprocs=world, start_method="fork")
    formula = exchange_bytes(n, world, shapes, opts)
    rows = ["| rank | formula, forward (bytes) | counted, forward | counted, backward |", "|---|---|---|---|"]
    sent = [torch.load(tmp / f"sent{r}.pt") for r in range(world)]
    for r in range(world):
        want = sum(formula[r].values())
        rows.append(f"| {r} | {want:,} | {sent[r]['forward']:,} | {sent[r]['backward']:,} |")
        if sent[r]["forward"] != want:
            raise SystemExit(f"volume check failed on rank {r}: formula {want}, counted {sent[r]}")
    # Backward sends each rank what it received in forward: the same total, per rank the reverse.
    if sum(x["backward"] for x in sent) != sum(x["forward"] for x in sent):
        raise SystemExit(f"backward volume differs from forward: {sent}")
    return rows


# ---------------------------------------------------------------- 3. FLOP model, calibration, simulation


def hop_flops(n_tokens: int, heads: int, head_dim: int, opts: TensorizedOptions) -> list[float]:
    """Forward FLOPs of each hop (local first) for one layer: ``4 N D n_j`` per head and stream.

    ``complete`` computes two streams in every hop but the last, which needs only the causal one.
    """
    axes = compact_axes(n_tokens, opts.block_sizes)
    two = 2 if opts.causal == "complete" else 1
    streams = [1 if j == 0 else two for j in range(len(axes))]
    return [4.0 * n_tokens * head_dim * axes[j] * heads * streams[j] for j in reversed(range(len(axes)))]


def attention_flops(n_tokens: int, heads: int, head_dim: int, opts: TensorizedOptions) -> float:
    """Forward FLOPs of tensorized attention for one layer (all hops)."""
    return sum(hop_flops(n_tokens, heads, head_dim, opts))


def _median_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def calibrate(shapes: Shapes, opts: TensorizedOptions, lengths) -> tuple[list[str], dict]:
    """Time the torch backend's local and outermost hop (forward) on this device; rate per hop and N."""
    from ctxext.attention.torch_backend import _local_hop, _outer_hop

    rows = [
        "| N | local hop (ms) | local GFLOP | local GFLOP/s | outer hop (ms) | outer GFLOP | outer GFLOP/s |",
        "|---|---|---|---|---|---|---|",
    ]
    growth = {}
    first = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # contention-robust on a shared machine
    for n in lengths:
        axes = compact_axes(n, opts.block_sizes)
        if len(axes) != 2 or math.prod(axes) != n:
            raise SystemExit(f"--calibrate lengths must be multiples of one inner block {opts.block_sizes}")
        q = torch.randn(1, shapes.q_heads, n, shapes.head_dim) * shapes.head_dim**-0.5
        k = torch.randn(1, shapes.kv_heads, n, shapes.head_dim)
        v = torch.randn_like(k)
        pos = torch.arange(n, dtype=torch.float32)[None]
        with torch.no_grad():
            C, _, F, _ = _local_hop(q, k, v, None, pos, opts, None, None, axes[-1], False)
            t_local = _median_time(lambda: _local_hop(q, k, v, None, pos, opts, None, None, axes[-1], False))
            t_outer = _median_time(lambda: _outer_hop(q, k, C, None, F, None, None, axes, 0, opts, None, True, False))
        f_local, f_outer = hop_flops(n, shapes.q_heads, shapes.head_dim, opts)
        rows.append(
            f"| {_k(n)} | {t_local * 1e3:.1f} | {f_local / 1e9:.2f} | {f_local / t_local / 1e9:.1f} | "
            f"{t_outer * 1e3:.1f} | {f_outer / 1e9:.2f} | {f_outer / t_outer / 1e9:.1f} |"
        )
        now = (n, t_local, t_outer, f_local, f_outer)
        first = first or now
        growth = {
            "n": now[0] / first[0],
            "local_time": now[1] / first[1],
            "outer_time": now[2] / first[2],
            "local_flops": now[3] / first[3],
            "outer_flops": now[4] / first[4],
        }
    torch.set_num_threads(threads)
    return rows, growth


def step_time(n: int, world: int, shapes: Shapes, opts: TensorizedOptions, link_bps: float, args) -> dict:
    """Simulated seconds for one LoRA training step of one sequence (forward, recompute, backward).

    Compute per rank: dense ``2 * params * N`` FLOPs per forward, x3 (forward, checkpoint
    recompute, activation gradients; LoRA skips most weight gradients); attention forward
    FLOPs x4 (its backward costs about two forwards); both split evenly over ranks (query
    heads rounded up). Communication: the forward exchange x3 (forward, recompute, backward
    sends the same bytes back) at ``link_bps`` per rank plus ``args.latency`` per all-to-all,
    not overlapped with compute (conservative).
    """
    dense = 3 * 2 * (shapes.layer_params * shapes.layers + shapes.head_params) * n
    heads_share = math.ceil(shapes.q_heads / world) / shapes.q_heads
    attn = 4 * attention_flops(n, shapes.q_heads, shapes.head_dim, opts) * shapes.layers
    compute = dense / world / (args.dense_tflops * 1e12) + attn * heads_share / (args.attn_tflops * 1e12)
    comm = 0.0
    if world > 1:
        per_rank = exchange_bytes(n, world, shapes, opts, bytes_per=args.comm_bytes)
        worst = max(sum(x.values()) for x in per_rank)
        collectives = 3 * (2 + (1 if opts.sinks or opts.local == "window" else 0))
        comm = shapes.layers * (3 * worst / link_bps + collectives * args.latency)
    return {"compute": compute, "comm": comm, "total": compute + comm}


def simulation_table(shapes: Shapes, opts: TensorizedOptions, lengths, worlds, args) -> tuple[list[str], dict]:
    """The table rows and, per link, the communication shares of the step it produced."""
    shares: dict[str, list[float]] = {name: [] for name in LINKS}
    rows = [
        "| N | GPUs | link | compute (s) | all-to-all (s) | step (s) | speedup vs 1 GPU | comm share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in lengths:
        one = step_time(n, 1, shapes, opts, 1.0, args)
        rows.append(f"| {_k(n)} | 1 | - | {one['compute']:.2f} | 0 | {one['total']:.2f} | 1.00x | - |")
        for world in worlds:
            if world == 1:
                continue
            for name, bps in LINKS.items():
                t = step_time(n, world, shapes, opts, bps, args)
                shares[name].append(t["comm"] / t["total"])
                rows.append(
                    f"| {_k(n)} | {world} | {name} | {t['compute']:.2f} | {t['comm']:.2f} | {t['total']:.2f} | "
                    f"{one['total'] / t['total']:.2f}x | {t['comm'] / t['total']:.0%} |"
                )
    return rows, shares


# ---------------------------------------------------------------- report


def _scaling_note(g: dict) -> str:
    """What the measured growth says about scaling hop times by FLOPs."""
    notes = []
    for hop in ("local", "outer"):
        ratio = g[f"{hop}_time"] / g[f"{hop}_flops"]
        if ratio < 0.8:
            notes.append(f"the {hop} hop grew less than its FLOPs")
        elif ratio > 1.25:
            notes.append(f"the {hop} hop grew more than its FLOPs")
        else:
            notes.append(f"the {hop} hop follows its FLOPs")
    return "So " + " and ".join(notes) + "; the simulation scales attention time by FLOPs."


def _elements_per_token(shapes: Shapes, opts: TensorizedOptions) -> int:
    """Elements a token's position sends in the outer hop's two all-to-alls (in and back)."""
    streams = 3 if opts.causal == "complete" else 2  # q, C (, F)
    lse = 1 if opts.merge == "lse" else 0
    return (streams + 1) * shapes.q_heads * shapes.head_dim + shapes.kv_heads * shapes.head_dim + lse * shapes.q_heads


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _lengths(text: str) -> list[int]:
    return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in text.split(",") if x]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODELS))
    parser.add_argument("--block-sizes", default="128", help="inner axes, e.g. 128 or 64x64")
    parser.add_argument("--causal", default="complete", choices=("complete", "dominance"))
    parser.add_argument("--lengths", default="128k,256k,512k,1024k")
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--dense-tflops", type=float, default=400.0, help="ASSUMED achieved bf16 TFLOP/s, dense")
    parser.add_argument("--attn-tflops", type=float, default=100.0, help="ASSUMED achieved TFLOP/s, TA hops")
    parser.add_argument("--comm-bytes", type=int, default=4, help="bytes per element sent (4: as implemented)")
    parser.add_argument("--latency", type=float, default=20e-6, help="seconds per all-to-all call")
    parser.add_argument("--calibrate", default="4k,8k,16k", help="torch-backend lengths timed locally ('' to skip)")
    parser.add_argument("--check", action="store_true", help="count the bytes of a real 2-process gloo run")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown section here")
    args = parser.parse_args(argv)

    shapes = MODELS[args.model]
    opts = TensorizedOptions(block_sizes=tuple(int(x) for x in args.block_sizes.split("x")), causal=args.causal)
    lengths, worlds = _lengths(args.lengths), [int(x) for x in args.ranks.split(",")]
    command = "python benchmarks/context_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## Context parallelism: communication volume and a simulated step time (issue 9)",
        "",
        f"`{command.strip()}` on {platform.machine()} / {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{_dt.date.today().isoformat()}. Model shapes: {shapes.name} ({shapes.layers} layers, "
        f"{shapes.q_heads} query / {shapes.kv_heads} kv heads, head dim {shapes.head_dim}); "
        f"`block_sizes={list(opts.block_sizes)}`, `causal={opts.causal}`, no sinks, `local=block`.",
        "",
        "### Bytes all-to-all'd per layer and rank (exact, from the sharding code)",
        "",
        "One forward call of the operator: the outermost hop sends q, k and the value streams C and F "
        "(complete mode) of the rank's positions to the ranks that own the heads, and receives its "
        "output back; the most loaded rank is shown. Backward sends the same bytes again, and gradient "
        "checkpointing repeats the forward: a training step moves 3x the table. The operator sends "
        "float32 (its compute dtype) even for bf16 models. Plain Ulysses (q, k, v in and the output "
        "out, bf16) is the comparison: per token the operator sends "
        f"{_elements_per_token(shapes, opts)} elements against Ulysses' "
        f"{2 * (shapes.q_heads + shapes.kv_heads) * shapes.head_dim} ("
        f"{_elements_per_token(shapes, opts) / (2 * (shapes.q_heads + shapes.kv_heads) * shapes.head_dim):.1f}x in the "
        "same dtype): the value streams replace v, the price of keeping the inner hops local.",
        "",
        *volume_table(shapes, opts, lengths, [w for w in worlds if w > 1]),
        "",
    ]
    if args.check:
        import tempfile

        small = MODELS["smollm2-135m"]
        check_opts = TensorizedOptions(block_sizes=(16,), causal="complete", sinks=4, local="window", merge="lse")
        with tempfile.TemporaryDirectory() as tmp:
            rows = check_volume(1000, 2, small, check_opts, Path(tmp))
        lines += [
            "Check: 2 gloo processes, SmolLM2 heads (9/3: 5 + 4 query heads, kv heads gathered), 1,000 "
            "tokens, `block_sizes=[16]`, 4 sinks, `local=window`, `merge=lse`; every `all_to_all_single` counted "
            "(bytes to other ranks):",
            "",
            *rows,
            "",
        ]
    if args.calibrate:
        small = MODELS["smollm2-135m"]
        rows, g = calibrate(small, opts, _lengths(args.calibrate))
        lines += [
            "### Per-hop time against the FLOP model (measured on this machine)",
            "",
            f"The torch backend's local hop and outermost hop, forward, SmolLM2 heads, "
            f"`block_sizes={list(opts.block_sizes)}`, this CPU (1 thread, median of 5; the machine is shared "
            f"with other jobs, so expect noise). From the first to the last length ({g['n']:.0f}x the tokens) "
            f"the local hop's time grew {g['local_time']:.1f}x for {g['local_flops']:.1f}x the FLOPs and the "
            f"outer hop's {g['outer_time']:.1f}x for {g['outer_flops']:.1f}x the FLOPs. {_scaling_note(g)} "
            "The CPU's absolute rate says nothing about a GPU, hence the assumed GPU rates below.",
            "",
            *rows,
            "",
        ]
    sim_rows, shares = simulation_table(shapes, opts, lengths, worlds, args)
    lines += [
        "### SIMULATION: time per LoRA training step of one sequence, 1 vs R GPUs",
        "",
        f"**Not a measurement.** Assumed: dense layers at {args.dense_tflops:.0f} TFLOP/s and tensorized "
        f"attention at {args.attn_tflops:.0f} TFLOP/s per GPU (no GPU was available to measure; pass "
        "`--dense-tflops/--attn-tflops` with measured numbers), "
        f"{args.comm_bytes}-byte elements on the wire, {args.latency * 1e6:.0f} us per all-to-all, no "
        "overlap of communication with compute. Per step: dense FLOPs `3 x 2 x params x N` (forward, "
        "checkpoint recompute, activation gradients), attention 4x its forward FLOPs; compute splits "
        "evenly over ranks (query heads rounded up); communication is 3x the table above, per layer, at "
        "the link's per-GPU bandwidth. Whether one GPU can hold the sequence at all is not modelled.",
        "",
        *sim_rows,
        "",
        "Reading (of the simulation): the all-to-all takes "
        + "; ".join(f"{min(v):.0%}-{max(v):.0%} of a step over {name}" for name, v in shares.items() if v)
        + ". Sending bf16 instead of float32 (the operator does not yet) would halve those bytes; overlapping "
        "the exchange with compute (exchanging head chunks while the hop runs on earlier ones) would hide part.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
