"""Fine-tuning recipes: dataclasses, ``load(path, overrides)``, and validation that reports every
problem at once, naming the key as the user wrote it (with a did-you-mean for typos)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .attention.options import TensorizedOptions
from .retrieval_data import RECALL_PLACES, SPREADS

ATTENTION_KINDS = ("tensorized", "sdpa", "eager")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "bf16", "fp16")


class RecipeError(ValueError):
    """A recipe (or its overrides) is invalid; the message lists every problem."""


@dataclass
class ModelSection:
    source: str = "smollm2"  # Hub id, model directory, .gguf file, or 'smollm2' (embedded)
    attention: str = "tensorized"  # tensorized | sdpa | eager (sdpa/eager: full-attention baselines)
    tensorized: dict[str, Any] = field(default_factory=dict)  # operator settings (DESIGN.md section 1)
    rope_scaling: str | None = None  # linear | dynamic | yarn | llama3
    rope_factor: float = 0.0  # > 1 when rope_scaling is set
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    allow_pickle: bool = False  # load .bin weights (trusted sources only)


@dataclass
class LoraSection:
    rank: int = 16  # higher: more capacity, more memory
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: q,k,v,o projections of the architecture
    trainable: list[str] = field(default_factory=lambda: ["embed_tokens", "norm"])  # fully trained (name parts)
    quantize: str = "none"  # none | 4bit (QLoRA: CUDA + bitsandbytes)


@dataclass
class DataSection:
    source: str = "stdlib"  # 'stdlib' (local Python sources), files/dirs (.txt .md .py .jsonl .json .parquet), Hub name
    text_field: str = "text"  # field holding the text in JSONL/Parquet/Hub data
    split: str = "train"
    seq_len: int = 1024  # tokens per training sequence
    packing: bool = True  # concatenate documents (EOS-separated) into seq_len blocks
    max_samples: int | None = None  # documents to read at most
    max_tokens: int | None = None  # tokens to keep at most after tokenising
    seed: int = 0  # data order
    retrieval: float = 0.0  # fraction of blocks turned into retrieval blocks (records spliced in, recalled at the end)
    retrieval_records: int = 8  # records per retrieval block
    retrieval_spread: str = "random"  # random | even: spaced along the read order, so every run reads the fraction
    retrieval_recalls: str = "tail"  # tail: recalls one after another at the end | interleaved: each amid the text
    cache_dir: str | None = None  # tokenised-data cache (default: <output_dir>/../.cache/ctxext-data)


@dataclass
class TrainSection:
    output_dir: str = "runs/finetune"
    lr: float = 2e-4
    schedule: str = "cosine"  # constant | linear | cosine
    warmup_steps: int = 10
    steps: int = 100  # optimizer steps
    batch_size: int = 1  # sequences per device per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    gradient_checkpointing: bool = True  # less memory, ~30% more compute
    precision: str = "no"  # no | bf16 | fp16 (mixed precision on devices that support it)
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 50  # checkpoint interval in optimizer steps (0: only at the end)
    keep_checkpoints: int = 2  # checkpoints left when the run ends, newest first (0: all, for learning curves)
    max_minutes: float = 0.0  # wall-clock budget: stop after the step that passes it and save as at the end (0: none)
    log_every: int = 1
    loss_chunk: int = 2048  # positions per LM-head chunk (never full-sequence logits)
    resume: bool = False  # continue from the latest checkpoint in output_dir


@dataclass
class DistillSection:
    weight: float = 0.0  # share of the loss that is KL to the teacher: 0 off, 1 KL only (dense signal for far hops)
    teacher: str = "base"  # 'base' (model.source with its own full attention, frozen) or a model dir / Hub id
    temperature: float = 1.0  # softens both distributions; the KL is scaled by temperature**2
    attention_transfer: bool = False  # fit summary=learned parts to exact attention layer by layer (replaces the loss)


@dataclass
class AccelerateSection:
    config: str | None = None  # accelerate config file (FSDP, DeepSpeed); launch with `accelerate launch`


@dataclass
class ParallelSection:
    context: int = 1  # ranks sharing one sequence (context parallelism); world size = data-parallel x context


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    accelerate: AccelerateSection = field(default_factory=AccelerateSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def tensorized_options(self) -> TensorizedOptions:
        return TensorizedOptions.from_dict(self.model.tensorized, where="model.tensorized")


SECTIONS = {f.name: f.type for f in fields(Recipe)}


def _section_classes() -> dict[str, type]:
    return get_type_hints(Recipe)


def _suggest(name: str, options) -> str:
    hint = difflib.get_close_matches(name, sorted(options), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else f" (known: {', '.join(sorted(options))})"


def _check_type(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits the (simple) annotation used in the sections."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is Any:
        return True
    if origin is None:
        if annotation is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        if annotation is int:
            return isinstance(value, int) and not isinstance(value, bool)
        return isinstance(value, annotation)
    if origin in (list,):
        return isinstance(value, list) and all(_check_type(v, args[0]) for v in value)
    if origin in (dict,):
        return isinstance(value, dict)
    # Optional / unions
    return any(_check_type(value, a) if a is not type(None) else value is None for a in args)


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def parse_assignment(text: str, what: str, example: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> ``(KEY, value)``, the value parsed as YAML (text that is not YAML stays text).

    what and example name the argument in the error, e.g. ``("--set", "--set rope=axis")``.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"{what} {text!r}: expected KEY=VALUE, e.g. {example}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-4"`` -> ``("train.lr", 1e-4)``: one ``section.key=value`` recipe override."""
    return parse_assignment(text, "override", "train.steps=200")


def parse_settings(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["rope=axis", "block_sizes=[64,64]"]`` -> ``{"rope": "axis", "block_sizes": [64, 64]}``.

    Tensorized-attention settings as ``ctxext eval --set`` takes them (values parsed as YAML);
    they are validated where they are applied (``TensorizedOptions.from_dict``).
    """
    return dict(parse_assignment(item, "--set", "--set rope=axis") for item in items)


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply ``section.key=value`` overrides, validate; raise :class:`RecipeError`."""
    raw: dict[str, Any] = {}
    errors: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(
                f"recipe {path} does not exist; shipped recipes are in recipes/ (e.g. recipes/tiny-debug.yaml)"
            )
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise RecipeError(
                f"recipe {path} must be a mapping of sections (model, lora, data, train, distill, accelerate, parallel)"
            )
    for item in overrides:
        try:
            key, value = parse_override(item)
        except RecipeError as err:
            errors.append(str(err))
            continue
        section, _, name = key.partition(".")
        if not name:
            errors.append(f"override {item!r}: expected section.key=value, e.g. train.steps=200")
            continue
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            errors.append(f"{section}: must be a mapping")
            continue
        raw[section][name] = value
    recipe = _build(raw, errors)
    acc = recipe.accelerate.config
    if path is not None and acc and not Path(acc).is_absolute() and (path.parent / acc).is_file():
        recipe.accelerate.config = str(path.parent / acc)  # relative to the recipe's folder
    errors += validate(recipe)
    if errors:
        where = f" in {path}" if path else ""
        raise RecipeError(f"{len(errors)} problem(s){where}:\n  - " + "\n  - ".join(errors))
    return recipe


def _build(raw: dict[str, Any], errors: list[str]) -> Recipe:
    classes = _section_classes()
    sections = {}
    for name in raw:
        if name not in classes:
            errors.append(f"{name}: unknown section{_suggest(name, classes)}")
    for name, cls in classes.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            errors.append(f"{name}: must be a mapping of settings, got {values!r}")
            values = {}
        hints = get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                errors.append(f"{name}.{key}: unknown setting{_suggest(key, hints)}")
                continue
            if hints[key] is float and isinstance(value, str):
                try:  # YAML reads 1e-4 (no dot) as a string
                    value = float(value)
                except ValueError:
                    pass
            if not _check_type(value, hints[key]):
                errors.append(f"{name}.{key}: expected {_type_name(hints[key])}, got {value!r}")
                continue
            kwargs[key] = float(value) if hints[key] is float else value
        sections[name] = cls(**kwargs)
    return Recipe(**sections)


def validate(recipe: Recipe) -> list[str]:
    """Every semantic problem in a recipe, as messages naming the key."""
    errors: list[str] = []
    m, lo, d, t = recipe.model, recipe.lora, recipe.data, recipe.train
    if m.attention not in ATTENTION_KINDS:
        errors.append(f"model.attention: unknown kind {m.attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    if m.attention == "tensorized":
        try:
            recipe.tensorized_options()
        except ValueError as err:
            errors += [line.strip()[2:] for line in str(err).splitlines()[1:]]
    elif m.tensorized:
        errors.append("model.tensorized: settings given but model.attention is not 'tensorized'")
    if m.rope_scaling is not None and m.rope_scaling not in ("linear", "dynamic", "yarn", "llama3"):
        errors.append(f"model.rope_scaling: unknown type {m.rope_scaling!r}; choose linear, dynamic, yarn or llama3")
    if m.rope_scaling and m.rope_factor <= 1:
        errors.append(f"model.rope_factor: must be > 1 with rope_scaling, got {m.rope_factor}")
    if m.dtype not in ("auto", "float32", "bfloat16", "float16"):
        errors.append(f"model.dtype: unknown dtype {m.dtype!r}; choose auto, float32, bfloat16 or float16")
    positive = [
        ("lora.rank", lo.rank),
        ("lora.alpha", lo.alpha),
        ("data.seq_len", d.seq_len),
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("train.loss_chunk", t.loss_chunk),
        ("train.log_every", t.log_every),
    ]
    for key, value in positive:
        if value <= 0:
            errors.append(f"{key}: must be > 0, got {value}")
    for key, value in (("data.max_samples", d.max_samples), ("data.max_tokens", d.max_tokens)):
        if value is not None and value <= 0:
            errors.append(f"{key}: must be > 0 when set, got {value}")
    if not 0 <= d.retrieval <= 1:
        errors.append(f"data.retrieval: a fraction of blocks in [0, 1], got {d.retrieval}")
    if d.retrieval and d.retrieval_records <= 0:
        errors.append(f"data.retrieval_records: must be > 0 when data.retrieval is set, got {d.retrieval_records}")
    if d.retrieval_spread not in SPREADS:
        errors.append(f"data.retrieval_spread: {' or '.join(SPREADS)}, got {d.retrieval_spread!r}")
    if d.retrieval_recalls not in RECALL_PLACES:
        errors.append(f"data.retrieval_recalls: {' or '.join(RECALL_PLACES)}, got {d.retrieval_recalls!r}")
    if lo.quantize not in ("none", "4bit"):
        errors.append(f"lora.quantize: unknown value {lo.quantize!r}; choose none or 4bit")
    if not 0 <= lo.dropout < 1:
        errors.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if t.lr <= 0:
        errors.append(f"train.lr: must be > 0, got {t.lr}")
    if t.warmup_steps < 0 or t.save_every < 0:
        errors.append("train.warmup_steps and train.save_every must be >= 0")
    if t.keep_checkpoints < 0:
        errors.append(f"train.keep_checkpoints: must be >= 0 (0 keeps every checkpoint), got {t.keep_checkpoints}")
    if t.max_minutes < 0:
        errors.append(f"train.max_minutes: must be >= 0 (0: no time limit), got {t.max_minutes}")
    if t.schedule not in SCHEDULES:
        errors.append(f"train.schedule: unknown schedule {t.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if t.precision not in PRECISIONS:
        errors.append(f"train.precision: unknown precision {t.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if recipe.accelerate.config is not None and not Path(recipe.accelerate.config).is_file():
        errors.append(f"accelerate.config: {recipe.accelerate.config} does not exist")
    errors += _distill_problems(recipe)
    errors += _parallel_problems(recipe)
    return errors


def _distill_problems(recipe: Recipe) -> list[str]:
    dist = recipe.distill
    errors = []
    if not 0 <= dist.weight <= 1:
        errors.append(f"distill.weight: a share of the loss in [0, 1], got {dist.weight}")
    if dist.temperature <= 0:
        errors.append(f"distill.temperature: must be > 0, got {dist.temperature}")
    if not dist.teacher:
        errors.append("distill.teacher: 'base' (the recipe's model with full attention) or a model directory / Hub id")
    if dist.attention_transfer:
        opts = recipe.model.tensorized if recipe.model.attention == "tensorized" else {}
        if opts.get("summary") != "learned":
            errors.append(
                "distill.attention_transfer: trains the learned far-block summaries; set model.attention=tensorized "
                "and model.tensorized.summary=learned"
            )
        if dist.weight > 0:
            errors.append("distill.attention_transfer replaces the loss; set distill.weight=0 (a later run distils)")
        if recipe.train.gradient_checkpointing:
            errors.append(
                "distill.attention_transfer: set train.gradient_checkpointing=false (the transfer stage keeps no "
                "model activations for backward, only each layer's tensorized attention)"
            )
        if recipe.parallel.context > 1:
            errors.append("distill.attention_transfer: needs parallel.context=1")
    if dist.weight > 0 and recipe.parallel.context > 1:
        errors.append(
            f"distill.weight={dist.weight}: distillation with parallel.context={recipe.parallel.context} is not "
            "supported yet; use parallel.context=1 or distill.weight=0"
        )
    return errors


def _parallel_problems(recipe: Recipe) -> list[str]:
    """Context parallelism: tensorized attention only, enough outer blocks, processes to share a sequence."""
    size = recipe.parallel.context
    if size < 1:
        return [f"parallel.context: must be >= 1 (ranks per sequence), got {size}"]
    if size == 1:
        return []
    if recipe.model.attention != "tensorized":
        return [f"parallel.context={size}: context parallelism needs model.attention=tensorized"]
    from .attention.context_parallel import shard_blocks

    errors = []
    try:
        options = recipe.tensorized_options()
    except ValueError:
        options = None  # already reported under model.tensorized
    block_sizes = options.block_sizes if options is not None else None
    if options is not None and options.retrieve:
        errors.append(
            f"parallel.context={size}: model.tensorized.retrieve={options.retrieve} is not supported with context "
            "parallelism yet; set model.tensorized.retrieve=0 or parallel.context=1"
        )
    if block_sizes is not None:
        try:
            shard_blocks(recipe.data.seq_len, size, block_sizes)
        except ValueError as err:
            errors.append(f"parallel.context: data.seq_len={recipe.data.seq_len}: {err}")
    processes = _accelerate_processes(recipe.accelerate.config)  # the launch itself is checked in train.py
    if processes is not None and processes % size:
        errors.append(
            f"parallel.context={size}: accelerate.config {recipe.accelerate.config} launches {processes} "
            f"processes, not a multiple of {size}"
        )
    return errors


def _accelerate_processes(path: str | None) -> int | None:
    """``num_processes`` of an accelerate config file, None when unknown."""
    if path is None or not Path(path).is_file():
        return None
    try:
        value = (yaml.safe_load(Path(path).read_text()) or {}).get("num_processes")
    except yaml.YAMLError:
        return None
    return value if isinstance(value, int) else None


def dump(recipe: Recipe) -> str:
    """The resolved recipe as YAML."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
