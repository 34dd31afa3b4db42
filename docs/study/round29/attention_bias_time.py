"""Round 29: one attention call's forward + backward, retrieve_bias 1 against 0, timed alternately.

SmolLM2-135M's heads (9 query, 3 key/value, D = 64), T = 2,048, the default model's options, torch backend,
one thread. Run beside round 29's training it gave a median ratio of 1.09 (bias 1 / bias 0):
    .venv/bin/python docs/study/round29/attention_bias_time.py
"""

import time

import torch

from ctxext.attention.ops import tensorized_attention

torch.set_num_threads(1)
torch.manual_seed(0)
q = torch.randn(1, 9, 2048, 64, requires_grad=True)  # (B, Hq, T, D)
k = torch.randn(1, 3, 2048, 64, requires_grad=True)  # (B, Hkv, T, D)
v = torch.randn(1, 3, 2048, 64, requires_grad=True)
OPTS = dict(block_sizes=(128,), causal="complete", sinks=4, local="window", merge="lse", long_range=False,
            retrieve=8, retrieve_block=64, retrieve_candidates=32, backend="torch")  # fmt: skip


def step(bias: float) -> float:
    """Seconds for one forward and backward."""
    start = time.perf_counter()
    tensorized_attention(q, k, v, retrieve_bias=bias, **OPTS).sum().backward()
    return time.perf_counter() - start


step(0.0), step(1.0)  # warm-up
times = {0.0: [], 1.0: []}
for _ in range(4):
    for b in times:
        times[b].append(step(b))
medians = {b: sorted(t)[len(t) // 2] for b, t in times.items()}
print({b: [round(x, 3) for x in t] for b, t in times.items()}, f"median ratio {medians[1.0] / medians[0.0]:.2f}")
