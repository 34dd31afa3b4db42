"""``ctxext bench``: the spec, validation, the section registry and the run.

A benchmark is a list of **sections** (``--what``). Each section is a function
``run(ctx: BenchContext) -> list[dict]`` returning cells (one per method, mode and
length); the registry :data:`SECTIONS` maps its name to ``"module:function"`` and imports
it only when asked. To add a section (``decode`` is the next one: decode tokens/s at
8k/32k/128k against SDPA with its KV cache), write ``ctxext/bench/decode.py`` with a
``run(ctx)`` and add ``"decode": "ctxext.bench.decode:run"`` here; the table, the JSON,
the plot and the ratios pick its cells up unchanged.

A cell is a dict with at least ``section``, ``mode``, ``method``, ``n`` (tokens),
``median_s`` (seconds or None), ``peak_mib`` (or None) and ``error`` (None or one line);
optional keys: ``tokens_per_s``, ``floor_s``, ``x_floor``, ``times_s``, ... The runner adds
``speedup_vs_sdpa`` (SDPA time / this time, > 1: faster than SDPA) and ``memory_vs_sdpa``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attention import fused_choice, score_budget
from ..attention.options import TensorizedOptions
from ..interrupt import Interrupted
from .methods import (
    BASELINES,
    TA_BACKENDS,
    Method,
    build_methods,
    default_backends,
    default_baselines,
    flash_problem,
)

SECTIONS: dict[str, str] = {
    "attention": "ctxext.bench.attention:run",
    "model": "ctxext.bench.model:run",
    "decode": "ctxext.bench.decode:run",
}
DEFAULT_WHAT = ("attention", "model")
CPU_LENGTHS = (1024, 2048, 4096)
CUDA_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
CPU_DEFAULT_LAYERS = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16}
GRAD_CHECKPOINTING = ("off", "on", "both")


class BenchError(ValueError):
    """Bad benchmark input; the message names every bad flag and what to pass instead."""


def parse_lengths(text: str) -> list[int]:
    """``"1k,2k,4096"`` -> ``[1024, 2048, 4096]``; a clear error naming ``--lengths`` otherwise."""
    out = []
    for part in text.split(","):
        t = part.strip().lower()
        if not t:
            continue
        try:
            value = int(float(t[:-1]) * 1024) if t.endswith("k") else int(t)
        except ValueError:
            raise BenchError(
                f"--lengths: {part.strip()!r} is not a length; use integers or k-suffixed values such as 1k,2k,4096"
            ) from None
        if value < 1:
            raise BenchError(f"--lengths: lengths must be positive, got {part.strip()!r}")
        out.append(value)
    if not out:
        raise BenchError("--lengths: give at least one length, such as 1k,2k,4k")
    return sorted(dict.fromkeys(out))


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


@dataclass
class BenchSpec:
    """What ``ctxext bench`` runs; None means a device-dependent default."""

    model: str = "smollm2"
    lengths: str | None = None  # "1k,2k"; None: 1k,2k,4k on CPU, 4k..128k on CUDA
    what: str = ",".join(DEFAULT_WHAT)
    backends: str | None = None  # tensorized backends; None: torch (+ triton on CUDA)
    baselines: str | None = None  # None: sdpa (+ flash2 where importable on CUDA)
    batch: int = 1
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    layers: int | None = None  # None: all on CUDA, 2 on CPU
    options: dict[str, Any] = field(default_factory=dict)  # tensorized settings over the model config's
    grad_checkpointing: str | None = None  # off | on | both; None: off on CPU, on on CUDA
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None  # CPU: torch threads (None: torch's default)
    max_call_s: float | None = None  # a method's longer lengths are skipped once one call exceeds it
    profile: bool = False  # one more call per cell under torch.profiler: <out>/profile/*.txt
    score_budget_scale: int = 1  # chunks of the no-grad score computations this many times larger
    fused_choice: bool = True  # the Triton backend makes the far-block choice on its fused kernels
    out: Path = Path("runs/bench")


@dataclass
class BenchContext:
    """Everything a section needs; sections add JSON metadata to ``info[section]``."""

    spec: BenchSpec
    device: torch.device
    dtype: torch.dtype
    config: Any  # the transformers config of --model
    model_label: str
    lengths: list[int]
    methods: list[Method]
    options: TensorizedOptions  # backend is set per method
    layers: int
    grad_checkpointing: str
    log: Callable[[str], None]
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    done: list[dict[str, Any]] = field(default_factory=list)  # every cell reported so far (kept if stopped)

    def __post_init__(self) -> None:
        self._start = time.perf_counter()

    def progress(self, cell: dict[str, Any]) -> None:
        """One line per measured cell, with the elapsed time of the run."""
        self.done.append(cell)
        elapsed = time.perf_counter() - self._start
        where = f"{cell['section']:<9} {cell['mode']:<10} N={cell['n']:>6} {cell['method']:<12}"
        if cell.get("error"):
            self.log(f"  {where} ERROR {cell['error']}  [{elapsed:.0f} s]")
            return
        peak = cell.get("peak_mib")
        mem = f"  peak {peak:.1f} MiB" if peak is not None else ""
        self.log(f"  {where} {cell['median_s']:.4f} s{mem}  [{elapsed:.0f} s]")


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise BenchError(f"--device: {text!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available here; use --device cpu")
    return device


def build_context(spec: BenchSpec, log: Callable[[str], None] = print) -> BenchContext:
    """Validate ``spec`` (every problem reported at once) and resolve its defaults."""
    from .sources import BenchSourceError, load_bench_config

    errors: list[str] = []
    device = torch.device("cpu")
    try:
        device = resolve_device(spec.device)
    except BenchError as err:
        errors.append(str(err))
    lengths: list[int] = []
    try:
        lengths = (
            parse_lengths(spec.lengths)
            if spec.lengths
            else list(CUDA_LENGTHS if device.type == "cuda" else CPU_LENGTHS)
        )
    except BenchError as err:
        errors.append(str(err))
    what = _split(spec.what) or []
    for name in what:
        if name not in SECTIONS:
            errors.append(f"--what: unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    if not what:
        errors.append(f"--what: give at least one section ({', '.join(SECTIONS)})")
    backends = _split(spec.backends)
    backends = list(default_backends(device)) if backends is None else backends
    for b in backends:
        if b not in TA_BACKENDS:
            errors.append(f"--backends: unknown tensorized backend {b!r}; choose from {', '.join(TA_BACKENDS)}")
    baselines = _split(spec.baselines)
    baselines = list(default_baselines(device)) if baselines is None else baselines
    for b in baselines:
        if b not in BASELINES:
            errors.append(f"--baselines: unknown baseline {b!r}; choose from {', '.join(BASELINES)}")
    if "sdpa" not in baselines:
        baselines = ["sdpa", *baselines]  # every ratio is against SDPA, measured in the same run
    dtype_name = spec.dtype if spec.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if dtype_name not in DTYPES:
        errors.append(f"--dtype: unknown dtype {spec.dtype!r}; choose auto, float32, bfloat16 (bf16) or float16")
    if spec.batch < 1:
        errors.append(f"--batch must be at least 1, got {spec.batch}")
    if spec.layers is not None and spec.layers < 1:
        errors.append(f"--layers must be at least 1, got {spec.layers}")
    if spec.warmup < 1 or spec.repeats < 1:
        errors.append(f"--warmup and --repeats must be at least 1, got {spec.warmup} and {spec.repeats}")
    if spec.score_budget_scale < 1:
        errors.append(f"--score-budget-scale must be at least 1, got {spec.score_budget_scale}")
    ckpt = spec.grad_checkpointing or ("on" if device.type == "cuda" else "off")
    if ckpt not in GRAD_CHECKPOINTING:
        errors.append(f"--grad-checkpointing: choose off, on or both, got {ckpt!r}")
    config, label = None, spec.model
    try:
        config, label = load_bench_config(spec.model)
    except BenchSourceError as err:
        errors.append(str(err))
    options = TensorizedOptions()
    if config is not None:
        from ..attention.hf import CONFIG_KEY

        raw = {**(getattr(config, CONFIG_KEY, None) or {}), **spec.options}
        known = {f.name for f in dataclasses.fields(TensorizedOptions)}
        raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known}
        options = TensorizedOptions(**raw)
        for problem in options.problems(where="option"):
            errors.append(re.sub(r"option\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), problem))
    if spec.threads is not None and spec.threads < 1:
        errors.append(f"--threads must be at least 1, got {spec.threads}")
    if errors:
        raise BenchError("cannot benchmark:\n  - " + "\n  - ".join(errors))
    total_layers = config.num_hidden_layers
    layers = spec.layers or (min(CPU_DEFAULT_LAYERS, total_layers) if device.type == "cpu" else total_layers)
    ctx = BenchContext(
        spec=spec,
        device=device,
        dtype=DTYPES[dtype_name],
        config=config,
        model_label=label,
        lengths=lengths,
        methods=build_methods(baselines, backends),
        options=options,
        layers=min(layers, total_layers),
        grad_checkpointing=ckpt,
        log=log,
    )
    if "model" in what and spec.layers is None and ctx.layers < total_layers:
        ctx.notes.append(
            f"model section: {ctx.layers} of {total_layers} layers (the CPU default; pass --layers N to change it); "
            "random weights from the config."
        )
    if spec.baselines is None and "flash2" not in baselines:
        ctx.notes.append(f"FlashAttention-2 not run: {flash_problem(device)}.")
    if spec.backends is None and "triton" not in backends:
        ctx.notes.append("tensorized backend triton not run: it needs CUDA (--backends torch,triton records why).")
    return ctx


def section_runner(name: str) -> Callable[[BenchContext], list[dict[str, Any]]]:
    module, func = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), func)


def add_ratios(cells: list[dict[str, Any]]) -> None:
    """``speedup_vs_sdpa`` = SDPA time / cell time and ``memory_vs_sdpa`` = cell peak / SDPA peak, same run."""
    base = {(c["section"], c["mode"], c["n"]): c for c in cells if c["method"] == "sdpa" and not c.get("error")}
    for c in cells:
        ref = base.get((c["section"], c["mode"], c["n"]))
        ok = ref is not None and not c.get("error") and c.get("median_s")
        c["speedup_vs_sdpa"] = ref["median_s"] / c["median_s"] if ok else None
        peak, ref_peak = c.get("peak_mib"), ref.get("peak_mib") if ref else None
        c["memory_vs_sdpa"] = peak / ref_peak if ok and peak is not None and ref_peak and ref_peak > 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_bench(spec: BenchSpec, log: Callable[[str], None] = print, command: str | None = None) -> dict[str, Any]:
    """Run every section of ``spec``; write ``bench.json``, ``bench.md`` and ``bench.png`` into ``spec.out``."""
    from . import report
    from .measure import memory_method

    ctx = build_context(spec, log)
    sections = _split(spec.what) or []
    log(
        f"bench {ctx.model_label} on {ctx.device} ({str(ctx.dtype).replace('torch.', '')}, batch {spec.batch}): "
        f"sections {', '.join(sections)}; lengths {', '.join(map(str, ctx.lengths))}; "
        f"methods {', '.join(m.name for m in ctx.methods)}"
    )
    for note in ctx.notes:
        log(f"note: {note}")
    start = time.perf_counter()
    cells: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    if spec.threads and ctx.device.type == "cpu":
        torch.set_num_threads(spec.threads)
    stopped = None
    try:
        with score_budget.scaled(spec.score_budget_scale), fused_choice.switched(spec.fused_choice):
            for name in sections:
                log(f"[{name}]")
                cells += section_runner(name)(ctx)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under sigterm_as_interrupt: keep the measured cells
        cells = list(ctx.done)
        stopped = f"stopped: interrupted after {len(cells)} cells; the report holds those only"
        ctx.notes.append(stopped)
    finally:
        torch.set_num_threads(threads)
    env = environment(ctx.device)
    add_ratios(cells)
    result = {
        "command": command,
        "environment": env,
        "model": ctx.model_label,
        "sections": sections,
        "lengths": ctx.lengths,
        "methods": [m.name for m in ctx.methods],
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "batch": spec.batch,
        "tensorized_options": {k: v for k, v in ctx.options.to_dict().items() if k != "backend"},
        "timing": f"median of {spec.repeats} timed calls after {spec.warmup} untimed warm-up call(s)"
        + (
            f"; a method's longer lengths are skipped once a call after the warm-up exceeds {spec.max_call_s} s"
            if spec.max_call_s
            else ""
        ),
        "memory_method": memory_method(ctx.device),
        "score_budget_scale": spec.score_budget_scale,
        "fused_choice": spec.fused_choice,
        "notes": ctx.notes,
        "info": ctx.info,
        "wall_s": time.perf_counter() - start,
        "cells": cells,
    }
    report.write(result, Path(spec.out))
    if stopped:
        raise Interrupted(result, stopped)
    return result


def command_line(spec: BenchSpec) -> str:
    """The ``ctxext bench`` command that reproduces ``spec`` (every flag that differs from the default)."""
    import shlex

    default = BenchSpec()
    args = ["ctxext", "bench"]
    for name in (f.name for f in dataclasses.fields(BenchSpec) if f.name != "options"):
        value = getattr(spec, name)
        if isinstance(value, bool):  # a flag (--x) or a --x/--no-x pair: only where it differs from the default
            if value != getattr(default, name):
                args.append(("--" if value else "--no-") + name.replace("_", "-"))
            continue
        if value is not None and (value != getattr(default, name) or name == "model"):
            args += ["--" + name.replace("_", "-"), str(value)]
    for key, value in spec.options.items():
        if isinstance(value, bool):  # a --flag/--no-flag pair
            args.append(("--" if value else "--no-") + key.replace("_", "-"))
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        args += ["--" + key.replace("_", "-"), str(value)]
    return shlex.join(args)
