"""Generation with the tensorized decode cache: ``ctxext generate`` and retrieval scoring by generation.

``model.generate`` on a converted model picks up the tensorized cache by itself
(``ctxext.attention.cache``); this module adds the length check, streaming to a terminal and
the numbers a user wants afterwards (tokens/s, cache size against a KV cache).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class GenerationError(ValueError):
    """The request cannot run as asked (the message says what to change)."""


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    kv_bytes: int
    tensorized_bytes: int

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.new_tokens > 1 and self.decode_seconds > 0 else 0.0

    @property
    def cache_multiple(self) -> float:
        """Total cache size as a multiple of a plain KV cache."""
        return (self.kv_bytes + self.tensorized_bytes) / self.kv_bytes if self.kv_bytes else 0.0


# The text as the tokens spell it: no "clean-up" of spaces before punctuation. SmolLM2's tokenizer
# config asks for it; transformers skips it for BPE tokenizers, but with a warning in the middle of
# the output, which an explicit False avoids.
_DECODE = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}


class _NoLengthReminder(logging.Filter):
    """Drops transformers' "friendly reminder" that a generation passed ``max_position_embeddings``:
    ctxext has checked the length against the limit asked for (:func:`check_length`) or scores past
    the native context on purpose (``ctxext eval --scoring generate``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "friendly reminder" not in record.getMessage()


@contextmanager
def _past_native_length_on_purpose():
    logger = logging.getLogger("transformers.generation.stopping_criteria")
    quiet = _NoLengthReminder()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def max_length_of(model) -> int:
    """The configured maximum sequence length: ``max_position_embeddings`` of the model config."""
    from .attention.hf import native_context

    return native_context(model.config)


def check_length(prompt_tokens: int, max_new_tokens: int, max_length: int) -> None:
    """Refuse a prompt + continuation longer than ``max_length`` (0: no limit), naming the fix."""
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if max_length and prompt_tokens + max_new_tokens > max_length:
        raise GenerationError(
            f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
            f"{prompt_tokens + max_new_tokens} > the configured maximum of {max_length} (max_position_embeddings). "
            "Shorten the prompt, lower --max-new-tokens, or raise --max-length if the model was extended "
            "(check how far it extrapolates with `ctxext eval`)."
        )


def _pad_id(tokenizer) -> int:
    """The pad token id generate needs; the EOS id for tokenizers without a pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class _Timer:
    """A streamer that records when the first and the last token arrived (and may print them)."""

    def __init__(self, inner=None):
        self.inner = inner
        self.first: float | None = None
        self.last: float | None = None
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt, the second the first new token
            self.first = time.perf_counter()
        self.last = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    max_length: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    stream: bool = True,
    use_cache: bool = True,
) -> tuple[str, GenerationStats]:
    """Generate a continuation of ``prompt``; streams it to stdout when ``stream``.

    temperature 0 is greedy decoding. Returns the continuation and timing/cache numbers.
    """
    from transformers import TextStreamer

    from .attention.cache import TensorizedCache, cache_argument
    from .layer_progress import layer_progress

    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    limit = max_length_of(model) if max_length is None else max_length
    check_length(ids.shape[1], max_new_tokens, limit)
    cache = TensorizedCache(model.config) if use_cache else None
    streamer = _Timer(TextStreamer(tokenizer, skip_prompt=True, **_DECODE) if stream else None)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    start = time.perf_counter()
    # a long prompt's prefill shows its progress
    with layer_progress(model, enabled=stream), _past_native_length_on_purpose():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            **cache_argument(cache),
            use_cache=use_cache,
            streamer=streamer,
            pad_token_id=_pad_id(tokenizer),
            **sampling,
        )
    new = out[0, ids.shape[1] :]
    first = streamer.first or time.perf_counter()
    memory = cache.memory() if cache is not None else {"kv": 0, "tensorized": 0}
    stats = GenerationStats(
        prompt_tokens=ids.shape[1],
        new_tokens=int(new.numel()),
        prefill_seconds=first - start,
        decode_seconds=(streamer.last or first) - first,
        kv_bytes=memory["kv"],
        tensorized_bytes=memory["tensorized"],
    )
    return tokenizer.decode(new, **_DECODE), stats


@torch.no_grad()
def generated_answer(model, tokenizer, prompt_ids: list[int], answer: str) -> str:
    """Greedy continuation of ``prompt_ids``, as many tokens as ``answer`` has plus two, decoded."""
    device = next(model.parameters()).device
    x = torch.tensor([prompt_ids], device=device)
    budget = len(tokenizer(answer, add_special_tokens=False).input_ids) + 2
    with _past_native_length_on_purpose():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=budget,
            do_sample=False,
            pad_token_id=_pad_id(tokenizer),
        )
    return tokenizer.decode(out[0, x.shape[1] :], **_DECODE)


def answer_matches(text: str, answer: str) -> bool:
    """A generated continuation is correct when, leading spaces stripped, it starts with ``answer``."""
    return text.lstrip().startswith(answer.strip())


def generated_answer_correct(model, tokenizer, prompt_ids: list[int], answer: str) -> bool:
    """Greedy generation from ``prompt_ids``: correct when the continuation starts with ``answer``."""
    return answer_matches(generated_answer(model, tokenizer, prompt_ids, answer), answer)
