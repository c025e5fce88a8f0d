"""Pure tensor functions: the attention core and its backends."""

from qkv.ops.attention import attention, explain_backend
from qkv.ops.dispatch import BACKENDS, BackendChoice
from qkv.ops.weights import attention_weights

__all__ = ["BACKENDS", "BackendChoice", "attention", "attention_weights", "explain_backend"]
