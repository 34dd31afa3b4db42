"""The public operator: ``tensorized_attention``, backend choice and input checks."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence

import torch

from .layout import fold, plan_fold, unfold
from .options import TensorizedConfigError, TensorizedOptions

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


@functools.cache
def _triton_available() -> bool:
    """Whether the fused kernels can be imported (checked once: this runs on every layer call)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    try:
        import ctxext._kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``): tests only."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(
    requested: str,
    device: torch.device,
    options: TensorizedOptions | None = None,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> str:
    """The backend that will run: ``triton``, ``torch`` or ``reference``.

    ``auto`` picks the fused Triton kernels on CUDA when triton and ``ctxext._kernels`` import and
    the kernels support the settings (when ``options`` is given), else ``torch``. ``triton`` on
    CPU tensors runs the kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` (slow; for
    tests), else falls back. Falling back from a requested fast backend warns once, saying why.
    """
    if requested in ("torch", "reference"):
        return requested
    if device.type != "cuda" and not (requested == "triton" and _interpreting()):
        if requested == "triton":
            _warn_once(
                "triton-cpu",
                f"ctxext: backend='triton' needs CUDA tensors, got {device.type}; using the PyTorch backend "
                "(set TRITON_INTERPRET=1 to run the kernels in Triton's slow CPU interpreter, for tests).",
            )
        return "torch"
    if not _triton_available():
        _warn_once(
            "triton-missing",
            "ctxext: the fused Triton kernels for tensorized attention are not available "
            "(triton is not installed or ctxext._kernels failed to import); using the PyTorch backend, which is "
            'correct but slower. Install them with: pip install "ctxext[triton]"',
        )
        return "torch"
    if options is not None:
        from .triton_backend import kernels_disabled, unsupported_reason

        reason = kernels_disabled() or unsupported_reason(options, dtype or torch.float32, head_dim or 0, device)
        if reason is not None:
            _warn_once(
                f"triton-unsupported:{reason}",
                f"ctxext: the fused Triton kernels do not run these settings ({reason}); using the PyTorch "
                "backend for them, which is correct but slower.",
            )
            return "torch"
    return "triton"


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"tensorized_attention expects q (B, Hq, N, D), k and v (B, Hkv, N, D); got shapes "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[-2] != k.shape[-2]:
        raise NotImplementedError(
            f"tensorized attention got {q.shape[-2]} queries but {k.shape[-2]} keys: cached decoding (fewer "
            "queries than keys) needs ctxext's tensorized cache, which this cache is not. Let generate build its "
            "cache (pass none), pass ctxext.TensorizedCache(model.config) as the cache (past_key_values=, named "
            "cache= from transformers 5.2x), or "
            "run without a cache (use_cache=False)."
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k disagree on batch or head dim: {tuple(q.shape)} vs {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key-value heads ({k.shape[1]})")


def tensorized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_sizes: Sequence[int] = (128,),
    causal: str = "complete",
    rope: str = "absolute",
    sinks: int = 0,
    local: str = "block",
    merge: str = "score",
    long_range: bool = True,
    summary: str = "token",
    retrieve: int = 0,
    retrieve_frame: str = "stacked",
    retrieve_block: int = 0,
    retrieve_score_block: int = 0,
    retrieve_candidates: int = 0,
    retrieve_candidate_share: float = 0.0,
    retrieve_bias: float = 0.0,
    retrieve_bias_growth: float = 0.0,
    retrieve_bias_from: int = 0,
    retrieve_bias_cap: float = 0.0,
    summary_query: torch.Tensor | None = None,
    summary_gate: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal tensorized attention (DESIGN.md section 1).

    Args:
        q: ``(B, Hq, N, D)`` queries, RoPE already applied at ``position_ids``.
        k, v: ``(B, Hkv, N, D)`` keys and values, ``Hq = g * Hkv`` (never repeated).
        block_sizes: inner axis sizes ``[n_2, ..., n_m]``; the outer axis grows with N.
        causal: ``"complete"`` or ``"dominance"``.
        rope: ``"absolute"`` or ``"axis"`` (needs ``rope_inv_freq``).
        sinks: leading tokens every query's local softmax sees exactly.
        local: ``"block"`` or ``"window"`` (the local hop also covers the previous block).
        merge: ``"score"``, ``"lse"`` (outer-hop diagonal scored by the lower hop's mass) or
            ``"mass"`` (``lse``, and the other entries by ``q.k + log`` of the slots they summarise).
        long_range: False keeps only the local hop.
        summary: ``"token"``, ``"pooled"`` or ``"learned"``: how far entries of outer hops are
            summarised and keyed (``complete`` only; see :class:`TensorizedOptions`).
        retrieve: far inner blocks each query also reads exactly (top by a bound on ``q . k``;
            0: none; see ``ctxext/attention/retrieve.py``).
        retrieve_frame: ``"stacked"`` or ``"ordered"``: where retrieved blocks sit with
            ``rope="axis"`` (see :class:`TensorizedOptions`).
        retrieve_block: tokens per retrieved far block, a divisor of the inner block
            (0: the inner block).
        retrieve_score_block: slots per scored sub-block of a far block, a divisor of the
            retrieved block (0: the whole block; 1: the exact ``max q . k``).
        retrieve_candidates: far blocks the bound proposes per query before the exact
            ``max q . k`` over their keys picks the ``retrieve`` best (0: the bound alone).
        retrieve_candidate_share: candidates as a share of each query's far blocks: the bound
            proposes ``max(retrieve_candidates, ceil(share * far blocks))`` (0: off; at most 1).
        retrieve_bias: nats subtracted from every far key's logit (0: none).
        retrieve_bias_growth: nats added to the bias per doubling of a query's length (slot + 1)
            beyond ``retrieve_bias_from`` tokens (0: a fixed bias).
        retrieve_bias_from: tokens from which the bias grows (needed with a growth).
        retrieve_bias_cap: the most nats a query's far logits are lowered by (0: no cap).
        summary_query: ``(Hq, D)`` learned summary query, unrotated, in the units of q
            (``summary="learned"``; None adds nothing).
        summary_gate: ``(Hq,)`` share of the pooled key in each far entry's key, the rest its
            own key (``summary="learned"``; None: pooled keys only).
        position_ids: ``(B, N)`` or ``(1, N)`` RoPE positions q and k were rotated at
            (None: ``arange(N)``); strictly increasing over real tokens. Real tokens are
            folded onto consecutive slots, so padding never moves a token's multi-index.
        padding_mask: ``(B, N)``, 1/True for real tokens; padding tokens are masked keys
            and get zero output. O(N): never a ``(B, N, N)`` mask.
        scaling: score scale, default ``D ** -0.5``.
        softcap: attention logit soft-capping ``cap * tanh(s / cap)`` (Gemma 2), or None.
        rope_inv_freq: ``(r/2,)`` RoPE inverse frequencies of the model (``rope="axis"`` and
            ``summary`` other than ``"token"``).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.

    Returns:
        ``(B, Hq, N, D)`` in q's dtype, like ``scaled_dot_product_attention``.
    """
    opts = TensorizedOptions(
        block_sizes=tuple(block_sizes),
        causal=causal,
        rope=rope,
        sinks=sinks,
        local=local,
        merge=merge,
        long_range=long_range,
        summary=summary,
        retrieve=retrieve,
        retrieve_frame=retrieve_frame,
        retrieve_block=retrieve_block,
        retrieve_score_block=retrieve_score_block,
        retrieve_candidates=retrieve_candidates,
        retrieve_candidate_share=retrieve_candidate_share,
        retrieve_bias=retrieve_bias,
        retrieve_bias_growth=retrieve_bias_growth,
        retrieve_bias_from=retrieve_bias_from,
        retrieve_bias_cap=retrieve_bias_cap,
        backend=backend,
    ).validate()
    return tensorized_attention_with_options(
        q,
        k,
        v,
        opts,
        position_ids=position_ids,
        padding_mask=padding_mask,
        scaling=scaling,
        softcap=softcap,
        rope_inv_freq=rope_inv_freq,
        summary_query=summary_query,
        summary_gate=summary_gate,
    )


def tensorized_attention_with_options(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    opts: TensorizedOptions,
    *,
    position_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    rope_inv_freq: torch.Tensor | None = None,
    summary_query: torch.Tensor | None = None,
    summary_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`tensorized_attention` with already validated options (the transformers path)."""
    check_shapes(q, k, v)
    if problem := opts.bias_start_problem():
        raise TensorizedConfigError(problem)
    needs = "rope='axis'" if opts.rope == "axis" else f"summary={opts.summary!r}" if opts.summary != "token" else None
    if needs and rope_inv_freq is None:
        raise ValueError(
            f"{needs} needs the model's RoPE inverse frequencies: pass rope_inv_freq (shape (rotary_dim/2,)); "
            "the transformers integration computes them from the model config."
        )
    learned = {
        "summary_query": (summary_query, (q.shape[1], q.shape[-1])),
        "summary_gate": (summary_gate, (q.shape[1],)),
    }
    for name, (tensor, shape) in learned.items():
        if tensor is not None and (opts.summary != "learned" or tuple(tensor.shape) != shape):
            raise ValueError(
                f"{name} of shape {tuple(tensor.shape)} needs summary='learned' (got {opts.summary!r}) "
                f"and shape {'(Hq, D)' if len(shape) == 2 else '(Hq,)'} = {shape}"
            )
    plan = plan_fold(q.shape[0], q.shape[-2], position_ids, padding_mask, q.device)
    qs, ks, vs = fold(q, plan), fold(k, plan), fold(v, plan)
    backend = resolve_backend(opts.backend, q.device, opts, q.dtype, q.shape[-1])
    if backend == "reference":
        from .reference import reference_tensorized_attention as run
    elif backend == "triton":
        from .triton_backend import triton_tensorized_attention as run
    else:
        from .torch_backend import torch_tensorized_attention as run
    out = run(
        qs,
        ks,
        vs,
        opts,
        valid=plan.valid,
        scaling=scaling,
        softcap=softcap,
        inv_freq=rope_inv_freq,
        positions=plan.positions,
        **{name: tensor for name, (tensor, _) in learned.items() if tensor is not None},
    )
    return unfold(out.to(q.dtype), plan)
