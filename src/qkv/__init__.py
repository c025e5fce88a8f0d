"""qkv: the attention mechanism, ``softmax(QKᵀ/√d_k)·V``, exact, fast, lean on memory, and visible."""

from qkv.ops import BackendChoice, attention, attention_weights, explain_backend

# The one place the version is written; pyproject.toml reads it ([tool.setuptools.dynamic]).
__version__ = "0.1.0"
__all__ = ["BackendChoice", "__version__", "attention", "attention_weights", "explain_backend"]
