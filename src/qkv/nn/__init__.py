"""Attention modules built on :func:`qkv.attention`.

* :class:`SelfAttention`: the textbook single-head block.
* :class:`MultiHeadAttention`: batch-first multi-head self-/cross-attention, grouped-query heads,
  a drop-in for ``nn.MultiheadAttention`` (but boolean masks mean ``True`` = may attend).
* :class:`KVCache`: keys/values of past tokens for incremental decoding and beam search.
* :class:`LuongAttention`, :class:`AdditiveAttention`: the classic seq2seq attentions.
* :class:`TransformerEncoderLayer`, :class:`TransformerDecoderLayer`: pre-/post-LN Transformer layers.
* :class:`SinusoidalPositionalEncoding`, :class:`LearnedPositionalEmbedding`, :class:`RotaryEmbedding`.
"""

from qkv.nn.additive import AdditiveAttention
from qkv.nn.kv_cache import KVCache
from qkv.nn.luong import LuongAttention
from qkv.nn.multi_head import MultiHeadAttention
from qkv.nn.positional import LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalPositionalEncoding
from qkv.nn.self_attention import SelfAttention
from qkv.nn.transformer_layers import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "AdditiveAttention",
    "KVCache",
    "LearnedPositionalEmbedding",
    "LuongAttention",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SelfAttention",
    "SinusoidalPositionalEncoding",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]
