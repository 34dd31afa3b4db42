"""``finetune(recipe)``: LoRA fine-tuning at long context, one readable loop on Accelerate + peft.

setup (model, adapter, data, optimizer) -> train (chunked loss, gradient accumulation,
checkpoints, resume) -> save (adapter, optionally a merged model). Checkpoints hold only
what training changes (trainable tensors, optimizer, scheduler, RNG, data position) and are
written atomically; a resumed run reproduces the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from . import checkpointing
from .atomic import atomic_directory
from .attention import summary, transfer
from .attention.context_parallel import context_parallel
from .config import Recipe, dump
from .data import READS_FILE, TokenBlocks, batch_indices, build_blocks, describe_reads
from .loss import check_same_vocabulary, chunked_token_nll, final_hidden, sequence_distill_terms, sequence_nll

DEFAULT_TARGETS = {
    "phi3": ["qkv_proj", "o_proj"],
}
DEFAULT_TARGETS_ANY = ["q_proj", "k_proj", "v_proj", "o_proj"]
RECIPE_FILE = "recipe.yaml"
TRAINABLE_FILE = "ctxext_trainable.safetensors"
SETTINGS_FILE = "ctxext.json"


class FinetuneError(RuntimeError):
    """Training cannot start or continue; the message says why and what to do."""


class NonFiniteLossError(FinetuneError):
    """The loss became NaN or infinite."""


@dataclass
class FinetuneResult:
    output_dir: Path
    adapter_dir: Path | None
    merged_dir: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    out_of_time: bool = False  # stopped by train.max_minutes before train.steps (saved as at the end)


@dataclass
class ContextGroup:
    """This process's place in context parallelism: ``size`` ranks share each sequence.

    Ranks ``[d * size, (d + 1) * size)`` form context group d (``data_rank`` d of
    ``data_size`` data-parallel replicas); ``rank`` is the position inside the group, which
    selects the shard of tokens (``context_parallel.shard_ranges``).
    """

    group: object  # torch.distributed process group of the context group
    rank: int
    size: int
    data_rank: int
    data_size: int
    block_sizes: tuple[int, ...]


class CausalLMLoss(torch.nn.Module):
    """Wraps a (peft) causal LM so that ``forward(input_ids)`` returns the training loss.

    The loss is the mean next-token loss, or with a ``teacher`` (``distill.weight`` > 0)
    ``(1 - weight) * nll + weight * kl`` where ``kl`` is the per-token KL from the frozen
    teacher's next-token distribution (``loss.chunked_distill_terms``): every token then
    carries a dense signal about what full attention would predict, not only the tokens a
    sparse retrieval target depends on. The parts of the last call are kept in ``parts``.
    The LM head runs in checkpointed chunks (``loss.chunked_token_nll``), so full-sequence
    logits never exist; wrapping keeps the forward inside DDP/FSDP for gradient sync. With a
    :class:`ContextGroup`, the forward runs this rank's shard of the tokens (see
    :func:`context_shard_loss`).
    """

    def __init__(self, model, chunk: int, context: ContextGroup | None = None, teacher=None, distill=None):
        super().__init__()
        self.model = model
        self.chunk = chunk
        self.context = context
        self._teacher = [teacher]  # in a list: not a submodule, so DDP/FSDP and state dicts never see it
        self.distill = distill
        self.parts: dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if self.context is not None:
            return context_shard_loss(base, input_ids, self.context, self.chunk)
        if self.distill is not None and self.distill.attention_transfer:
            return self._transfer_loss(base, input_ids)
        teacher = self._teacher[0]
        if teacher is None:
            return sequence_nll(base, input_ids, chunk=self.chunk).mean()
        nll, kl = sequence_distill_terms(base, teacher, input_ids, self.chunk, self.distill.temperature)
        nll, kl = nll.mean(), kl.mean()
        self.parts = {"lm_loss": nll.detach(), "kl": kl.detach()}
        return (1 - self.distill.weight) * nll + self.distill.weight * kl

    def _transfer_loss(self, base, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean over layers of tensorized attention's relative error against exact attention
        (``attention.transfer``); the model runs as the original full-attention model."""
        with transfer.attention_transfer() as errors:
            final_hidden(base, input_ids)
        if not errors:
            raise FinetuneError("distill.attention_transfer: no layer of the model ran tensorized attention")
        loss = torch.stack(errors).mean()
        self.parts = {"transfer_error": loss.detach()}
        return loss


def load_teacher(recipe: Recipe, student, device):
    """The frozen distillation teacher (``distill.teacher``), or None when ``distill.weight`` is 0.

    ``base``: the recipe's ``model.source`` with its own full attention (SDPA), as shipped;
    anything else: a model directory, ``.gguf`` file or Hub id, loaded with SDPA too. The
    teacher runs in eval mode under ``no_grad`` and must share the student's vocabulary.
    """
    from .models import load_causal_lm, resolve_source

    d = recipe.distill
    if d.weight == 0:
        return None
    spec = recipe.model.source if d.teacher == "base" else d.teacher
    try:
        source = resolve_source(spec)
    except Exception as err:
        raise FinetuneError(f"distill.teacher: {err}") from None
    teacher, _ = load_causal_lm(
        source, dtype=recipe.model.dtype, attn_implementation="sdpa", allow_pickle=recipe.model.allow_pickle
    )
    try:
        check_same_vocabulary(teacher, student)
    except ValueError as err:
        raise FinetuneError(
            f"distill.teacher {spec!r}: {err}; a teacher must share the model's tokenizer (use distill.teacher=base "
            "or a fine-tuned copy of model.source)"
        ) from None
    teacher.requires_grad_(False)
    return teacher.eval().to(device)


def context_shard_nll(model, input_ids: torch.Tensor, rank: int, size: int, block_sizes, chunk: int) -> torch.Tensor:
    """Next-token NLL ``(B, e - s)`` of this rank's tokens ``[s, e)`` of ``input_ids`` ``(B, N)`` (whole sequences).

    The rank runs its shard (``context_parallel.shard_ranges``) at its global positions;
    attention is context-parallel while ``context_parallel.context_parallel`` is active. The
    targets are ``input_ids[:, s+1 : e+1]``, so the last rank scores one token fewer.
    """
    from .attention.context_parallel import shard_ranges

    batch, n = input_ids.shape
    start, end = shard_ranges(n, size, tuple(block_sizes))[rank]
    positions = torch.arange(start, end, device=input_ids.device)[None].expand(batch, -1)
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = backbone(input_ids=input_ids[:, start:end], position_ids=positions, use_cache=False).last_hidden_state
    labels = input_ids[:, start + 1 : end + 1]  # (B, e - s) or one fewer on the last rank
    return chunked_token_nll(model, hidden[:, : labels.shape[1]], labels, chunk=chunk)


def context_shard_loss(model, input_ids: torch.Tensor, context: ContextGroup, chunk: int) -> torch.Tensor:
    """This rank's share of the mean next-token loss of ``input_ids`` ``(B, N)``.

    Returns ``size * sum(shard nll) / (B * (N - 1))``: the losses of a group sum to ``size``
    times the full-sequence mean. Why: DDP averages gradients over all ``data_size * size``
    ranks, and the gradients of a group's ranks sum to the gradient of the sum of their
    losses (attention's collectives carry every rank's share back to the shards that caused
    it), so the average is ``(1 / data_size) * sum_d grad(mean loss of group d)``: the
    single-process gradient of the full sequences, averaged over data-parallel replicas
    only. The mean of the returned losses over all ranks is the mean full-sequence loss.
    """
    batch, n = input_ids.shape
    nll = context_shard_nll(model, input_ids, context.rank, context.size, context.block_sizes, chunk)
    return nll.sum() * (context.size / (batch * (n - 1)))


def setup_context_groups(accelerator, recipe: Recipe) -> ContextGroup | None:
    """Split the launched processes into context groups of ``parallel.context`` ranks (None: size 1).

    Every process creates every group (``torch.distributed.new_group`` is collective).
    """
    size = recipe.parallel.context
    if size == 1:
        return None
    world = accelerator.num_processes
    if world % size or world == 1:
        raise FinetuneError(
            f"parallel.context={size}: {world} process(es) were launched; context parallelism needs a multiple of "
            f"{size}. Set accelerate.config to a launcher config whose num_processes is a multiple of {size} "
            "(e.g. recipes/accelerate/cpu-2proc.yaml) and run ctxext finetune, which launches through Accelerate"
        )
    import torch.distributed as dist

    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world, size)]
    me = accelerator.process_index
    return ContextGroup(
        group=groups[me // size],
        rank=me % size,
        size=size,
        data_rank=me // size,
        data_size=world // size,
        block_sizes=recipe.tensorized_options().block_sizes,
    )


def check_context_parallel_model(model, size: int) -> None:
    """Refuse models that context parallelism over ``size`` ranks would run wrongly: sliding-window
    layers run exact local attention on each shard, blind to the previous rank's tokens."""
    if size == 1:
        return
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any("sliding" in str(t) for t in layer_types)
    if not layer_types:
        sliding = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if sliding:
        raise FinetuneError(
            f"parallel.context={size}: {type(model).__name__} has sliding-window attention layers, which "
            "context parallelism does not shard yet; use parallel.context=1 for this model"
        )


# ---------------------------------------------------------------- setup


def load_base_model(recipe: Recipe):
    """The recipe's model with its attention settings (tensorized or a full-attention baseline)."""
    from .models import apply_rope_scaling, apply_tensorized, load_causal_lm, resolve_source

    m = recipe.model
    source = resolve_source(m.source)
    attn = None if m.attention == "tensorized" else m.attention
    quantization = qlora_config(recipe)
    model, tokenizer = load_causal_lm(
        source, dtype=m.dtype, attn_implementation=attn, allow_pickle=m.allow_pickle, quantization_config=quantization
    )
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    if tokenizer is None:
        raise FinetuneError(f"model.source {m.source!r} has no tokenizer; fine-tuning needs one")
    if m.attention == "tensorized":
        apply_tensorized(model, recipe.tensorized_options(), m.rope_scaling, m.rope_factor)
    elif m.rope_scaling:
        apply_rope_scaling(model, m.rope_scaling, m.rope_factor)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    return model, tokenizer


def qlora_config(recipe: Recipe):
    """4-bit NF4 quantisation of the frozen base (QLoRA), or None. Needs CUDA and bitsandbytes."""
    if recipe.lora.quantize == "none":
        return None
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuneError(
            "lora.quantize=4bit (QLoRA) needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); "
            "set lora.quantize=none to train without quantisation"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def target_modules(recipe: Recipe, model) -> list[str]:
    if recipe.lora.target_modules:
        return recipe.lora.target_modules
    return DEFAULT_TARGETS.get(model.config.model_type, DEFAULT_TARGETS_ANY)


def add_adapter(recipe: Recipe, model):
    """peft LoRA on the target modules, plus fully trainable extra modules (embeddings, norms)."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules(recipe, model)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise FinetuneError(
            f"lora.target_modules: {', '.join(missing)} not found in {type(model).__name__}; its linear layers "
            f"include {', '.join(sorted(n for n in names if n.endswith('proj')))}"
        )
    config = LoraConfig(
        r=recipe.lora.rank,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    with checkpointing.renames_quiet():
        model = get_peft_model(model, config)
    extra = extra_trainable_names(model, recipe.lora.trainable)
    for name, param in model.named_parameters():
        if name in extra:
            param.requires_grad_(True)
    for param in summary.parameters(model):  # summary="learned": trained fully, saved in their own file
        param.requires_grad_(True)
    return model


def extra_trainable_names(model, patterns: list[str]) -> set[str]:
    """Parameters outside LoRA trained fully: a dotted name part containing a pattern."""
    out = set()
    for name, _ in model.named_parameters():
        if "lora_" in name:
            continue
        parts = name.split(".")
        if any(pat in part for pat in patterns for part in parts[:-1]):
            out.add(name)
    return out


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing on every decoder layer, non-reentrant."""
    checkpointing.enable(model.get_base_model())
    model.enable_input_require_grads()


def make_scheduler(recipe: Recipe, optimizer):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[recipe.train.schedule]
    return get_scheduler(
        name, optimizer, num_warmup_steps=recipe.train.warmup_steps, num_training_steps=recipe.train.steps
    )


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    return sorted(root.glob("step-*")) if root.is_dir() else []


def save_checkpoint(output_dir: Path, model, optimizer, scheduler, step: int, losses: list[float]) -> Path:
    """Write ``checkpoints/step-N`` atomically: trainable tensors, optimizer, scheduler, RNG, position."""
    from safetensors.torch import save_file

    target = output_dir / "checkpoints" / f"step-{step:06d}"
    with atomic_directory(target, force=True) as tmp:
        save_file(trainable_state(model), str(tmp / TRAINABLE_FILE))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    return target


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the lines of ``metrics.jsonl`` logged after ``step``: a run killed after its last
    checkpoint logged steps that resuming trains again. Replaced atomically; returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and _logged_step(line) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _logged_step(line: str) -> float:
    """The step of one ``metrics.jsonl`` line; a half-written line (killed mid-write) counts as later."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def load_trainable(path: Path, model) -> None:
    """Copy a checkpoint's trainable tensors (``path/ctxext_trainable.safetensors``) into ``model``.

    ``model`` is built as the run built it (:func:`load_base_model`, then :func:`add_adapter`);
    a tensor it has no parameter for is an error naming the tensor.
    """
    from safetensors.torch import load_file

    state = load_file(str(path / TRAINABLE_FILE))
    params = dict(model.named_parameters())
    unknown = [n for n in state if n not in params]
    if unknown:
        raise FinetuneError(f"checkpoint {path} does not match this model/adapter (e.g. {unknown[0]})")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[int, list[float]]:
    """Restore a checkpoint written by :func:`save_checkpoint` (tensors only: no pickled objects)."""
    load_trainable(path, model)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    meta = json.loads((path / "state.json").read_text())
    return int(meta["step"]), list(meta["losses"])


# ---------------------------------------------------------------- output


def save_adapter(model, tokenizer, recipe: Recipe, out: Path) -> Path:
    """The adapter (peft files + fully trained extra tensors + ctxext settings + recipe), atomically."""
    from safetensors.torch import save_file

    with atomic_directory(out, force=True) as tmp:
        model.save_pretrained(tmp)
        extra = extra_trainable_names(model, recipe.lora.trainable)
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if n in extra}
        if state:
            save_file(state, str(tmp / TRAINABLE_FILE))
        summary.save(model, tmp)
        tokenizer.save_pretrained(tmp)
        config = model.get_base_model().config
        settings = {
            "attn_implementation": config._attn_implementation,
            "tensorized_attention": getattr(config, "tensorized_attention", None),
            "rope_parameters": getattr(config, "rope_parameters", None),
            "max_position_embeddings": config.max_position_embeddings,
            "base_model": recipe.model.source,
        }
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str) + "\n")
        (tmp / RECIPE_FILE).write_text(dump(recipe))
    return out


def save_merged(model, tokenizer, out: Path) -> Path:
    from .models import save_model_dir

    with checkpointing.renames_quiet():
        merged = model.merge_and_unload()
    return save_model_dir(merged, tokenizer, out, force=True)


def parameter_digest(model) -> str:
    """A hash of the trainable tensors (ranks of a data-parallel run must agree)."""
    h = hashlib.sha256()
    for name, p in sorted(trainable_state(model).items()):
        h.update(name.encode())
        h.update(p.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the loop


def check_output_dir(recipe: Recipe, output_dir: Path) -> Path | None:
    """Refuse a directory that holds another run; return the checkpoint to resume from."""
    recipe_file = output_dir / RECIPE_FILE
    latest = next(reversed(checkpoint_dirs(output_dir)), None)
    if recipe_file.is_file():
        previous = yaml.safe_load(recipe_file.read_text()) or {}
        current, defaults = recipe.to_dict(), type(recipe)().to_dict()
        # settings added since the run was saved count at their defaults (what it trained with)
        same = all({**defaults[k], **(previous.get(k) or {})} == current[k] for k in ("model", "lora", "data"))
        if not recipe.train.resume:
            raise FinetuneError(
                f"train.output_dir {output_dir} holds another run; pass train.resume=true to continue it "
                "(same model, lora and data sections) or choose another train.output_dir"
            )
        if not same:
            raise FinetuneError(
                f"train.resume: {output_dir} was trained with different model/lora/data settings; resume needs "
                "the same recipe (only train.* may change, e.g. train.steps)"
            )
        return latest
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise FinetuneError(
            f"train.output_dir {output_dir} is not empty and holds no ctxext run; choose another train.output_dir"
        )
    return None


def _micro_loss(wrapped, batch: torch.Tensor) -> torch.Tensor:
    return wrapped(batch)


def _record_reads(output_dir: Path, blocks: TokenBlocks, recipe: Recipe, steps: int, data_size: int) -> list[str]:
    """Write what ``steps`` optimizer steps read to ``output_dir/data.json``; return its log lines."""
    t = recipe.train
    reads, lines = describe_reads(blocks, recipe.data, steps * t.grad_accum * t.batch_size * data_size)
    reads["steps"] = steps
    (output_dir / READS_FILE).write_text(json.dumps(reads, indent=1) + "\n")
    if t.max_minutes:
        lines[0] += f" in {steps} steps unless train.max_minutes={t.max_minutes:g} stops it sooner"
        lines[0] += f" ({READS_FILE} then says what it read)"
    return lines


def finetune(recipe: Recipe, *, merge: bool = False, log=print) -> FinetuneResult:
    """Run a recipe. Returns the output locations and the per-step losses."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t = recipe.train
    output_dir = Path(t.output_dir)
    resume_from = check_output_dir(recipe, output_dir)
    trackers = ["tensorboard"] if _has_tensorboard() else []
    accelerator = Accelerator(
        mixed_precision=t.precision if torch.cuda.is_available() else "no",
        log_with=trackers or None,
        project_dir=str(output_dir),
    )
    main = accelerator.is_main_process
    set_seed(t.seed)
    context = setup_context_groups(accelerator, recipe)
    data_rank, data_size = (
        (context.data_rank, context.data_size) if context else (accelerator.process_index, accelerator.num_processes)
    )

    # ---- setup
    model, tokenizer = load_base_model(recipe)
    check_context_parallel_model(model, recipe.parallel.context)
    cache_dir = Path(recipe.data.cache_dir) if recipe.data.cache_dir else output_dir.parent / ".cache" / "ctxext-data"
    with accelerator.main_process_first():
        blocks: TokenBlocks = build_blocks(recipe.data, tokenizer, cache_dir)
    model = add_adapter(recipe, model)
    if recipe.distill.attention_transfer:  # only the learned summary parts: the target must not move
        learned = {id(p) for p in summary.parameters(model)}
        for param in model.parameters():
            param.requires_grad_(id(param) in learned)
    if t.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=0.0)
    scheduler = make_scheduler(recipe, optimizer)
    teacher = load_teacher(recipe, model, accelerator.device)
    wrapped = CausalLMLoss(model, t.loss_chunk, context, teacher=teacher, distill=recipe.distill)
    wrapped, optimizer = accelerator.prepare(wrapped, optimizer)
    step, losses = 0, []
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RECIPE_FILE).write_text(dump(recipe))
        for line in _record_reads(output_dir, blocks, recipe, t.steps, data_size):
            log(line)
    metrics_path = output_dir / "metrics.jsonl"
    if resume_from is not None:
        step, losses = load_checkpoint(resume_from, model, optimizer, scheduler)
        if main:
            dropped = truncate_metrics(metrics_path, step)
            note = f" (dropped {dropped} metrics.jsonl lines logged after it)" if dropped else ""
            log(f"resumed from {resume_from} at step {step}{note}")
    if trackers:
        accelerator.init_trackers("ctxext", config=_flat(recipe.to_dict()))

    tokens_per_step = t.batch_size * t.grad_accum * recipe.data.seq_len * data_size
    bar = tqdm(total=t.steps, initial=step, disable=not main, desc="finetune", unit="step", dynamic_ncols=True)
    interrupted = out_of_time = False
    start_time, start_step = time.time(), step
    parallel = contextlib.ExitStack()
    if context is not None:  # attention runs over the group in forward and backward (checkpoint recompute)
        parallel.enter_context(context_parallel(context.group))
    try:
        while step < t.steps:
            micro_losses, micro_parts = [], []
            for micro in range(t.grad_accum):
                index = (step * t.grad_accum + micro) * data_size + data_rank
                idx = batch_indices(len(blocks), recipe.data.seed, index, t.batch_size)
                batch = torch.from_numpy(blocks.blocks[idx]).to(accelerator.device)
                sync = contextlib.nullcontext() if micro == t.grad_accum - 1 else accelerator.no_sync(wrapped)
                with sync:
                    loss = _micro_loss(wrapped, batch)
                    accelerator.backward(loss / t.grad_accum)
                micro_losses.append(loss.detach())
                micro_parts.append(accelerator.unwrap_model(wrapped).parts)
            step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            parts = {
                name: accelerator.reduce(torch.stack([p[name] for p in micro_parts]).mean(), reduction="mean").item()
                for name in micro_parts[0]
            }
            if not math.isfinite(step_loss):
                raise NonFiniteLossError(
                    f"the loss became {step_loss} at step {step + 1}; training stopped. The last good checkpoint "
                    f"is kept in {output_dir / 'checkpoints'}. Lower train.lr or use train.precision=bf16 "
                    "instead of fp16."
                )
            grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            elapsed = time.time() - start_time
            tok_s = tokens_per_step * (step - start_step) / max(elapsed, 1e-9)
            bar.set_postfix(loss=f"{step_loss:.4f}", **{k: f"{v:.4f}" for k, v in parts.items()}, tok_s=f"{tok_s:,.0f}")
            bar.update(1)
            if main and step % t.log_every == 0:
                record = {
                    "step": step,
                    "loss": step_loss,
                    **parts,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": tok_s,
                }
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                if trackers:
                    accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step)
            if t.save_every and step % t.save_every == 0 and step < t.steps:
                accelerator.wait_for_everyone()
                if main:
                    save_checkpoint(
                        output_dir, accelerator.unwrap_model(wrapped).model, optimizer, scheduler, step, losses
                    )
            if t.max_minutes and step < t.steps and _out_of_time(accelerator, start_time, t.max_minutes):
                out_of_time = True
                if main:
                    log(
                        f"train.max_minutes={t.max_minutes:g} reached after step {step} of {t.steps}; saving as at "
                        "the end (continue with train.resume=true and a larger budget)"
                    )
                break
    except KeyboardInterrupt:
        interrupted = True
        if main:
            path = save_checkpoint(
                output_dir, accelerator.unwrap_model(wrapped).model, optimizer, scheduler, step, losses
            )
            log(f"interrupted: saved {path}; continue with train.resume=true")
    finally:
        parallel.close()
        bar.close()

    if main and step < t.steps:  # stopped early: what it read
        _record_reads(output_dir, blocks, recipe, step, data_size)
    model = accelerator.unwrap_model(wrapped).model
    result = FinetuneResult(output_dir, None, None, step, losses, interrupted, out_of_time)
    digest = parameter_digest(model)
    (output_dir / f"rank-{accelerator.process_index}.json").write_text(json.dumps({"digest": digest, "step": step}))
    if not interrupted:
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(output_dir, model, optimizer, scheduler, step, losses)
            _prune_checkpoints(output_dir, keep=recipe.train.keep_checkpoints)
            result.adapter_dir = save_adapter(model, tokenizer, recipe, output_dir / "adapter")
            if merge:
                result.merged_dir = save_merged(model, tokenizer, output_dir / "merged")
        accelerator.wait_for_everyone()
    if trackers:
        # Under data parallelism `wrapped` is a DDP wrapper whose reducer holds the process group.
        # Outliving end_training (which destroys the group), the reducer would hold the last
        # reference, and the group's destructor would run when the reducer is freed: with the GIL
        # held, joining gloo's worker thread, which may itself wait for the GIL to free a finished
        # collective's tensors. The process then hangs after saving (pytorch/pytorch#56297; seen
        # once in CI, round 26: both ranks' results written, rank 0 never exiting). Freed first,
        # the reducer lets go while the group is still registered, so the group is freed by
        # destroy_process_group's own path, not from inside the reducer's destructor.
        accelerator.free_memory()  # the accelerator's own references to what it prepared
        del wrapped  # the trained model stays in `model`
        gc.collect()
        accelerator.end_training()  # also destroys the process group: last
    return result


def _out_of_time(accelerator, start_time: float, max_minutes: float) -> bool:
    """Whether any process has used its ``max_minutes`` of training since ``start_time``.

    Every process calls it after the same step and gets the same answer (one reduced flag), so
    they all stop after that step together.
    """
    late = torch.tensor(float(time.time() - start_time >= 60.0 * max_minutes), device=accelerator.device)
    return accelerator.reduce(late, reduction="sum").item() > 0


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep`` = 0: delete none)."""
    if keep <= 0:
        return
    for path in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            return False
    return True


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
