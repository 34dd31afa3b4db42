"""``ctxext eval``: perplexity against length and retrieval grids for a model and its baselines.

Every model (the one under test and each ``--compare`` baseline) runs the same protocol:
the same documents, lengths, depths, seeds. A length that runs out of memory is recorded
as ``"oom"``, not a crash.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpointing
from ..atomic import OutputExistsError, check_output_dir
from ..interrupt import Interrupted

TASK_NAMES = ("ppl", "passkey", "needle", "multikey", "vartrack")
SCORINGS = ("teacher", "generate")
ROPE_SUFFIX = re.compile(r"^(?P<base>.+?)\+(?P<type>linear|dynamic|yarn|llama3)(?P<factor>\d+(\.\d+)?)$")


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message lists every problem."""


@dataclass
class EvalSpec:
    model: str
    out: Path
    lengths: list[int]
    tasks: list[str] = field(default_factory=lambda: ["ppl", "passkey"])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 2
    data: str = "stdlib"
    text_field: str = "text"
    docs: int = 4
    seed: int = 0
    compare: list[str] = field(default_factory=list)
    chunk: int = 2048
    force: bool = False
    scoring: str = "teacher"  # retrieval: teacher-forced argmax, or greedy generation (decode cache)
    context_parallel: int = 1  # ranks sharing each document (perplexity only; launched by the CLI)
    settings: dict = field(default_factory=dict)  # tensorized-attention overrides for the model under test


@dataclass
class ModelEntry:
    """One row of the report: how to load it and what it is."""

    label: str
    source: str
    attention: str | None = None  # force an attention implementation (baselines: "sdpa")
    rope: tuple[str, float] | None = None
    description: str = ""
    settings: dict | None = None  # tensorized-attention settings to override after loading


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1000"`` -> 1000."""
    t = text.strip().lower()
    try:
        if t.endswith("k"):
            return int(float(t[:-1]) * 1024)
        return int(t)
    except ValueError:
        raise EvalError(f"--lengths: {text!r} is not a length (use integers or 4k-style values)") from None


def resolve_entries(spec: EvalSpec) -> list[ModelEntry]:
    """The model under test and its baselines, with readable labels."""
    entries = [
        ModelEntry(_label(spec.model), spec.model, description="model under test", settings=spec.settings or None)
    ]
    if spec.settings:
        changed = ", ".join(f"{k}={v}" for k, v in spec.settings.items())
        entries[0].label += f" ({changed})"
        entries[0].description += f", settings overridden: {changed}"
    for item in spec.compare:
        rope = None
        base = item
        match = ROPE_SUFFIX.match(item)
        if match:
            base = match["base"]
            rope = (match["type"], float(match["factor"]))
        if base == "base":
            entry = ModelEntry(
                item, spec.model, attention="sdpa", rope=rope, description="same weights, full attention"
            )
        else:  # another model runs as it is configured (a tensorized baseline stays tensorized)
            entry = ModelEntry(item if rope else _label(base), base, rope=rope, description="baseline")
        if rope:
            entry.description += f", rope scaling {rope[0]} x{rope[1]:g}"
        entries.append(entry)
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise EvalError(f"--compare: duplicate entries {labels}")
    return entries


def _label(source: str) -> str:
    path = Path(source)
    return path.name if path.exists() else source


def load_entry(entry: ModelEntry, device: torch.device):
    """Load ``(model, tokenizer)`` for an entry (adapters are merged onto their base)."""
    from ..models import apply_rope_scaling, load_causal_lm, resolve_source

    path = Path(entry.source)
    settings = adapter_settings(path)
    if settings is not None:
        model, tokenizer = _load_adapter(path, settings)
    else:
        model, tokenizer = load_causal_lm(resolve_source(entry.source))
    if tokenizer is None:
        raise EvalError(f"{entry.source} has no tokenizer; evaluation needs one")
    if entry.attention and model.config._attn_implementation != entry.attention:
        model.set_attn_implementation(entry.attention)
    if entry.settings:
        override_settings(model, entry.settings)
    if entry.rope:
        apply_rope_scaling(model, *entry.rope)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def adapter_settings(path: Path) -> dict | None:
    """The settings file of an adapter written by ``ctxext finetune`` (base model, attention), or
    None when ``path`` is not an adapter directory."""
    from ..train import SETTINGS_FILE

    if not (path / "adapter_config.json").is_file():
        return None
    return json.loads((path / SETTINGS_FILE).read_text())


def planned_config(entry: ModelEntry):
    """``(config, tensorized settings or None)`` an entry will run with, read without loading
    weights (``--dry-run``): an adapter from ``ctxext finetune`` is its base model's config with
    the settings it trained with; ``--set`` overrides apply to the model under test."""
    from ..models import load_config, resolve_source

    settings = adapter_settings(Path(entry.source))
    if settings is not None:
        config = load_config(resolve_source(settings["base_model"]))
        tensorized = settings.get("tensorized_attention")
        if settings.get("attn_implementation") != "tensorized":
            tensorized = None
    else:
        config = load_config(resolve_source(entry.source))
        tensorized = getattr(config, "tensorized_attention", None)
    if entry.attention:  # a full-attention baseline of the same weights
        tensorized = None
    if tensorized is not None and entry.settings:
        tensorized = {**tensorized, **entry.settings}
    return config, tensorized


def override_settings(model, settings: dict) -> None:
    """Change the tensorized-attention settings of a loaded tensorized model (``--set``), validated."""
    from ..attention.hf import CONFIG_KEY, options_from_config, with_bias_start
    from ..attention.options import TensorizedOptions

    if model.config._attn_implementation != "tensorized":
        raise EvalError("--set changes tensorized-attention settings, but the model under test is not tensorized")
    current = options_from_config(model.config).to_dict()
    if "summary" in settings and settings["summary"] != current["summary"]:
        raise EvalError("--set summary: the summary mode decides which parameters a model has; convert instead")
    try:
        options = TensorizedOptions.from_dict({**current, **settings}, where="--set")
        options = with_bias_start(options, model.config, "--set")
    except ValueError as err:
        raise EvalError(str(err)) from None
    for note in options.advice():
        warnings.warn(f"--set: {note}", UserWarning, stacklevel=2)
    setattr(model.config, CONFIG_KEY, options.to_dict())


def _load_adapter(path: Path, settings: dict):
    """An adapter written by ``ctxext finetune`` (``settings``: its :func:`adapter_settings`):
    base model + settings + LoRA + fully trained tensors."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from ..attention import summary
    from ..attention.options import TensorizedOptions
    from ..models import apply_tensorized, load_causal_lm, resolve_source, restore_rope
    from ..train import TRAINABLE_FILE

    model, _ = load_causal_lm(resolve_source(settings["base_model"]))
    restore_rope(model, settings)  # a rope-scaled fine-tune evaluates with the scaling it trained with
    if settings.get("attn_implementation") == "tensorized":
        apply_tensorized(model, TensorizedOptions.from_dict(settings["tensorized_attention"]))
    with checkpointing.renames_quiet():  # peft reads the old name
        model = PeftModel.from_pretrained(model, path)
    if (path / TRAINABLE_FILE).is_file():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(path / TRAINABLE_FILE)).items():
                params[name].copy_(tensor)
    summary.load(model, path)
    from transformers import AutoTokenizer

    return model.merge_and_unload(), AutoTokenizer.from_pretrained(path)


def validate(spec: EvalSpec) -> list[str]:
    errors = []
    if not spec.lengths:
        errors.append("--lengths: give at least one length")
    for n in spec.lengths:
        if n <= 1:
            errors.append(f"--lengths: {n} is not a positive length > 1")
    for d in spec.depths:
        if not 0.0 <= d <= 1.0:
            errors.append(f"--depths: {d} is outside 0..1")
    for t in spec.tasks:
        if t not in TASK_NAMES:
            errors.append(f"--tasks: unknown task {t!r}; choose from {', '.join(TASK_NAMES)}")
    if spec.scoring not in SCORINGS:
        errors.append(f"--scoring: unknown scoring {spec.scoring!r}; choose teacher or generate")
    if spec.context_parallel < 1:
        errors.append(f"--context-parallel must be >= 1, got {spec.context_parallel}")
    elif spec.context_parallel > 1:
        if spec.tasks != ["ppl"]:
            errors.append("--context-parallel: only the perplexity task runs context-parallel; pass --tasks ppl")
        if spec.compare:
            errors.append(
                "--context-parallel: baselines are not run context-parallel (full attention cannot be sharded "
                "this way); evaluate them in a separate run without --context-parallel"
            )
    if spec.trials < 1 or spec.docs < 1:
        errors.append("--trials and --docs must be >= 1")
    try:
        check_output_dir(spec.out, spec.force)
    except OutputExistsError as err:
        errors.append(f"--out: {err}")
    return errors


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run(spec: EvalSpec, progress: bool = True) -> dict[str, Any]:
    """Run the protocol for every entry; write report.json, report.md and PNGs into ``spec.out``."""
    from tqdm.auto import tqdm

    from .perplexity import load_docs

    errors = validate(spec)
    entries = resolve_entries(spec) if not errors else []
    if errors:
        raise EvalError("cannot evaluate:\n  - " + "\n  - ".join(errors))
    group = _context_group(spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if group is not None and device.type == "cuda":
        import torch.distributed as dist

        device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    retrieval = [t for t in spec.tasks if t != "ppl"]
    progress = progress and (group is None or _rank() == 0)

    # Load the first model now: a bad source or a missing tokenizer fails before the long work.
    first = [load_entry(entries[0], device)]
    tokenizer = first[0][1]
    docs = load_docs(spec.data, tokenizer, spec.text_field) if "ppl" in spec.tasks else None
    problems = _check_lengths(spec, tokenizer, docs, retrieval)
    if problems:
        raise EvalError("cannot evaluate:\n  - " + "\n  - ".join(problems))

    per_model = (
        len(spec.lengths) * (spec.docs if docs else 0)
        + len(retrieval) * len(spec.lengths) * len(spec.depths) * spec.trials
    )
    bar = tqdm(total=per_model * len(entries), desc="eval", unit="pass", disable=not progress, dynamic_ncols=True)
    report: dict[str, Any] = {
        "protocol": _protocol(spec, docs, device),
        "models": [asdict(e) for e in entries],
        "perplexity": {},
        "tasks": {t: {} for t in retrieval},
        "misses": {t: {} for t in retrieval},  # what the model answered where it was wrong
        "seconds": {},
    }
    try:
        _evaluate_entries(spec, entries, first, docs, retrieval, device, group, bar, report)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under sigterm_as_interrupt: keep what finished
        done, total = bar.n, bar.total
        bar.close()
        mark_not_run(report, spec)
        report["protocol"]["stopped"] = (
            f"interrupted after {done} of {total} passes; cells marked 'not run' were not measured"
        )
        if group is None or _rank() == 0:
            _write(report, spec)
        raise Interrupted(report, report["protocol"]["stopped"]) from None
    bar.close()
    if group is not None:
        report["protocol"]["context_parallel"] = spec.context_parallel
        if _rank() != 0:
            report["protocol"]["rank"] = _rank()
            return report  # rank 0 writes the report
    _write(report, spec)
    return report


def _write(report: dict[str, Any], spec) -> None:
    """report.json, report.md and the plots into ``spec.out``, atomically (never half a report)."""
    from ..atomic import atomic_directory
    from .report import write_report

    with atomic_directory(spec.out, force=spec.force) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_report(report, tmp)


def _evaluate_entries(spec, entries, first: list, docs, retrieval, device, group, bar, report) -> None:
    """Fill ``report`` model by model; ``bar`` counts passes.

    first: ``[(model, tokenizer)]`` of ``entries[0]``, loaded by the caller to fail early; taken
    out of the list here, so each model is freed before the next one loads.
    """
    from ..layer_progress import layer_progress
    from .perplexity import load_docs

    docs_key = _tokenizer_key(first[0][1])
    for i, entry in enumerate(entries):
        start = time.time()
        model, tokenizer = first.pop() if i == 0 else load_entry(entry, device)
        if i > 0 and docs is not None and _tokenizer_key(tokenizer) != docs_key:
            # A baseline with another tokenizer scores the same documents in its own tokens.
            docs = load_docs(spec.data, tokenizer, spec.text_field)
            docs_key = _tokenizer_key(tokenizer)
        bar.set_description(f"eval {entry.label}")
        report["models"][i]["attn_implementation"] = model.config._attn_implementation
        report["models"][i]["tensorized_attention"] = getattr(model.config, "tensorized_attention", None)
        _advise_on_length(spec, report["models"][i])
        with layer_progress(model, enabled=not bar.disable):
            _score_model(spec, entry.label, model, tokenizer, docs, retrieval, group, bar, report)
        report["seconds"][entry.label] = round(time.time() - start, 1)
        del model
        _free()


def _score_model(spec, label: str, model, tokenizer, docs, retrieval, group, bar, report) -> None:
    """Every perplexity and retrieval cell of one model into ``report``; ``bar`` counts passes."""
    from ..generation import answer_matches, generated_answer
    from .perplexity import document_nll, perplexity
    from .retrieval import teacher_forced_prediction
    from .tasks import make_sample

    if docs is not None:
        rows = report["perplexity"][label] = {}
        for length in spec.lengths:
            chosen, skipped = docs.select(length, spec.docs)
            cell: dict[str, Any] = {"docs": len(chosen), "skipped_short": skipped}
            total, tokens = 0.0, 0
            try:
                for ids in chosen:
                    nll, n = document_nll(model, ids[:length], chunk=spec.chunk, group=group)
                    total, tokens = total + nll, tokens + n
                    bar.update(1)
                cell.update(nll=total / tokens if tokens else None, ppl=perplexity(total, tokens), tokens=tokens)
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if not _is_oom(err):
                    raise
                cell["oom"] = True
                _free()
            bar.update(spec.docs - len(chosen))
            rows[str(length)] = cell
            _announce(bar, label, "ppl", length, _ppl_text(cell))
    for task in retrieval:
        grid = report["tasks"][task][label] = {}
        misses = report["misses"][task][label] = []
        for length in spec.lengths:
            row = grid[str(length)] = {}
            for depth in spec.depths:
                correct, oom = 0, False
                for trial in range(spec.trials):
                    sample = make_sample(task, tokenizer, length, depth, seed=spec.seed * 10_000 + trial)
                    try:
                        if spec.scoring == "generate":
                            prompt = sample.input_ids[: sample.answer_start]
                            said = generated_answer(model, tokenizer, prompt, sample.answer)
                            ok = answer_matches(said, sample.answer)
                        else:
                            want = sample.input_ids[sample.answer_start :]
                            got = teacher_forced_prediction(model, sample.input_ids, sample.answer_start)
                            ok, said = got == want, tokenizer.decode(got, clean_up_tokenization_spaces=False)
                        correct += ok
                        if not ok:
                            miss = {"length": length, "depth": depth, "trial": trial, "answer": sample.answer}
                            misses.append({**miss, "predicted": said})
                    except (RuntimeError, torch.OutOfMemoryError) as err:
                        if not _is_oom(err):
                            raise
                        oom = True
                        _free()
                    bar.update(1)
                row[f"{depth:g}"] = "oom" if oom else correct / spec.trials
                result = "OOM" if oom else f"{correct} / {spec.trials} right"
                _announce(bar, label, task, length, f"depth {depth:g}: {result}")


def length_note(settings: dict, lengths: list[int], where: str = "tensorized_attention") -> str | None:
    """:func:`ctxext.attention.retrieve.length_advice` for tensorized ``settings`` at the longest of
    ``lengths``; raises ``TensorizedConfigError`` for invalid settings (named as ``where``)."""
    from ..attention.options import TensorizedOptions
    from ..attention.retrieve import length_advice

    return length_advice(TensorizedOptions.from_dict(settings, where=where), max(lengths))


def _advise_on_length(spec, entry: dict[str, Any]) -> None:
    """Warn (and note in the report) when the model's far-block choice is too narrow for the longest length.

    Under context parallelism every rank notes it, and only rank 0 warns (one line, not one per rank)."""
    settings = entry.get("tensorized_attention")
    if entry.get("attn_implementation") != "tensorized" or not settings:
        return
    note = length_note(settings, spec.lengths)
    if note:
        entry["advice"] = [note]
        if _rank() == 0:
            warnings.warn(f"{entry['label']}: {note}", UserWarning, stacklevel=2)


def _announce(bar, label: str, task: str, length: int, result: str) -> None:
    """One line above the progress bar per finished cell, so a long run shows its results as they come."""
    if not bar.disable:
        bar.write(f"{label}  {task} at {length:,} tokens, {result}", file=bar.fp)


def _ppl_text(cell: dict[str, Any]) -> str:
    if cell.get("oom"):
        return "OOM"
    if cell.get("ppl") is None:
        return "no document that long"
    return f"perplexity {cell['ppl']:.2f} ({cell['docs']} doc{'s' if cell['docs'] != 1 else ''})"


def mark_not_run(report: dict[str, Any], spec) -> None:
    """Give every cell an interrupted run did not finish a 'not run' value, for each model begun.

    Perplexity: ``{"docs": 0, "not_run": True}``; retrieval tasks: ``None`` per depth. A cell is
    finished or absent (the one in progress is dropped), so the report never shows half a cell.
    """
    for rows in report["perplexity"].values():
        for length in spec.lengths:
            rows.setdefault(str(length), {"docs": 0, "not_run": True})
    for grid in report["tasks"].values():
        for rows in grid.values():
            for length in spec.lengths:
                row = rows.setdefault(str(length), {})
                for depth in spec.depths:
                    row.setdefault(f"{depth:g}", None)


def _tokenizer_key(tokenizer) -> tuple:
    """Cheap identity of a tokenizer: vocabulary size and the ids of a probe text."""
    probe = "def tensorized(x):\n    return 42  # The quick brown fox."
    return len(tokenizer), tuple(tokenizer(probe, add_special_tokens=False).input_ids)


def _check_lengths(spec: EvalSpec, tokenizer, docs, retrieval: list[str]) -> list[str]:
    from .tasks import min_length

    problems = []
    if docs is not None:
        longest = docs.longest()
        too_long = [n for n in spec.lengths if n > longest]
        if too_long:
            problems.append(
                f"--lengths: {', '.join(map(str, too_long))} exceed the longest document of --data {spec.data!r} "
                f"({longest} tokens); use shorter lengths or longer documents"
            )
    for task in retrieval:
        need = min_length(task, tokenizer)
        short = [n for n in spec.lengths if n < need]
        if short:
            problems.append(f"--lengths: {', '.join(map(str, short))} too short for {task} (needs >= {need} tokens)")
    return problems


def _protocol(spec: EvalSpec, docs, device) -> dict[str, Any]:
    return {
        "lengths": spec.lengths,
        "perplexity": {
            "data": spec.data,
            "documents_per_length": spec.docs,
            "documents_read": docs.read if docs else 0,
            "scoring": "each document scored on its first L tokens (no sliding window); mean NLL per token over "
            "all scored tokens; documents shorter than L are skipped and counted",
            "loss_chunk": spec.chunk,
        }
        if docs
        else None,
        "retrieval": {
            "depths": spec.depths,
            "trials_per_cell": spec.trials,
            "seeds": [spec.seed * 10_000 + t for t in range(spec.trials)],
            "scoring": RETRIEVAL_SCORING[spec.scoring],
            "scoring_mode": spec.scoring,  # "teacher" or "generate"
        },
        "device": str(device),
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "torch": torch.__version__,
    }


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _context_group(spec: EvalSpec):
    """The process group sharing each document (None without --context-parallel).

    The CLI launches ``spec.context_parallel`` processes through ``torch.distributed.run``; each
    joins the default group here (gloo on CPU, NCCL on CUDA) and scores its shard of every document.
    """
    if spec.context_parallel == 1:
        return None
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise EvalError(
                f"--context-parallel {spec.context_parallel} needs {spec.context_parallel} processes: run it "
                "through `ctxext eval`, which launches them, or under torchrun"
            )
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    if dist.get_world_size() != spec.context_parallel:
        raise EvalError(f"--context-parallel {spec.context_parallel}: {dist.get_world_size()} processes were launched")
    return dist.group.WORLD


RETRIEVAL_SCORING = {
    "teacher": "teacher-forced: correct when the argmax at every answer position equals the answer token, in one "
    "forward pass",
    "generate": "greedy generation with the model's cache (the tensorized decode cache on tensorized models): "
    "correct when the continuation starts with the answer",
}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def estimate_memory_gib(config, length: int, tensorized: dict | None, bytes_per_value: int = 4) -> dict[str, float]:
    """Inference peak-memory estimate for one forward of ``length`` tokens (weights + one layer + loss chunk)."""
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", heads)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    params = config.vocab_size * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    params += config.num_hidden_layers * (
        hidden * head_dim * (heads * 2 + kv_heads * 2) + 3 * hidden * inter + 2 * hidden
    )
    layer = length * (4 * hidden + 3 * inter + 2 * kv_heads * head_dim) * bytes_per_value
    if tensorized:
        n = (tensorized.get("block_sizes") or [128])[-1]
        keys = n * (2 if tensorized.get("local") == "window" else 1) + int(tensorized.get("sinks") or 0)
        attention = 2 * heads * length * keys * 4
    else:
        attention = heads * length * 4 * 64  # fused SDPA: O(N) per head
    return {
        "weights": params * bytes_per_value / 2**30,
        "activations": (layer + attention) / 2**30,
        "loss chunk": 2048 * config.vocab_size * 4 / 2**30,
    }
