"""Counting what a call asks of a GPU: ATen operator calls and the project's Triton kernel launches.

On a GPU every operator call and every kernel launch costs some microseconds whatever its size,
so at long lengths a chain of many small calls can set the time (docs/RESULTS.md: the shipped
attention ran 740x-3,500x above its bandwidth floor on an H200). These counts are exact on any
machine: :class:`OpCounter` sees every ATen call made inside it (about the kernels a GPU would
launch for them), :func:`counted_launches` every launch of the kernels in ``ctxext._kernels``,
optionally without running them (a CPU has no GPU to run them on, and the interpreter's cost
means nothing), in which case each launch's block-index output is set to "no block" so that the
rest of the call goes on with a well-formed (empty) choice.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
from collections.abc import Callable, Iterator

from torch.utils._python_dispatch import TorchDispatchMode

# module -> its kernels, as the launchers look them up (module globals, so they can be swapped)
KERNELS = {
    "ctxext._kernels.launch": ("hop_fwd_kernel", "hop_dq_kernel", "hop_dkdv_kernel"),
    "ctxext._kernels.retrieve": ("retrieve_fwd_kernel", "retrieve_dq_kernel", "retrieve_dkdv_kernel"),
    "ctxext._kernels.choose": ("choose_bound_kernel", "choose_exact_kernel", "choose_top_kernel"),
}
CHOICE_OUTPUTS = ("choose_bound_kernel", "choose_top_kernel")  # kernels whose argument IDX is their output


class OpCounter(TorchDispatchMode):
    """Counts the operator calls made inside it (``calls``), inside the project's custom ops too.

    A ``ctxext::`` custom op (``ta_hop``, ``ta_retrieve``, ``ta_choose``) counts once and its Python
    implementation runs under the counter, so the ATen calls it makes count as well (a dispatch
    mode alone would see the op as one call). Its Triton launches are counted by
    :func:`counted_launches`, not here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        implementation = _project_op_implementation(func)
        if implementation is not None:
            with self:
                return implementation(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _project_op_implementation(func) -> Callable | None:
    """The Python function behind a ``ctxext::`` custom op (None for any other operator)."""
    if getattr(func, "namespace", None) != "ctxext":
        return None
    from torch._library import custom_ops  # where torch.library.custom_op keeps its definitions

    definition = getattr(custom_ops, "OPDEFS", {}).get(func._schema.name)
    return getattr(definition, "_init_fn", None)


@contextlib.contextmanager
def counted_launches(run: bool, on_launch: Callable | None = None) -> Iterator[collections.Counter]:
    """Count the launches of every kernel in :data:`KERNELS` (a Counter by kernel name) inside the block.

    run: launch them for real; False: count only (a kernel's outputs stay as allocated, but the
    choice kernels' block index is filled with -1), and the fused far-block choice takes its
    kernels' path on any device (``fused_choice.kernels_run_on``). on_launch: called with ``(kernel, args,
    kwargs)`` for every launch (``tests/kernels/gpu_compile.py`` compiles them).
    """
    counts: collections.Counter = collections.Counter()

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counts[self.name] += 1
                if on_launch is not None:
                    on_launch(self.kernel, args, kwargs)
                if run:
                    return self.kernel[grid](*args, **kwargs)
                if self.name in CHOICE_OUTPUTS:
                    args[self.kernel.arg_names.index("IDX")].fill_(-1)
                return None

            return launch

    from ..attention import fused_choice

    swapped = [] if run else [(fused_choice, "kernels_run_on", fused_choice.kernels_run_on)]
    try:
        if not run:  # nothing runs, so every device may take the kernels' path (their real tile sizes)
            fused_choice.kernels_run_on = lambda device: True
        for module_name, names in KERNELS.items():
            module = importlib.import_module(module_name)
            for name in names:
                swapped.append((module, name, getattr(module, name)))
                setattr(module, name, Counted(name, getattr(module, name)))
        yield counts
    finally:
        for module, name, kernel in swapped:
            setattr(module, name, kernel)
