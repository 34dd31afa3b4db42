"""Re-rotation of RoPE'd queries and keys (``rope="axis"``), in transformers' rotate-half layout.

RoPE rotates each pair of dims ``(d, d + r/2)`` by ``position * inv_freq[d]``; rotations
compose, so a vector rotated at position ``p`` is moved to coordinate ``c`` by rotating
it again by ``c - p``. This is a pure rotation: any attention scaling a rope type applies
to cos/sin is already inside q and k.
"""

from __future__ import annotations

import torch


def rerotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by ``delta`` positions.

    x: ``(..., L, D)``; delta: broadcastable to ``(..., L)``, in positions (may be negative);
    inv_freq: ``(r/2,)`` with ``r <= D`` the rotary dims (the rest of D is left unrotated).
    Computed in float32 at least; returns x's dtype.
    """
    half = inv_freq.shape[0]
    rot_dim = 2 * half
    compute = torch.promote_types(x.dtype, torch.float32)
    angles = delta.to(compute)[..., None] * inv_freq.to(device=x.device, dtype=compute)  # (..., L, r/2)
    cos, sin = angles.cos(), angles.sin()
    xr = x[..., :rot_dim].to(compute)
    x1, x2 = xr[..., :half], xr[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    if rot_dim == x.shape[-1]:
        return rotated.to(x.dtype)
    return torch.cat([rotated.to(x.dtype), x[..., rot_dim:]], dim=-1)


def inv_freq_from_config(config) -> torch.Tensor:
    """The inverse frequencies a transformers model uses for RoPE, from its config.

    Uses transformers' own rope initialisation (``ROPE_INIT_FUNCTIONS``) for scaled rope
    types, and the standard formula (with ``partial_rotary_factor``) for ``default``.
    ``dynamic`` scaling is refused: its frequencies depend on the sequence length.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # models with per-layer-type rope (Gemma3)
    rope_type = params.get("rope_type", "default")
    if rope_type == "dynamic":
        raise ValueError(
            "tensorized_attention.rope='axis' cannot be combined with 'dynamic' rope scaling: its frequencies "
            "change with the sequence length, so a re-rotation has no fixed angle. Use rope scaling "
            "'linear', 'yarn' or 'llama3', or rope='absolute'."
        )
    if rope_type != "default":
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unknown rope_type {rope_type!r} in the model config")
        inv_freq, _ = ROPE_INIT_FUNCTIONS[rope_type](config, device="cpu")
        return inv_freq.float()
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    dim = int(head_dim * factor)
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
