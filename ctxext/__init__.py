"""ctxext: extend the context window of pretrained Hugging Face LLMs with tensorized attention.

``import ctxext`` registers ``attn_implementation="tensorized"`` with transformers, so a
converted model reloads with plain ``from_pretrained`` (no ``trust_remote_code``).
"""

from .attention import TensorizedConfigError, TensorizedOptions, tensorized_attention
from .attention.cache import TensorizedCache
from .attention.hf import register as _register

__version__ = "0.1.0"
__all__ = ["tensorized_attention", "TensorizedOptions", "TensorizedConfigError", "TensorizedCache", "__version__"]

_register()
