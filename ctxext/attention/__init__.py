"""Tensorized attention: the operator, its backends and its transformers integration."""

from .ops import tensorized_attention
from .options import TensorizedConfigError, TensorizedOptions

__all__ = ["tensorized_attention", "TensorizedOptions", "TensorizedConfigError"]
