"""Section ``model``: the whole model, prefill tokens/s and one training step.

The model is built from the config with **random weights** (``--layers N`` keeps the first
N layers), so any architecture and size can be timed without downloading anything. The
attention implementation is switched in place between methods (``sdpa``,
``flash_attention_2``, ``tensorized`` with the method's backend), so every method times
the same weights on the same tokens.

Modes, each timed per length N (``tokens_per_s = B * N / median_s``):

* ``prefill``: one forward pass over ``B x N`` tokens under ``torch.no_grad``, no KV cache,
  logits of the last position only (``logits_to_keep=1``: never ``N x vocab`` logits).
* ``train`` / ``train+ckpt``: one training step without the optimizer: forward from the
  embeddings, next-token loss in chunks from the final hidden states
  (:func:`ctxext.loss.chunked_token_nll`), backward. Weights are frozen as under LoRA and
  the embeddings require grad, so the backward runs through every layer (activation
  gradients); ``+ckpt`` turns on gradient checkpointing (``--grad-checkpointing``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from .. import checkpointing
from .measure import describe_error, measure, release
from .methods import Method, method_problem
from .profile import profile_cell
from .sources import attention_shapes

ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "flash2": "flash_attention_2"}


def build_model(config, layers: int, dtype: torch.dtype, device: torch.device):
    """Random-weight causal LM from ``config`` with its first ``layers`` layers, frozen, eval mode."""
    from transformers import AutoModelForCausalLM

    from ..models import check_causal_lm

    config = copy.deepcopy(config)
    check_causal_lm(config, type(config).__name__)
    if layers < config.num_hidden_layers:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types[:layers])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def use_method(model, method: Method, options) -> None:
    """Switch ``model``'s attention to ``method`` in place."""
    if method.kind == "tensorized":
        from ..models import apply_tensorized

        apply_tensorized(model, dataclasses.replace(options, backend=method.backend))
    else:
        model.set_attn_implementation(ATTN_IMPLEMENTATIONS[method.kind])


def _prefill(model, ids):
    def call():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return call


def _train_step(model, ids):
    from ..loss import chunked_token_nll

    backbone = model.get_decoder()
    embed = model.get_input_embeddings()

    def call():
        emb = embed(ids).detach().requires_grad_(True)  # (B, N, H)
        hidden = backbone(inputs_embeds=emb, use_cache=False).last_hidden_state  # (B, N, H)
        loss = chunked_token_nll(model, hidden[:, :-1], ids[:, 1:]).mean()
        loss.backward()

    return call


def modes(grad_checkpointing: str) -> list[str]:
    train = {"off": ["train"], "on": ["train+ckpt"], "both": ["train", "train+ckpt"]}[grad_checkpointing]
    return ["prefill", *train]


def _set_mode(model, mode: str) -> None:
    if mode == "prefill":
        model.eval()
        return
    model.train()
    if mode == "train+ckpt":
        checkpointing.enable(model)
    else:
        checkpointing.disable(model)


def run(ctx) -> list[dict[str, Any]]:
    """Cells for every (N, mode, method): time, tokens/s, peak memory above the weights."""
    total = ctx.config.num_hidden_layers
    ctx.log(f"  building {type(ctx.config).__name__} with random weights, {ctx.layers} of {total} layers ...")
    model, build_error = None, None
    try:
        model = build_model(ctx.config, ctx.layers, ctx.dtype, ctx.device)
    except Exception as err:  # noqa: BLE001 - OOM or an architecture transformers cannot build
        build_error = f"building the model: {describe_error(err)}"
    params = sum(p.numel() for p in model.parameters()) if model is not None else None
    ctx.info["model"] = {
        "architecture": type(model).__name__ if model is not None else None,
        "layers": ctx.layers,
        "layers_in_config": total,
        "parameters": params,
        "weights_gib": params * torch.finfo(ctx.dtype).bits / 8 / 2**30 if params else None,
        "weights": "random (from the config)",
        "modes": {
            "prefill": "forward under no_grad, use_cache=False, logits_to_keep=1",
            "train": "forward from embeddings (requires grad) + chunked next-token loss + backward; weights frozen",
            "train+ckpt": "train with gradient checkpointing (use_reentrant=False)",
        },
    }
    if model is not None:
        ctx.log(f"  {type(model).__name__}: {params:,} parameters ({ctx.info['model']['weights_gib']:.2f} GiB)")
        head = ctx.config.vocab_size * ctx.config.hidden_size  # LM head weights (matmul cost per token)
        embeddings = 2 * head if not getattr(ctx.config, "tie_word_embeddings", False) else head
        if head > params - embeddings:
            note = (
                f"model section: the LM head ({head:,} weights) outweighs the {ctx.layers} layers kept "
                f"({params - embeddings:,}): the loss over N x vocab logits dominates the training step (prefill "
                "computes the last position's logits only), so training ratios understate attention's share; "
                "raise --layers."
            )
            ctx.notes.append(note)
            ctx.log(f"  note: {note}")
    head_dim = attention_shapes(ctx.config)[2]
    problems = {m.name: method_problem(m, ctx.device, ctx.options, ctx.dtype, head_dim) for m in ctx.methods}
    too_slow: dict[tuple[str, str], str] = {}
    vocab = ctx.config.vocab_size
    cells = []
    for n in ctx.lengths:
        ids = None
        if model is not None:
            g = torch.Generator(device=ctx.device).manual_seed(0)
            ids = torch.randint(0, vocab, (ctx.spec.batch, n), generator=g, device=ctx.device)
        for mode in modes(ctx.grad_checkpointing):
            for m in ctx.methods:
                cell = {"section": "model", "mode": mode, "method": m.name, "n": n}
                error = build_error if model is None else problems[m.name] or too_slow.get((m.name, mode))
                if error is None:
                    try:
                        use_method(model, m, ctx.options)
                        _set_mode(model, mode)
                    except Exception as err:  # noqa: BLE001 - e.g. flash_attention_2 refused by transformers
                        error = describe_error(err)
                if error is not None:
                    cell.update(median_s=None, peak_mib=None, error=error)
                else:
                    call = _prefill(model, ids) if mode == "prefill" else _train_step(model, ids)
                    cell.update(
                        measure(
                            call,
                            ctx.device,
                            warmup=ctx.spec.warmup,
                            repeats=ctx.spec.repeats,
                            max_call_s=ctx.spec.max_call_s,
                        )
                    )
                    profile_cell(ctx, cell, call)
                if cell.get("median_s"):
                    cell["tokens_per_s"] = ctx.spec.batch * n / cell["median_s"]
                    if cell.get("over_limit"):
                        too_slow[(m.name, mode)] = (
                            f"skipped: N={n} took {cell['median_s']:.1f} s > --max-call-s {ctx.spec.max_call_s}"
                        )
                ctx.progress(cell)
                cells.append(cell)
        del ids
        release(ctx.device)
    del model
    release(ctx.device)
    return cells
