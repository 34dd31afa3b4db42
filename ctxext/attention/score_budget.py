"""One knob for the chunked no-grad score computations: how many elements one chunk may hold.

The far-block choice (:mod:`ctxext.attention.retrieve`: the bound's ``SELECT_SCORE_BUDGET``, the
exact stage's ``EXACT_SCORE_BUDGET``) and the torch backend's no-grad hop tiles
(``NO_GRAD_SCORE_BUDGET``) score queries in chunks whose score tensors stay below a base budget
sized for a CPU's memory (``benchmarks/select_memory.py``). Each chunk is a dozen or so operator
calls whatever its size, so at long lengths the chunks are many (at 131,072 tokens with
Llama-3.1-8B's 32 query heads: 1,024 for the bound, 1,024 for the exact stage), which on a GPU
means as many rounds of kernel launches. ``SCALE`` multiplies every base budget: fewer, larger
chunks for ``SCALE`` times the transient memory (base x scale x 4 bytes, a few copies at once).
The results do not depend on it (tested). It stays 1 on every device until a GPU measures what a
larger one buys: ``ctxext bench --score-budget-scale``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

SCALE = 1


def budget(base: int) -> int:
    """The elements one chunk may hold: ``base`` (a module's budget constant) times :data:`SCALE`."""
    return base * SCALE


@contextlib.contextmanager
def scaled(scale: int) -> Iterator[None]:
    """Run a block with :data:`SCALE` = ``scale`` (>= 1), restored afterwards."""
    global SCALE
    if scale < 1:
        raise ValueError(f"a score budget scale must be >= 1, got {scale}")
    old, SCALE = SCALE, scale
    try:
        yield
    finally:
        SCALE = old
