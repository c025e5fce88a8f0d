"""Pure tensor functions: the attention core and its backends."""

from qkv.ops.attention import attention, explain_backend
from qkv.ops.dispatch import BACKENDS, BackendChoice

__all__ = ["BACKENDS", "BackendChoice", "attention", "explain_backend"]
