"""Settings of tensorized attention (DESIGN.md section 1), validated once.

The same settings live in a model's ``config.json`` under ``tensorized_attention``
and are the keyword arguments of :func:`ctxext.tensorized_attention`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

CAUSAL_MODES = ("complete", "dominance")
ROPE_MODES = ("absolute", "axis")
LOCAL_MODES = ("block", "window")
MERGE_MODES = ("score", "lse", "mass")
SUMMARY_MODES = ("token", "pooled", "learned")
RETRIEVE_FRAMES = ("stacked", "ordered")
BACKENDS = ("auto", "triton", "torch", "reference")


class TensorizedConfigError(ValueError):
    """Invalid tensorized-attention settings; the message lists every problem at once."""


@dataclass(frozen=True)
class TensorizedOptions:
    """Operator settings.

    block_sizes: inner axis sizes ``[n_2, ..., n_m]``; the outermost axis grows with N.
    causal: ``complete`` (two value streams, reaches every earlier token) or ``dominance``.
    rope: ``absolute`` keeps the model's rotation; ``axis`` re-rotates per axis.
    sinks: number of leading tokens every query's local softmax sees exactly.
    local: ``block`` (causal part of the own inner block) or ``window`` (plus the whole
        previous inner block).
    merge: ``score`` (the diagonal of an outer hop is scored by q.k), ``lse`` (by the
        log-sum-exp of what the lower hop summarised) or ``mass`` (``lse``, and every other
        fiber entry, a summary of ``s_j`` tokens, scored ``q.k + log(s_j)``; ``complete`` only).
    long_range: False keeps only the local hop (the window-only control).
    summary: how an earlier far entry of an outer hop is summarised and keyed (``complete``
        only). ``token``: by its own token's query (the full stream) and keyed by its own key.
        ``pooled``: the full stream also pools the keys it attends to, and that pooled key
        (rotated to the entry's coordinate) scores the entry: a far block is found by what its
        summary holds, not by one arbitrary token's key. ``learned``: ``pooled``, and the full
        stream's query is the token's query plus a learned per-head summary query (parameters
        saved beside the model, see ``ctxext/attention/summary.py``).
    retrieve: far inner blocks each query also reads exactly, in its local softmax: the
        ``retrieve`` blocks with the highest bound on ``q . k`` (0: none; see
        ``ctxext/attention/retrieve.py``).
    retrieve_frame: where the retrieved blocks sit with ``rope="axis"`` (no effect with
        ``absolute``): ``stacked``, all on the coordinates just before the local range, or
        ``ordered``, one after another in their sequence order (see ``retrieve.py``).
    retrieve_block: tokens per retrieved block (0: the inner block ``n``). A divisor of ``n``
        retrieves at a finer grain than the local window: e.g. a window of two blocks of 128
        with ``retrieve: 8`` far blocks of 64 (quality study, round 7).
    retrieve_score_block: slots per scored sub-block (0: the retrieved block itself). A far block
        is scored by the largest bound on ``q . k`` over its sub-blocks of this many slots, a
        divisor of the retrieved block: finer is tighter and costs more to choose; 1 scores the
        exact ``max q . k`` over the block's keys (quality study, round 12).
    retrieve_candidates: far blocks the bound proposes per query before the exact ``max q . k``
        over their keys picks the ``retrieve`` best of them (0: the bound chooses alone). At least
        ``retrieve``; the choice then equals the exact score's whenever the exact best blocks are
        among the candidates (quality study, round 13).
    retrieve_candidate_share: candidates as a share of each query's far blocks (0: off): the bound
        proposes ``max(retrieve_candidates, ceil(share * far blocks))``, at most all of them (1), so
        the candidates grow with the length (quality study, round 22: at 32k, 32 of 512 far blocks
        as candidates lost every needle, 128 found 2 of 6). The exact stage then costs a fixed share
        of full attention's ``q . k`` products; the fused Triton choice takes a fixed count, so a
        share makes the choice in PyTorch.
    retrieve_bias: nats subtracted from every far key's attention logit (0: none), so the chosen far
        blocks take a smaller share of a query's softmax beside its sinks and window: their odds
        against the local keys shrink by ``exp(-retrieve_bias)``. The choice itself is unchanged.
        Measured zero-shot on the 2k-trained default model in the quality study, round 28
        (``docs/RESULTS.md``); not a default.
    retrieve_bias_growth: nats added to the bias per doubling of the query's length beyond
        ``retrieve_bias_from`` tokens (0: a fixed bias): a query at slot ``t`` lowers its far
        logits by ``retrieve_bias + growth * max(0, log2((t + 1) / from))``. The far blocks a
        query reads are its best of more as the length grows, and their share of the late layers'
        softmax grows with them (quality study, round 28); a fixed bias that helps at 32k costs a
        needle at 8k (round 29). Measured in rounds 30-31: 0.5 from the native context lowered
        perplexity at every length to 128k, but lost the first token of the 128k passkey
        (``retrieve_bias_cap`` stops it, round 32). The operator's default is 0; ``ctxext convert``
        (with retrieval) and the shipped recipes set 0.5 with a cap of 0.5 (round 33).
        Inert without ``retrieve`` (no far blocks to lower), so turning retrieval off on a model that
        has a growth needs no second setting.
    retrieve_bias_from: tokens from which the bias grows (with ``retrieve_bias_growth``), e.g. the
        model's native context; 0 with a growth: the context of the model the attention is attached
        to (its ``max_position_embeddings``), written into its config as a number when attached
        (:func:`ctxext.attention.hf.with_bias_start`). The bare operator has no model and needs the
        number.
    retrieve_bias_cap: the most nats any query's far logits are lowered by, fixed bias and growth
        together (0: no cap): a growth of 0.5 from 8k capped at 0.5 is 0.5 nat from 16k on instead of
        2 at 128k. Measured zero-shot in round 32: at the 128k passkey's question 1 nat or more loses
        its first answer token (the uncapped growth and a cap of 1 both miss it), a cap of 0.5 finds
        it, and in round 33 it kept the 128k passkeys at depths 0.1, 0.5 and 0.9, and 7.48 at 128k (bias 0:
        7.80). At least ``retrieve_bias``, so it is inert without a growth. The operator's default is
        0; ``ctxext convert`` and the shipped recipes set 0.5 with their growth of 0.5 (round 33).
    backend: ``auto``, ``triton``, ``torch`` or ``reference``.
    """

    block_sizes: tuple[int, ...] = (128,)
    causal: str = "complete"
    rope: str = "absolute"
    sinks: int = 0
    local: str = "block"
    merge: str = "score"
    long_range: bool = True
    summary: str = "token"
    retrieve: int = 0
    retrieve_frame: str = "stacked"
    retrieve_block: int = 0
    retrieve_score_block: int = 0
    retrieve_candidates: int = 0
    retrieve_candidate_share: float = 0.0
    retrieve_bias: float = 0.0
    retrieve_bias_growth: float = 0.0
    retrieve_bias_from: int = 0
    retrieve_bias_cap: float = 0.0
    backend: str = "auto"

    @property
    def inner_block(self) -> int:
        """n_m, the size of the innermost (local) axis."""
        return self.block_sizes[-1]

    @property
    def retrieval_block(self) -> int:
        """Tokens per retrieved far block: ``retrieve_block``, or n_m when it is 0."""
        return self.retrieve_block or self.block_sizes[-1]

    @property
    def retrieval_score_block(self) -> int:
        """Slots per scored sub-block of a far block: ``retrieve_score_block``, or the retrieved block."""
        return self.retrieve_score_block or self.retrieval_block

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["block_sizes"] = list(self.block_sizes)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, where: str = "tensorized_attention") -> TensorizedOptions:
        """Build from a user dict, reporting every problem at once with the key as written."""
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        errors = []
        for key in sorted(set(raw) - known):
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(sorted(known))})"
            errors.append(f"{where}.{key}: unknown setting{suggestion}")
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "block_sizes" in kwargs:
            bs = kwargs["block_sizes"]
            kwargs["block_sizes"] = tuple(bs) if isinstance(bs, (list, tuple)) else bs
        opts = cls(**kwargs)
        errors += opts.problems(where)
        if errors:
            raise TensorizedConfigError("invalid tensorized attention settings:\n  - " + "\n  - ".join(errors))
        return opts

    def advice(self) -> list[str]:
        """Valid settings that were measured to hurt, one message each (warn, do not refuse)."""
        notes = []
        if self.rope == "axis" and self.long_range:
            notes.append(
                "rope=axis with long_range=true: in the axis frame the outer hops roughly doubled SmolLM2's "
                "perplexity, before and after fine-tuning (quality study, round 9: docs/RESULTS.md); use "
                "long_range=false (convert: no --long-range) to run past the native context"
            )
        return notes

    def problems(self, where: str = "tensorized_attention") -> list[str]:
        """Every problem with these settings, as messages naming the key."""
        errors = []
        bs = self.block_sizes
        if not isinstance(bs, tuple) or len(bs) == 0:
            errors.append(
                f"{where}.block_sizes: expected a non-empty list of positive integers such as [128], got {bs!r}"
            )
        else:
            for size in bs:
                if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                    errors.append(
                        f"{where}.block_sizes: every size must be a positive integer, got {size!r} in {list(bs)!r}"
                    )
        for key, allowed in (
            ("causal", CAUSAL_MODES),
            ("rope", ROPE_MODES),
            ("local", LOCAL_MODES),
            ("merge", MERGE_MODES),
            ("summary", SUMMARY_MODES),
            ("retrieve_frame", RETRIEVE_FRAMES),
            ("backend", BACKENDS),
        ):
            value = getattr(self, key)
            if value not in allowed:
                errors.append(f"{where}.{key}: unknown mode {value!r}; choose one of {', '.join(allowed)}")
        if self.merge == "mass" and self.causal != "complete":
            errors.append(f"{where}.merge: 'mass' needs causal='complete' (got causal={self.causal!r}); use 'lse'")
        if self.summary != "token" and (self.causal != "complete" or self.merge == "score"):
            errors.append(
                f"{where}.summary: {self.summary!r} changes the full streams of causal='complete' and keys the far "
                f"entries beside an lse-scored diagonal (got causal={self.causal!r}, merge={self.merge!r}); use "
                "causal='complete' with merge='lse' or 'mass', or summary='token'"
            )
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            errors.append(f"{where}.sinks: expected a non-negative integer, got {self.sinks!r}")
        if isinstance(self.retrieve, bool) or not isinstance(self.retrieve, int) or self.retrieve < 0:
            errors.append(
                f"{where}.retrieve: expected the number of far blocks each query reads exactly (0 for none), "
                f"got {self.retrieve!r}"
            )
        rb = self.retrieve_block
        if isinstance(rb, bool) or not isinstance(rb, int) or rb < 0:
            errors.append(f"{where}.retrieve_block: expected 0 (the inner block) or a positive integer, got {rb!r}")
        elif rb and isinstance(bs, tuple) and bs and isinstance(bs[-1], int) and bs[-1] % rb:
            errors.append(
                f"{where}.retrieve_block: {rb} does not divide the inner block {bs[-1]} (block_sizes={list(bs)}); "
                "use a divisor such as " + " or ".join(str(d) for d in (bs[-1] // 2, bs[-1]) if d > 0) + ", or 0"
            )
        sb = self.retrieve_score_block
        if isinstance(sb, bool) or not isinstance(sb, int) or sb < 0:
            errors.append(
                f"{where}.retrieve_score_block: expected 0 (score whole far blocks) or a positive integer, got {sb!r}"
            )
        elif (
            sb and _positive_int(rb or (bs[-1] if isinstance(bs, tuple) and bs else None)) and self.retrieval_block % sb
        ):
            errors.append(
                f"{where}.retrieve_score_block: {sb} does not divide the retrieved block of {self.retrieval_block} "
                f"slots; use a divisor such as {self.retrieval_block // 4 or 1}, 1 (exact) or 0 (whole blocks)"
            )
        rc = self.retrieve_candidates
        if isinstance(rc, bool) or not isinstance(rc, int) or rc < 0:
            errors.append(
                f"{where}.retrieve_candidates: expected 0 (the bound chooses alone) or a positive integer, got {rc!r}"
            )
        elif rc and _positive_int(self.retrieve) and rc < self.retrieve:
            errors.append(
                f"{where}.retrieve_candidates: {rc} candidates cannot hold the {self.retrieve} blocks retrieved; "
                f"use at least retrieve ({self.retrieve}), e.g. {4 * self.retrieve}, or 0"
            )
        share = self.retrieve_candidate_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            errors.append(
                f"{where}.retrieve_candidate_share: expected a share of the far blocks from 0 (off) to 1 "
                f"(every far block a candidate), e.g. 0.25, got {share!r}"
            )
        bias = self.retrieve_bias
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            errors.append(
                f"{where}.retrieve_bias: expected the nats to lower the far keys' logits by, a finite number such "
                f"as 1.0 (0: none), got {bias!r}"
            )
        elif bias and not self.retrieve:
            errors.append(
                f"{where}.retrieve_bias: {bias!r} lowers the far blocks' logits, but retrieve is 0 (no far blocks "
                "are read); set retrieve (e.g. 8) or leave retrieve_bias at 0"
            )
        errors += self._bias_growth_problems(where)
        if not isinstance(self.long_range, bool):
            errors.append(f"{where}.long_range: expected true or false, got {self.long_range!r}")
        return errors

    def _bias_growth_problems(self, where: str) -> list[str]:
        """``retrieve_bias_growth``, ``retrieve_bias_from`` and ``retrieve_bias_cap``: a finite growth, a
        start of 0 (the model's context) or a positive integer, a cap of 0 (none) or at least the fixed bias."""
        growth, start = self.retrieve_bias_growth, self.retrieve_bias_from
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not math.isfinite(growth):
            return [
                f"{where}.retrieve_bias_growth: expected the nats the bias grows by per doubling of the length, "
                f"a finite number such as 0.5 (0: a fixed bias), got {growth!r}"
            ]
        if start != 0 and not _positive_int(start):
            return [
                f"{where}.retrieve_bias_from: expected the tokens from which the bias grows, a positive integer "
                f"such as 8192 (the model's native context), got {start!r}"
            ]
        cap = self.retrieve_bias_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 0:
            return [
                f"{where}.retrieve_bias_cap: expected the most nats the far logits are lowered by, a finite "
                f"number such as 0.5 (0: no cap), got {cap!r}"
            ]
        if cap and cap < self.retrieve_bias:
            return [
                f"{where}.retrieve_bias_cap: {cap!r} is below retrieve_bias {self.retrieve_bias!r}, so the fixed "
                "bias would never apply; raise the cap, lower retrieve_bias, or set the cap to 0 (none)"
            ]
        return []

    def bias_start_problem(self, where: str = "tensorized_attention") -> str | None:
        """Why a growing bias cannot run without a model: ``retrieve_bias_from`` 0 means the context of
        the model the attention is attached to, which the bare operator does not know."""
        if self.retrieve and self.retrieve_bias_growth and not self.retrieve_bias_from:
            return (
                f"{where}.retrieve_bias_growth: {self.retrieve_bias_growth!r} nats per doubling needs the length "
                "it starts from, and without a model there is no native context to start from; set "
                "retrieve_bias_from (tokens), e.g. 8192"
            )
        return None

    def validate(self) -> TensorizedOptions:
        errors = self.problems()
        if errors:
            raise TensorizedConfigError("invalid tensorized attention settings:\n  - " + "\n  - ".join(errors))
        return self


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
