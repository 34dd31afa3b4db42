"""``ctxext bench``: time and peak memory of tensorized attention against SDPA and FlashAttention-2.

Sections (``--what``), each in its own module and registered in
:data:`ctxext.bench.runner.SECTIONS`:

* ``attention`` (:mod:`.attention`): the operator alone, forward and forward+backward, with
  the memory-bandwidth floor (:mod:`.bandwidth`);
* ``model`` (:mod:`.model`): the whole model built from its config with random weights,
  prefill tokens/s and one training step (gradient checkpointing off/on).

Outputs (:mod:`.report`): ``bench.md``, ``bench.json``, ``bench.png`` in ``--out``.
Usage from Python::

    from ctxext.bench import BenchSpec, run_bench
    result = run_bench(BenchSpec(model="tiny-random:llama", lengths="64,128", options={"block_sizes": (16,)}))
"""

from .runner import SECTIONS, BenchError, BenchSpec, parse_lengths, run_bench

__all__ = ["SECTIONS", "BenchError", "BenchSpec", "parse_lengths", "run_bench"]
