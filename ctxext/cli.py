"""The ``ctxext`` command line: thin commands that parse, validate and call the library."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Extend the context window of pretrained Hugging Face LLMs with tensorized attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_block_sizes(text: str) -> tuple[int, ...]:
    """``"64,64"`` -> ``(64, 64)``; a clear error for anything else."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    sizes = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise ValueError(
                f"--block-sizes: {part!r} is not an integer; give positive integers such as 128 or 64,64"
            ) from None
        if value < 1:
            raise ValueError(f"--block-sizes: sizes must be positive integers, got {value}")
        sizes.append(value)
    if not sizes:
        raise ValueError("--block-sizes: give at least one size, such as 128")
    return tuple(sizes)


def _format(value) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return "-" if value is None else str(value)


def default_retrieve_block(block_sizes: str, given: int | None) -> int:
    """``--retrieve-block``: as given, else 64 when 64 divides the inner block, else 0 (the inner block)."""
    if given is not None:
        return given
    try:
        inner = parse_block_sizes(block_sizes)[-1]
    except ValueError:  # a bad --block-sizes is reported where it is parsed
        return 0
    return 64 if inner % 64 == 0 and inner > 64 else 0


def default_retrieve_candidates(retrieve: int, given: int | None) -> int:
    """``--retrieve-candidates``: as given, else four times ``--retrieve`` (0 without retrieval).

    Four times: with 8 retrieved blocks, 32 candidates found 5 of 6 needles at 16k tokens where the
    bound alone found 1, at about half again the bound's time at 8k (quality study, rounds 13-15)."""
    if given is not None:
        return given
    return 4 * retrieve if isinstance(retrieve, int) and retrieve > 0 else 0


def default_retrieve_bias_schedule(
    retrieve: int, retrieve_bias: float, growth: float | None, cap: float | None
) -> tuple[float, float]:
    """``(--retrieve-bias-growth, --retrieve-bias-cap)``: as given, else 0.5 nat per doubling past the
    model's context capped at 0.5 nat, with retrieval and no fixed ``--retrieve-bias``; else none.

    A given growth keeps its own cap (none unless given); a fixed bias asked for alone stays fixed.
    0.5 / 0.5: on the 2k-trained default model, zero-shot, every length up to the native 8k is
    unchanged, perplexity at 16k-128k is lower than at bias 0, the 32k needles found with half the
    far blocks as candidates rise from 3 to 5 of 6 (with the shipped 32: none either way), and the
    128k passkeys are kept, which 1 nat or more at the question loses (quality study, rounds 30-34)."""
    if growth is None and isinstance(retrieve, int) and retrieve > 0 and retrieve_bias == 0:
        return 0.5, 0.5 if cap is None else cap
    return 0.0 if growth is None else growth, 0.0 if cap is None else cap


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="Hub id, local model directory, .gguf file, or 'smollm2' (embedded).")],
    out: Annotated[Path, typer.Argument(help="Output model directory (written atomically).")],
    block_sizes: Annotated[str, typer.Option(help="Inner axis sizes, e.g. 128 or 64,64.")] = "128",
    causal: Annotated[str, typer.Option(help="complete | dominance")] = "complete",
    rope: Annotated[str, typer.Option(help="absolute | axis")] = "absolute",
    sinks: Annotated[int, typer.Option(help="Leading tokens every query sees exactly.")] = 4,
    local: Annotated[str, typer.Option(help="block | window (local hop also covers the previous block)")] = "window",
    merge: Annotated[str, typer.Option(help="score | lse | mass")] = "lse",
    long_range: Annotated[
        bool,
        typer.Option(
            help="Add the tensorized outer hops (the paper's operator). Off by default: beside retrieval they "
            "carried nothing measurable and cost time (quality study, round 9); off with --retrieve 0: the "
            "window-only control."
        ),
    ] = False,
    summary: Annotated[str, typer.Option(help="token | pooled | learned (far-entry summaries)")] = "token",
    retrieve: Annotated[
        int, typer.Option(help="Far blocks each query also reads exactly (top by a q.k bound; 0: none).")
    ] = 8,
    retrieve_frame: Annotated[
        str, typer.Option(help="stacked | ordered: where retrieved blocks sit with --rope axis")
    ] = "stacked",
    retrieve_block: Annotated[
        int | None,
        typer.Option(
            help="Tokens per retrieved block, a divisor of the inner block (0: the inner block). "
            "Default: 64 when 64 divides the inner block, else the inner block."
        ),
    ] = None,
    retrieve_score_block: Annotated[
        int,
        typer.Option(
            help="Score a far block by its best sub-block of this many slots, a divisor of the retrieved block "
            "(0: the whole block; 1: exact max q.k). 16 found 3 / 6 needles at 8k with the bound choosing alone, "
            "against 0 / 6; proposing the 32 candidates at 32k, 0 / 6 either way (quality study, rounds 12 and 35)."
        ),
    ] = 0,
    retrieve_candidates: Annotated[
        int | None,
        typer.Option(
            help="Two-stage choice: the bound proposes this many far blocks per query and the exact max q.k "
            "over their keys picks --retrieve of them (0: the bound alone; at least --retrieve). "
            "Default: four times --retrieve."
        ),
    ] = None,
    retrieve_candidate_share: Annotated[
        float,
        typer.Option(
            help="Candidates as a share of each query's far blocks: the bound proposes max(--retrieve-candidates, "
            "share x far blocks), so they grow with the length (0: off). At 32k, by generation with the default far "
            "bias, 32 candidates found no needle, a quarter of the far blocks 2 of 6 and half 5 of 6 (quality study, "
            "rounds 32-34). Costs a share of full attention's q.k products."
        ),
    ] = 0.0,
    retrieve_bias: Annotated[
        float,
        typer.Option(
            help="Nats subtracted from every far key's attention logit, so the chosen far blocks take less of a "
            "query's softmax beside its window (0: none). Measured zero-shot in the quality study, round 28 "
            "(docs/RESULTS.md); not a default."
        ),
    ] = 0.0,
    retrieve_bias_growth: Annotated[
        float | None,
        typer.Option(
            help="Nats the bias grows by per doubling of a query's length beyond --retrieve-bias-from tokens "
            "(0: a fixed bias), so it is 0 within the model's context and grows beyond it. Default: 0.5 with "
            "--retrieve and no --retrieve-bias, else 0 (quality study, rounds 30-33)."
        ),
    ] = None,
    retrieve_bias_from: Annotated[
        int,
        typer.Option(
            help="Tokens from which the bias grows; 0 with a growth: the model's context (max_position_embeddings, "
            "8192 for SmolLM2), written into OUT's config as the number."
        ),
    ] = 0,
    retrieve_bias_cap: Annotated[
        float | None,
        typer.Option(
            help="The most nats any query's far logits are lowered by, fixed bias and growth together (0: no "
            "cap). Default: 0.5 with the default growth (0.5 nat from 2x the model's context on), else 0. "
            "Zero-shot at 128k, 1 nat or more at the question lost the passkey's first token, 0.5 kept it "
            "(quality study, rounds 32-33)."
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="auto | triton | torch | reference")] = "auto",
    rope_scaling: Annotated[str | None, typer.Option(help="linear | dynamic | yarn | llama3")] = None,
    rope_factor: Annotated[float, typer.Option(help="Rope scaling factor (> 1).")] = 0.0,
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty OUT.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Reload OUT and compare with full attention.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow pickled .bin weights (trusted sources only).")
    ] = False,
) -> None:
    """Convert MODEL to tensorized attention and write a complete model directory to OUT.

    The defaults (4 sinks, exact window, lse merge, retrieval of 8 far blocks of 64) are the
    quality study's: sinks and the window cut SmolLM2's perplexity before fine-tuning from 37.3
    (the plain operator) to 13.6 at 1,024 tokens; retrieval is the only far path that finds a
    passkey beyond the window (7 of 8 cells zero-shot, none without it); and far blocks of 64
    recall more than blocks of 128 with the same weights and window (round 7). Far blocks are chosen
    in two stages (32 candidates by the bound, then the exact max q.k): 5 of 6 needles at 16k tokens
    where the bound alone found 1 (rounds 13-15). Past the model's context the far logits are
    lowered by 0.5 nat per doubling, at most 0.5 nat: zero-shot, lower perplexity from 16k to
    128k, more 32k needles found with half the far blocks as candidates (none with the shipped 32
    either way) and the 128k passkeys kept (rounds 30-34). The tensorized outer
    hops are off (``--long-range`` adds them): trained beside retrieval they recalled no more and
    fitted no better, and they cost time (round 9).
    """
    from .atomic import OutputExistsError
    from .attention.options import TensorizedConfigError, TensorizedOptions
    from .models import ModelSourceError, UnsupportedModelError
    from .models import convert as run_convert

    bias_growth, bias_cap = default_retrieve_bias_schedule(
        retrieve, retrieve_bias, retrieve_bias_growth, retrieve_bias_cap
    )
    try:
        options = TensorizedOptions(
            block_sizes=parse_block_sizes(block_sizes),
            causal=causal,
            rope=rope,
            sinks=sinks,
            local=local,
            merge=merge,
            long_range=long_range,
            summary=summary,
            retrieve=retrieve,
            retrieve_frame=retrieve_frame,
            retrieve_block=default_retrieve_block(block_sizes, retrieve_block),
            retrieve_score_block=retrieve_score_block,
            retrieve_candidates=default_retrieve_candidates(retrieve, retrieve_candidates),
            retrieve_candidate_share=retrieve_candidate_share,
            retrieve_bias=retrieve_bias,
            retrieve_bias_growth=bias_growth,
            retrieve_bias_from=retrieve_bias_from,
            retrieve_bias_cap=bias_cap,
            backend=backend,
        )
        errors = options.problems(where="option")
        if errors:
            flag = re.compile(r"option\.(\w+)")
            errors = [flag.sub(lambda m: "--" + m.group(1).replace("_", "-"), e) for e in errors]
            raise TensorizedConfigError("invalid settings:\n  - " + "\n  - ".join(errors))
        if rope_scaling and rope_factor <= 1.0:
            raise ValueError(f"--rope-scaling {rope_scaling} needs --rope-factor > 1 (e.g. --rope-factor 4)")
        for note in options.advice():
            console.print(f"[yellow]warning:[/] {note}")
        start = time.time()
        console.print(f"Converting [bold]{model}[/] -> {out}")
        summary = run_convert(
            model,
            out,
            options,
            rope_scaling=rope_scaling,
            rope_factor=rope_factor,
            dtype=dtype,
            force=force,
            allow_pickle=allow_pickle,
        )
    except (ModelSourceError, UnsupportedModelError, TensorizedConfigError, OutputExistsError, ValueError) as err:
        _fail(str(err))
        return
    except FileNotFoundError as err:
        _fail(str(err))
        return

    table = Table(title=f"{summary.architecture} from {Path(summary.source).name}: what changed", show_lines=False)
    table.add_column("setting")
    table.add_column("before")
    table.add_column("after", style="green")
    for key, before, after in summary.changes:
        table.add_row(key, _format(before), _format(after))
    console.print(table)
    total = summary.full_layers + summary.sliding_layers
    console.print(
        f"Tensorized attention replaces {summary.full_layers} of {total} attention layers"
        + (
            f"; {summary.sliding_layers} sliding-window layers keep their exact window."
            if summary.sliding_layers
            else "."
        )
    )
    if summary.full_layers == 0:
        err_console.print(
            "[yellow]warning:[/] every layer of this model uses a sliding window, so tensorized attention changes "
            "nothing; it replaces full-attention layers only."
        )
    console.print(f"Wrote {out} in {time.time() - start:.1f}s. Load it with:")
    console.print(
        f"  import ctxext; from transformers import AutoModelForCausalLM\n"
        f"  model = AutoModelForCausalLM.from_pretrained('{out}')",
        highlight=False,
    )
    if check:
        _print_check(out)


def _print_check(out: Path) -> None:
    from .sanity import check_passed, quick_check

    console.print("Checking the converted model on local text (Python standard-library sources)...")
    result = quick_check(out)
    console.print(f"  reloaded with attn_implementation = {result.reloaded_attention}")
    console.print(
        f"  within one block ({result.block_tokens} tokens): max |logit difference| vs full attention = "
        f"{result.max_logit_diff_in_block:.2e}"
    )
    table = Table(title="Perplexity before fine-tuning (local text)")
    table.add_column("tokens", justify="right")
    table.add_column("full attention", justify="right")
    table.add_column("tensorized", justify="right")
    table.add_column("ratio", justify="right")
    for length, (full, ta) in result.perplexity.items():
        table.add_row(str(length), f"{full:.2f}", f"{ta:.2f}", f"{ta / full:.2f}x")
    console.print(table)
    console.print(
        "Tensorized attention changes what each token sees beyond its block, so a pretrained model loses "
        "perplexity until it is fine-tuned at long context."
    )
    if not check_passed(result):
        _fail("the converted model does not match full attention inside one block; please report this", code=1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def finetune(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="YAML recipe (see recipes/).")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="section.key=value overrides, e.g. train.steps=200", show_default=False)
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and a memory estimate; train nothing.")
    ] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Also write a merged model directory.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
) -> None:
    """LoRA fine-tuning at long context from a recipe, through Accelerate (one or many devices)."""
    import os
    import subprocess
    import sys

    from .config import RecipeError, load
    from .data import DataError
    from .models import ModelSourceError, UnsupportedModelError
    from .train import FinetuneError, NonFiniteLossError

    overrides = list(overrides or []) + (["train.resume=true"] if resume else [])
    try:
        spec = load(recipe, overrides)
    except RecipeError as err:
        _fail(str(err))
        return
    if dry_run:
        _print_plan(spec)
        return
    if spec.accelerate.config and not os.environ.get("CTXEXT_LAUNCHED"):
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            spec.accelerate.config,
            "-m",
            "ctxext.cli",
            "finetune",
            "--recipe",
            str(recipe),
            *overrides,
        ] + (["--merge"] if merge else [])
        console.print("Launching through Accelerate: " + " ".join(command), highlight=False, soft_wrap=True)
        env = {**os.environ, "CTXEXT_LAUNCHED": "1"}
        if _accelerate_config_uses_cpu(spec.accelerate.config):
            env["ACCELERATE_USE_CPU"] = "1"
        raise typer.Exit(subprocess.call(command, env=env))
    from .interrupt import sigterm_as_interrupt
    from .train import finetune as run_finetune

    try:
        with sigterm_as_interrupt():  # a SIGTERM (timeout, a scheduler) saves a checkpoint like Ctrl-C
            result = run_finetune(spec, merge=merge, log=lambda msg: console.print(msg, highlight=False))
    except NonFiniteLossError as err:
        _fail(str(err), code=1)
        return
    except (FinetuneError, DataError, ModelSourceError, UnsupportedModelError, RecipeError) as err:
        _fail(str(err))
        return
    if result.interrupted:
        raise typer.Exit(130)
    if result.adapter_dir is None:  # not the main process
        return
    first, last = result.losses[0], result.losses[-1]
    budget = f" (train.max_minutes reached; {spec.train.steps} planned)" if result.out_of_time else ""
    console.print(f"Trained {result.steps} steps{budget}: loss {first:.4f} -> {last:.4f}")
    console.print(f"  adapter: {result.adapter_dir}   metrics: {result.output_dir / 'metrics.jsonl'}")
    if result.merged_dir:
        console.print(f"  merged model: {result.merged_dir} (reload with from_pretrained after import ctxext)")


def _accelerate_config_uses_cpu(path: str) -> bool:
    import yaml

    try:
        return bool((yaml.safe_load(Path(path).read_text()) or {}).get("use_cpu"))
    except (OSError, yaml.YAMLError):
        return False


def _gib(value: float) -> str:
    return f"{value:.2f} GiB" if value >= 1 else f"{value * 1024:.1f} MiB"


def _print_plan(spec) -> None:
    from .config import dump
    from .plan import plan

    console.print("[bold]Resolved recipe[/]")
    console.print(dump(spec), highlight=False)
    try:
        p = plan(spec)
    except Exception as err:  # noqa: BLE001 - the plan is best effort; the recipe itself is valid
        _fail(f"cannot plan {spec.model.source}: {err}")
        return
    table = Table(title=f"{p.architecture}: training plan (estimate, per device, before sharding)")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("total parameters", f"{p.total_params:,}")
    table.add_row("trainable parameters", f"{p.trainable_params:,} ({100 * p.trainable_params / p.total_params:.2f}%)")
    table.add_row("  LoRA", f"{p.lora_params:,}")
    table.add_row("  embeddings/norms trained fully", f"{p.extra_trainable_params:,}")
    table.add_row("tokens per optimizer step", f"{p.tokens_per_step:,}")
    for key, gib in p.memory_gib.items():
        table.add_row(f"memory: {key}", _gib(gib))
    table.add_row("[bold]estimated peak memory[/]", f"[bold]{_gib(p.peak_gib)}[/]")
    console.print(table)


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Argument(help="Model dir, adapter dir (from finetune), .gguf, Hub id or 'smollm2'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report directory (written atomically).")] = Path(
        "runs/eval"
    ),
    lengths: Annotated[str, typer.Option(help="Comma-separated lengths, e.g. 2k,4k,8k,16k,32k,64k,128k.")] = "1k,2k,4k",
    tasks: Annotated[str, typer.Option(help="ppl,passkey,needle,multikey,vartrack")] = "ppl,passkey",
    depths: Annotated[str, typer.Option(help="Needle depths in 0..1.")] = "0,0.25,0.5,0.75,1",
    trials: Annotated[int, typer.Option(help="Trials per (length, depth) cell.")] = 2,
    data: Annotated[str, typer.Option(help="Perplexity data: 'stdlib', files/dirs, or a Hub data set.")] = "stdlib",
    docs: Annotated[int, typer.Option(help="Documents per length for perplexity.")] = 4,
    compare: Annotated[
        list[str] | None,
        typer.Option(help="Baseline: 'base' (same weights, full attention), 'base+yarn4', or another model."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic tasks.")] = 0,
    scoring: Annotated[
        str, typer.Option(help="Retrieval scoring: teacher (forced argmax) or generate (greedy, decode cache).")
    ] = "teacher",
    context_parallel: Annotated[
        int, typer.Option(help="Processes sharing each document (tensorized models, --tasks ppl).")
    ] = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a tensorized setting of the model under test: KEY=VALUE, e.g. rope=axis."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the planned work and memory; run nothing.")] = False,
) -> None:
    """Evaluate long-context ability: perplexity against length, passkey, needle, RULER-style tasks."""
    from .config import parse_settings
    from .evaluate.runner import EvalError, EvalSpec, parse_length, resolve_entries, run, validate
    from .models import ModelSourceError, UnsupportedModelError

    try:
        spec = EvalSpec(
            model=model,
            out=out,
            lengths=[parse_length(x) for x in lengths.split(",") if x.strip()],
            tasks=[t.strip() for t in tasks.split(",") if t.strip()],
            depths=[float(d) for d in depths.split(",") if d.strip()],
            trials=trials,
            data=data,
            docs=docs,
            seed=seed,
            compare=list(compare or []),
            force=force,
            scoring=scoring,
            context_parallel=context_parallel,
            settings=parse_settings(set_ or []),
        )
    except ValueError as err:
        _fail(f"{err}")
        return
    if dry_run:
        errors = validate(spec)
        if errors:
            _fail("cannot evaluate:\n  - " + "\n  - ".join(errors))
        _print_eval_plan(spec, resolve_entries(spec))
        return
    import os
    import subprocess
    import sys

    if context_parallel > 1 and not os.environ.get("CTXEXT_LAUNCHED"):
        errors = validate(spec)
        if errors:
            _fail("cannot evaluate:\n  - " + "\n  - ".join(errors))
        args = ["eval", model, "--out", str(out), "--lengths", lengths, "--tasks", tasks, "--depths", depths]
        args += ["--trials", str(trials), "--data", data, "--docs", str(docs), "--seed", str(seed)]
        args += ["--scoring", scoring, "--context-parallel", str(context_parallel)] + (["--force"] if force else [])
        args += [x for item in set_ or [] for x in ("--set", item)]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={context_parallel}", "-m", "ctxext.cli", *args]
        console.print("Launching: " + " ".join(command), highlight=False, soft_wrap=True)
        raise typer.Exit(subprocess.call(command, env={**os.environ, "CTXEXT_LAUNCHED": "1"}))
    from .evaluate.report import markdown
    from .interrupt import Interrupted, sigterm_as_interrupt
    from .warning_lines import as_lines

    try:
        with sigterm_as_interrupt(), as_lines():
            report = run(spec)
    except (EvalError, ModelSourceError, UnsupportedModelError, FileNotFoundError) as err:
        _fail(str(err))
        return
    except Interrupted as stopped:
        console.print(markdown(stopped.result), highlight=False, soft_wrap=True)
        console.print(f"Stopped: partial report in {out / 'report.md'}", highlight=False)
        raise typer.Exit(130) from None
    if context_parallel > 1 and report.get("protocol", {}).get("rank", 0) != 0:
        return
    console.print(markdown(report), highlight=False, soft_wrap=True)
    console.print(f"Report: {out / 'report.md'} (also report.json and PNG plots in {out})")


def _print_eval_plan(spec, entries) -> None:
    from .attention.options import TensorizedConfigError
    from .evaluate.runner import estimate_memory_gib, length_note, planned_config

    retrieval, advice = [t for t in spec.tasks if t != "ppl"], []
    table = Table(title="Planned evaluation (estimates, per model)")
    for col in ("model", "length", "forward passes", "tokens", "est. peak memory"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for entry in entries:
        try:
            config, ta = planned_config(entry)
        except Exception as err:  # noqa: BLE001 - best effort
            table.add_row(entry.label, "-", "-", "-", f"config unavailable: {err}")
            continue
        for n in spec.lengths:
            passes = (spec.docs if "ppl" in spec.tasks else 0) + len(retrieval) * len(spec.depths) * spec.trials
            mem = estimate_memory_gib(config, n, ta)
            table.add_row(entry.label, str(n), str(passes), f"{passes * n:,}", _gib(sum(mem.values())))
        if ta:
            advice.append((entry.label, ta))
    console.print(table)
    for label, ta in advice:  # what `eval` would warn about at the longest length
        try:
            note = length_note(ta, spec.lengths, where="--set")
        except TensorizedConfigError as err:
            note = str(err)
        if note:
            err_console.print(f"warning: {label}: {note}", highlight=False, soft_wrap=True, markup=False)


@app.command()
def push(
    model_dir: Annotated[Path, typer.Argument(help="Converted/merged model dir or adapter dir (from finetune).")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repository, user/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to (created if needed).")] = None,
    adapter: Annotated[bool, typer.Option("--adapter", help="Require an adapter dir.")] = False,
    merged: Annotated[bool, typer.Option("--merged", help="Require a merged/converted model dir.")] = False,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Hub id of the base model (e.g. for a .gguf source).")
    ] = None,
    eval_dir: Annotated[
        Path | None, typer.Option("--eval-dir", help="A `ctxext eval --out` dir: report.md + plots for the card.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List files and print the model card; upload nothing.")
    ] = False,
) -> None:
    """Publish a model to the Hugging Face Hub with a model card, in one commit."""
    from .hub import PushError
    from .hub import push as push_model

    if adapter and merged:
        _fail("--adapter and --merged are exclusive")
    kind = "adapter" if adapter else "merged" if merged else "auto"
    try:
        result = push_model(
            model_dir,
            repo,
            private=private,
            revision=revision,
            kind=kind,
            base_model=base_model,
            eval_dir=eval_dir,
            dry_run=dry_run,
        )
    except PushError as err:
        _fail(str(err), code=1)
        return
    if dry_run:
        console.print(
            f"dry run: would upload {len(result.files)} files ({result.total_bytes:,} bytes) to {result.repo_id} "
            f"as a {result.kind} model{' (private)' if private else ''}:",
            highlight=False,
        )
        for path, size in result.files:
            console.print(f"  {size:>14,}  {path}", markup=False, highlight=False)
        console.print("\n--- README.md ---", markup=False)
        print(result.card)  # plain: markdown/YAML must not be rendered
        return
    console.print(f"pushed {len(result.files)} files ({result.total_bytes:,} bytes) to {result.repo_url}")
    console.print(f"  commit: {result.commit_url}", markup=False)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Model dir, adapter dir (from finetune), .gguf, Hub id or 'smollm2'.")],
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", "-f", help="Text file with the prompt ('-' reads stdin).")
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="The prompt text (instead of a file).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    max_length: Annotated[
        int | None, typer.Option(help="Longest prompt + continuation allowed (default: max_position_embeddings).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding, > 0 to sample.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute the whole sequence per token (slow reference).")
    ] = False,
) -> None:
    """Stream a continuation of a (long) prompt, using the tensorized decode cache."""
    import sys

    import torch

    from .evaluate.runner import EvalError, ModelEntry, load_entry
    from .generation import GenerationError, generate_text
    from .models import ModelSourceError, UnsupportedModelError

    if (prompt_file is None) == (prompt is None):
        _fail("give the prompt with exactly one of --prompt-file FILE or --prompt TEXT")
        return
    if prompt_file is not None:
        if str(prompt_file) == "-":
            prompt = sys.stdin.read()
        elif not prompt_file.is_file():
            _fail(f"--prompt-file {prompt_file}: no such file")
            return
        else:
            prompt = prompt_file.read_text(encoding="utf-8", errors="replace")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        lm, tokenizer = load_entry(ModelEntry(model, model), device)
        _, stats = generate_text(
            lm,
            tokenizer,
            prompt,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            temperature=temperature,
            seed=seed,
            use_cache=not no_cache,
        )
    except (GenerationError, EvalError, ModelSourceError, UnsupportedModelError) as err:
        _fail(str(err))
        return
    cache = f", cache {stats.cache_multiple:.2f}x a KV cache" if stats.kv_bytes else ""
    err_console.print(
        f"\n[{stats.prompt_tokens} prompt tokens, prefill {stats.prefill_seconds:.2f} s; {stats.new_tokens} new "
        f"tokens at {stats.decode_tokens_per_second:.1f} tokens/s{cache}]",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def version() -> None:
    """Print the versions of ctxext and its main dependencies."""
    import torch
    import transformers

    from . import __version__

    console.print(f"ctxext {__version__}, torch {torch.__version__}, transformers {transformers.__version__}")


@app.command()
def bench(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Model dir, tiny-random:<arch>, smollm2, a config JSON or a shipped config (llama-3.1-8b).",
        ),
    ] = "smollm2",
    lengths: Annotated[
        str | None, typer.Option(help="Comma-separated lengths (default: 1k,2k,4k on CPU; 4k,...,128k on CUDA).")
    ] = None,
    what: Annotated[
        str, typer.Option(help="Sections: attention (operator alone), model (whole model), decode (per token).")
    ] = "attention,model",
    backends: Annotated[
        str | None, typer.Option(help="Tensorized backends: torch,triton,reference (default: torch; +triton on CUDA).")
    ] = None,
    baselines: Annotated[
        str | None, typer.Option(help="sdpa,flash2 (default: sdpa; +flash2 where flash_attn runs); sdpa always runs.")
    ] = None,
    batch: Annotated[int, typer.Option(help="Sequences per call.")] = 1,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, float32 on CPU) | float32 | bf16 | float16")] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    layers: Annotated[
        int | None, typer.Option(help="Whole-model layers kept (default: all on CUDA, 2 on CPU).")
    ] = None,
    block_sizes: Annotated[
        str | None, typer.Option(help="Tensorized inner axis sizes (default: the model's or 128).")
    ] = None,
    causal: Annotated[str | None, typer.Option(help="complete | dominance (default: model's or complete)")] = None,
    sinks: Annotated[int | None, typer.Option(help="Tensorized attention sinks.")] = None,
    local: Annotated[str | None, typer.Option(help="block | window")] = None,
    merge: Annotated[str | None, typer.Option(help="score | lse | mass")] = None,
    rope: Annotated[str | None, typer.Option(help="absolute | axis")] = None,
    long_range: Annotated[
        bool | None, typer.Option("--long-range/--no-long-range", help="Tensorized outer hops on or off.")
    ] = None,
    retrieve: Annotated[
        int | None, typer.Option(help="Far blocks each query reads exactly (the shipped recipes: 8).")
    ] = None,
    retrieve_block: Annotated[
        int | None, typer.Option(help="Slots per retrieved far block (the shipped recipes: 64; 0: the inner block).")
    ] = None,
    retrieve_score_block: Annotated[
        int | None,
        typer.Option(help="Score far blocks by sub-blocks of this many slots (0: whole blocks; 1: exact max q.k)."),
    ] = None,
    retrieve_candidates: Annotated[
        int | None,
        typer.Option(help="Far blocks the bound proposes before the exact max q.k picks --retrieve (0: off)."),
    ] = None,
    retrieve_candidate_share: Annotated[
        float | None,
        typer.Option(help="Candidates as a share of each query's far blocks (0: off; e.g. 0.25)."),
    ] = None,
    grad_checkpointing: Annotated[
        str | None, typer.Option(help="Training step: off | on | both (default: off on CPU, on on CUDA).")
    ] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls per cell (the first one measures memory).")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed calls per cell (median reported).")] = 3,
    threads: Annotated[int | None, typer.Option(help="CPU: torch threads (default: torch's, one per core).")] = None,
    max_call_s: Annotated[
        float | None, typer.Option(help="Skip a method's longer lengths once one of its calls takes longer (s).")
    ] = None,
    profile: Annotated[
        bool, typer.Option(help="Also profile one call per cell (torch.profiler): <out>/profile/*.txt.")
    ] = False,
    score_budget_scale: Annotated[
        int,
        typer.Option(
            help="Score the far-block choice (and no-grad outer hops) in chunks this many times larger: fewer "
            "kernel launches for more transient memory (default 1: chunks sized for a CPU)."
        ),
    ] = 1,
    fused_choice: Annotated[
        bool,
        typer.Option(
            help="Triton backend: make the far-block choice on its fused kernels (default) or, with "
            "--no-fused-choice, in PyTorch chunks as the torch backend does."
        ),
    ] = True,
    out: Annotated[Path, typer.Option("--out", "-o", help="Writes bench.md, bench.json, bench.png here.")] = Path(
        "runs/bench"
    ),
) -> None:
    """Time and peak memory of tensorized attention vs SDPA (and FlashAttention-2), operator and whole model."""
    from .bench.runner import BenchError, BenchSpec, command_line, run_bench

    options = {"causal": causal, "sinks": sinks, "local": local, "merge": merge, "rope": rope}
    options |= {"long_range": long_range, "retrieve": retrieve, "retrieve_block": retrieve_block}
    options |= {"retrieve_score_block": retrieve_score_block, "retrieve_candidates": retrieve_candidates}
    options |= {"retrieve_candidate_share": retrieve_candidate_share}
    try:
        if block_sizes is not None:
            options["block_sizes"] = parse_block_sizes(block_sizes)
    except ValueError as err:
        _fail(str(err))
        return
    spec = BenchSpec(
        model=model,
        lengths=lengths,
        what=what,
        backends=backends,
        baselines=baselines,
        batch=batch,
        dtype=dtype,
        device=device,
        layers=layers,
        options={k: v for k, v in options.items() if v is not None},
        grad_checkpointing=grad_checkpointing,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
        max_call_s=max_call_s,
        profile=profile,
        score_budget_scale=score_budget_scale,
        fused_choice=fused_choice,
        out=out,
    )
    from .bench.report import markdown
    from .interrupt import Interrupted, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            result = run_bench(
                spec, log=lambda msg: console.print(msg, highlight=False, markup=False), command=command_line(spec)
            )
    except BenchError as err:
        _fail(str(err))
        return
    except Interrupted as stopped:
        print(markdown(stopped.result))
        console.print(f"Stopped: partial results in {', '.join(stopped.result['outputs'].values())}", highlight=False)
        raise typer.Exit(130) from None
    print()
    print(markdown(result))  # plain: a markdown table to paste
    failed = sum(1 for c in result["cells"] if c.get("error"))
    if failed:
        err_console.print(f"[yellow]warning:[/] {failed} of {len(result['cells'])} cells failed; see the error column")
    console.print(f"Wrote {', '.join(result['outputs'].values())}", highlight=False)


if __name__ == "__main__":
    app()
