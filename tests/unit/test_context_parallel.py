"""Context-parallel tensorized attention over gloo: 2 and 4 CPU processes give the single-process
operator's outputs and q/k/v gradients; bad input fails on every rank, nothing hangs; a DDP x
context training step, context-parallel perplexity and a 2-process ``ctxext finetune`` run equal
their single-process counterparts.

Each operator test forks one group of processes that runs a list of cases (process start-up
dominates the time); the parent builds the inputs, computes the single-process torch backend
on them and compares the shards the ranks return.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctxext.attention.collectives import ContextParallelError
from ctxext.attention.context_parallel import head_ranges, shard_ranges
from ctxext.attention.options import TensorizedOptions
from ctxext.attention.torch_backend import torch_tensorized_attention

from ..process_tree import run_process_tree

RECIPES = Path(__file__).parents[2] / "recipes"
F64 = torch.float64
D = 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))


# ---------------------------------------------------------------- the worker (runs in each rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_tensorized_model(block_sizes: list[int]):
    from ctxext.tiny import tiny_model

    model = tiny_model("llama").eval()
    model.config.tensorized_attention = {"block_sizes": block_sizes}
    model.set_attn_implementation("tensorized")
    return model


def _run_case(case: dict, rank: int, world: int) -> dict:
    from ctxext.attention.context_parallel import context_parallel_attention

    if case.get("kind") == "ddp":
        return _ddp_context_step(case, rank, world)
    if case.get("kind") == "ppl":
        from ctxext.evaluate.perplexity import document_nll

        return {
            "nll": document_nll(
                _tiny_tensorized_model(case["block_sizes"]), case["ids"], chunk=16, group=dist.group.WORLD
            )
        }
    if case.get("skip_rank") == rank:  # a rank that fails before the collective
        raise RuntimeError("this rank failed before calling the operator")
    opts = TensorizedOptions.from_dict({**case["options"], **case.get("rank_options", {}).get(rank, {})})
    n = case["q"].shape[2]
    ranges = case.get("ranges") or shard_ranges(n, world, opts.block_sizes)
    s, e = ranges[rank]
    q, k, v = (case[x][:, :, s:e].clone().requires_grad_() for x in "qkv")
    pos = case.get("positions")
    out = context_parallel_attention(
        q,
        k,
        v,
        opts,
        position_ids=None if pos is None else pos[:, s:e],
        scaling=case.get("scaling"),
        softcap=case.get("softcap"),
        rope_inv_freq=INV_FREQ if opts.rope == "axis" else None,
    )
    (out * case["dout"][:, :, s:e]).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _ddp_context_step(case: dict, rank: int, world: int) -> dict:
    """One training forward/backward under DDP over all ranks, with context groups of ``case['context']`` ranks."""
    from torch.nn.parallel import DistributedDataParallel

    from ctxext.attention.context_parallel import context_parallel
    from ctxext.train import CausalLMLoss, ContextGroup

    size = case["context"]
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world, size)]
    context = ContextGroup(groups[rank // size], rank % size, size, rank // size, world // size, (8,))
    model = _tiny_tensorized_model([8])
    wrapped = DistributedDataParallel(CausalLMLoss(model, chunk=16, context=context))
    with context_parallel(context.group):
        loss = wrapped(case["ids"][context.data_rank])  # (B, N): this replica's sequences, whole
        loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"loss": float(mean_loss) / world, "grads": grads}


def _worker(rank: int, world: int, port: int, case_file: str, out_dir: str, timeout_s: float) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    results = []
    try:
        for case in torch.load(case_file, weights_only=False):
            try:
                results.append(_run_case(case, rank, world))
            except Exception as err:  # noqa: BLE001 - reported to the parent, which asserts on it
                results.append({"error": f"{type(err).__name__}: {err}"})
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _start_method() -> str:
    """``forkserver`` with ctxext preloaded: workers start in a fraction of a second (no re-import of
    transformers per process), and are forked from a clean server, never from this process's
    OpenMP threads (forking those can deadlock). ``spawn`` where there is no forkserver."""
    if "forkserver" not in mp.get_all_start_methods():
        return "spawn"
    mp.set_forkserver_preload(["ctxext", "ctxext.train", "ctxext.evaluate.perplexity", __name__])
    return "forkserver"


def _spawn(cases: list[dict], world: int, tmp_path: Path, timeout_s: float = 30.0) -> list[list[dict]]:
    """Run ``cases`` on ``world`` gloo ranks; returns ``results[rank][case]``."""
    case_file = tmp_path / "cases.pt"
    torch.save(cases, case_file)
    args = (world, _free_port(), str(case_file), str(tmp_path), timeout_s)
    mp.start_processes(_worker, args=args, nprocs=world, start_method=_start_method())
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------- cases and the single-process control


def _case(n: int, hq: int, hkv: int, batch: int = 1, seed: int = 0, **options) -> dict:
    g = torch.Generator().manual_seed(seed)
    case = {
        "q": torch.randn(batch, hq, n, D, generator=g, dtype=F64),
        "k": torch.randn(batch, hkv, n, D, generator=g, dtype=F64),
        "v": torch.randn(batch, hkv, n, D, generator=g, dtype=F64),
        "dout": torch.randn(batch, hq, n, D, generator=g, dtype=F64),
        "options": {"block_sizes": [4], **options},
    }
    return case


def _control(case: dict) -> dict:
    q, k, v = (case[x].clone().requires_grad_() for x in "qkv")
    opts = TensorizedOptions.from_dict(case["options"])
    out = torch_tensorized_attention(
        q,
        k,
        v,
        opts,
        scaling=case.get("scaling"),
        softcap=case.get("softcap"),
        inv_freq=INV_FREQ if opts.rope == "axis" else None,
        positions=case.get("positions"),
    )
    (out * case["dout"]).sum().backward()
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _assert_matches(cases: list[dict], results: list[list[dict]]) -> None:
    """Every case's output and q/k/v gradients equal the single-process control (all failures listed)."""
    failures = []
    for i, case in enumerate(cases):
        errors = [results[r][i].get("error") for r in range(len(results))]
        if any(errors):
            failures.append(f"case {i} {case['options']}: {errors}")
            continue
        want = _control(case)
        for key in ("out", "dq", "dk", "dv"):
            got = torch.cat([results[r][i][key] for r in range(len(results))], dim=2)
            if not torch.allclose(got, want[key], atol=1e-10, rtol=1e-9):
                err = (got - want[key]).abs().max().item()
                failures.append(f"case {i} {case['options']}: {key} differs by {err:.3g}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- tests


def test_sharding_is_whole_outer_blocks_and_balanced():
    assert shard_ranges(37, 2, (4,)) == [(0, 20), (20, 37)]  # 10 blocks of 4: 5 + 5, last ragged
    assert shard_ranges(50, 4, (4,)) == [(0, 16), (16, 28), (28, 40), (40, 50)]  # 13 blocks: 4,3,3,3
    assert shard_ranges(45, 2, (4, 4)) == [(0, 32), (32, 45)]  # 3 outer blocks of 16
    assert shard_ranges(12, 2, (4, 4)) == [(0, 8), (8, 12)]  # short: axes (3, 4), blocks of 4
    assert head_ranges(9, 2) == [(0, 5), (5, 9)]
    with pytest.raises(ContextParallelError, match="at least 4 outer blocks.*parallel.context"):
        shard_ranges(10, 4, (4,))
    with pytest.raises(ContextParallelError, match="at least 2 outer blocks"):
        shard_ranges(3, 2, (4,))


def test_two_ranks_match_one_process(tmp_path):
    cases = [
        _case(37, 4, 2, causal="complete"),
        _case(37, 4, 2, causal="dominance", seed=1),
        _case(45, 4, 2, batch=2, seed=2, block_sizes=[4, 4]),  # two inner axes, 3 outer blocks
        _case(29, 6, 2, seed=3, causal="dominance"),  # GQA, kv heads split evenly
        _case(33, 9, 3, seed=4),  # SmolLM2's 9/3 heads: 5 + 4 query heads, kv heads gathered
        _case(31, 6, 3, seed=5, causal="dominance", block_sizes=[2, 4]),  # 3 kv heads on 2 ranks: gathered
        _case(43, 4, 2, seed=6, sinks=3, local="window", merge="lse", rope="axis"),
        _case(43, 6, 3, seed=7, causal="dominance", sinks=5, local="window", merge="lse", rope="axis"),
        _case(26, 4, 2, seed=8, sinks=2, local="window", long_range=False),
        _case(45, 4, 2, seed=9, sinks=2, merge="mass", block_sizes=[4, 2]),
    ]
    cases[0]["softcap"], cases[0]["scaling"] = 1.5, 0.3
    cases[6]["positions"] = torch.arange(43, dtype=torch.long)[None] * 2 + 5  # RoPE positions != slots
    _assert_matches(cases, _spawn(cases, 2, tmp_path))


def test_four_ranks_match_one_process(tmp_path):
    cases = [
        _case(50, 4, 2),  # 13 blocks: 4, 3, 3, 3 per rank
        _case(70, 8, 2, seed=1, causal="dominance", block_sizes=[4, 4]),  # 2 kv heads on 4 ranks
        _case(41, 6, 3, seed=2, sinks=5, local="window", rope="axis", merge="lse"),  # 6 heads: 2,2,1,1
        _case(47, 4, 4, seed=3, causal="dominance", sinks=3, local="window"),
        _case(30, 4, 2, seed=4, sinks=9, local="window", block_sizes=[2]),  # sinks on 2 ranks; rank 1 takes [0, 8)
    ]
    _assert_matches(cases, _spawn(cases, 4, tmp_path))


def test_bad_input_fails_on_every_rank_without_hanging(tmp_path):
    mismatch = _case(37, 4, 2)
    mismatch["rank_options"] = {1: {"causal": "dominance"}}
    wrong_shards = _case(37, 4, 2)
    wrong_shards["ranges"] = [(0, 18), (18, 37)]  # not whole outer blocks
    too_short = _case(3, 4, 2)  # fits one inner block: nothing to shard
    too_short["ranges"] = [(0, 2), (2, 3)]
    too_few_heads = _case(37, 1, 1)
    retrieval = _case(37, 4, 2, retrieve=2)  # not sharded yet: must refuse, not drop the far blocks
    pooled = _case(37, 4, 2, summary="pooled", merge="lse")
    cases = [mismatch, wrong_shards, too_short, too_few_heads, retrieval, pooled, _case(37, 4, 2)]
    results = _spawn(cases, 2, tmp_path)
    expected = [
        "settings differ across the ranks",
        "must have lengths \\[20, 17\\]",
        "needs at least 2 outer blocks",
        "at least one query head per rank",
        "does not support retrieve=2 yet",
        "does not support summary='pooled' yet",
    ]
    for i, pattern in enumerate(expected):
        for rank in (0, 1):
            assert re.search(pattern, results[rank][i].get("error") or ""), (i, rank, results[rank][i])
    assert all("error" not in results[r][-1] for r in (0, 1)), "the group is still usable after the errors"


def test_a_rank_that_never_calls_times_out_instead_of_hanging(tmp_path):
    case = _case(37, 4, 2)
    case["skip_rank"] = 1
    results = _spawn([case], 2, tmp_path, timeout_s=3.0)
    assert "failed before calling" in results[1][0]["error"]
    assert results[0][0].get("error"), "rank 0 should fail (timeout or closed connection), not hang"


def test_context_parallel_perplexity_matches_one_process(tmp_path):
    from ctxext.evaluate.perplexity import document_nll

    ids = torch.randint(0, 256, (75,), generator=torch.Generator().manual_seed(0)).tolist()
    cases = [{"kind": "ppl", "ids": ids, "block_sizes": [8]}, {"kind": "ppl", "ids": ids[:41], "block_sizes": [4, 4]}]
    results = _spawn(cases, 2, tmp_path)
    for i, case in enumerate(cases):
        want = document_nll(_tiny_tensorized_model(case["block_sizes"]), case["ids"], chunk=16)
        for rank in (0, 1):
            got = results[rank][i].get("nll")
            assert got is not None, results[rank][i]
            assert got[1] == want[1] == len(case["ids"]) - 1
            assert got[0] == pytest.approx(want[0], rel=1e-5)


def test_two_process_context_parallel_finetune_matches_one_process(tmp_path):
    """recipes/tiny-debug-cp2.yaml (2 gloo processes share each sequence) = tiny-debug.yaml on one process.

    Adam hides a wrong loss scale from the losses, so the gradient norms are compared too.
    """
    from ctxext.config import load
    from ctxext.train import finetune

    common = [f"data.cache_dir={tmp_path / 'cache'}", "data.max_tokens=16384", "train.steps=3", "train.save_every=0"]
    # The command `ctxext finetune --recipe recipes/tiny-debug-cp2.yaml` runs (its accelerate.config makes it
    # relaunch itself this way; tests/integration/test_finetune_cli.py covers that step): one import fewer.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(RECIPES / "accelerate" / "cpu-2proc.yaml"),
    ]
    proc = run_process_tree(
        [*launch, "-m", "ctxext.cli", "finetune", "--recipe", str(RECIPES / "tiny-debug-cp2.yaml")]
        + [f"train.output_dir={tmp_path / 'cp'}", *common],
        timeout=300,
        env={**os.environ, "COLUMNS": "200", "CTXEXT_LAUNCHED": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = finetune(load(RECIPES / "tiny-debug.yaml", [f"train.output_dir={tmp_path / 'one'}", *common]), log=print)
    metrics = {}
    for name in ("cp", "one"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        metrics[name] = [json.loads(line) for line in lines]
    assert [m["loss"] for m in metrics["cp"]] == pytest.approx(single.losses, abs=1e-4)
    assert [m["grad_norm"] for m in metrics["cp"]] == pytest.approx([m["grad_norm"] for m in metrics["one"]], rel=1e-4)
    assert metrics["cp"][-1]["tokens"] == 3 * 2 * 2 * 128  # one data-parallel replica
    ranks = [json.loads((tmp_path / "cp" / f"rank-{r}.json").read_text())["digest"] for r in (0, 1)]
    assert ranks[0] == ranks[1], "the ranks of a context group ended with different weights"


def test_context_parallel_recipe_on_one_process_is_refused(tmp_path):
    from ctxext.config import load
    from ctxext.train import FinetuneError, finetune

    recipe = load(RECIPES / "tiny-debug-cp2.yaml", ["accelerate.config=null", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(FinetuneError, match="parallel.context=2: 1 process.*accelerate.config"):
        finetune(recipe, log=print)


def test_data_parallel_times_context_parallel_gradients_equal_one_process(tmp_path):
    """4 ranks = 2 data-parallel replicas x 2 context ranks under DDP: the averaged gradient is the
    single-process gradient of the mean loss over both replicas' sequences (the loss scaling of
    ``train.context_shard_loss``)."""
    from ctxext.loss import sequence_nll

    ids = torch.randint(0, 256, (2, 2, 40), generator=torch.Generator().manual_seed(0))  # (replica, B, N)
    results = _spawn([{"kind": "ddp", "context": 2, "ids": ids}], 4, tmp_path)
    model = _tiny_tensorized_model([8])
    loss = sequence_nll(model, ids.reshape(4, 40), chunk=16).mean()
    loss.backward()
    for rank in range(4):
        got = results[rank][0]
        assert "error" not in got, got
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                got["grads"][name], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_context_parallel_recipe_with_retrieval_is_refused_at_load(tmp_path):
    import yaml

    from ctxext.config import RecipeError, load

    raw = yaml.safe_load((RECIPES / "tiny-debug-cp2.yaml").read_text())
    raw["model"]["tensorized"]["retrieve"] = 2
    (tmp_path / "cp.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"parallel.context=2: model.tensorized.retrieve=2 is not supported"):
        load(tmp_path / "cp.yaml")
