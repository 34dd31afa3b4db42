"""Fused Triton kernels for tensorized attention (imported lazily: ``import ctxext`` never needs triton).

Layers, bottom up (STYLE.md): ``hop_fwd.py`` / ``hop_bwd.py`` (``@triton.jit`` kernels, one launch
per hop), ``launch.py`` (tiles, grids, buffers), then ``ctxext/attention/triton_backend.py``
(``torch.library.custom_op`` + autograd + the chain of hops), behind
:func:`ctxext.tensorized_attention` with ``backend="triton"`` or ``"auto"`` on CUDA.

Importing this package raises ImportError when triton is missing. Whether the kernels run
compiled or in Triton's CPU interpreter is fixed when it is first imported
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here means: pip install "ctxext[triton]")

from .launch import HopSpec, hop_backward, hop_forward, interpreting

__all__ = ["HopSpec", "hop_backward", "hop_forward", "interpreting"]
