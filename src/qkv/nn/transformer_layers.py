"""Transformer encoder and decoder layers (Vaswani et al., 2017), pre-LN or post-LN.

Parameter names follow ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer`` (``self_attn``,
``multihead_attn``, ``linear1``, ``linear2``, ``norm1..3``), and so do the computations: with the weights
copied in (the attention's ``in_proj_weight`` split into ``q_proj``, ``k_proj``, ``v_proj``), the layers
give the same outputs. All attention goes through :class:`~qkv.nn.MultiHeadAttention`, hence
:func:`qkv.attention` and its backends, and takes a :class:`~qkv.nn.KVCache` for incremental decoding.

Post-LN (``norm_first=False``, the paper): ``x = norm(x + sublayer(x))``.
Pre-LN (``norm_first=True``, GPT-2 and most later models): ``x = x + sublayer(norm(x))``; a model stacking
pre-LN layers puts one more LayerNorm after the last layer.

Dropout: ``dropout`` on each sublayer's output before the residual sum, ``attention_dropout`` on the
attention weights, ``activation_dropout`` after the feed-forward activation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qkv.checks import one_of
from qkv.nn.kv_cache import KVCache
from qkv.nn.multi_head import MultiHeadAttention

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[one_of("activation", name, ACTIVATIONS)]


class _WithFeedForward(nn.Module):
    """``linear2(dropout(activation(linear1(x))))``, shared by both layers."""

    linear1: nn.Linear
    linear2: nn.Linear
    dropout: nn.Dropout

    def _build_feed_forward(self, d_model: int, ffn_dim: int, activation: str, activation_dropout: float) -> None:
        self.activation_name = activation
        self.activation = _activation(activation)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout = nn.Dropout(activation_dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear2(self.dropout(self.activation(self.linear1(x))))  # Module calls give Any
        return out


class TransformerEncoderLayer(_WithFeedForward):
    """Self-attention then a feed-forward network, each with a residual connection and a LayerNorm.

    Also the block of a decoder-only language model: call it with ``causal=True`` and a ``cache``.

    Args:
        d_model: ``E``.
        num_heads: ``H``; must divide ``E``.
        ffn_dim: width of the feed-forward hidden layer.
        kv_heads: key/value heads of the self-attention (grouped-query attention); default ``H``.
        dropout: residual dropout (on each sublayer's output).
        attention_dropout: dropout on the attention weights.
        activation_dropout: dropout after the feed-forward activation.
        activation: ``"relu"`` or ``"gelu"`` (exact, erf-based).
        norm_first: pre-LN if ``True``, post-LN (the paper) if ``False``.
        layer_norm_eps: the LayerNorms' epsilon.
        rotary: a :class:`~qkv.nn.RotaryEmbedding` applied to the self-attention's queries and keys.

    Attributes:
        self_attn: :class:`MultiHeadAttention`.
        linear1: ``nn.Linear(E, ffn_dim)``; linear2: ``nn.Linear(ffn_dim, E)``.
        norm1: LayerNorm of the attention sublayer; norm2: of the feed-forward sublayer.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        *,
        kv_heads: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        rotary: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, num_heads, kv_heads=kv_heads, dropout=attention_dropout, rotary=rotary
        )
        self._build_feed_forward(d_model, ffn_dim, activation, activation_dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}, norm_first={self.norm_first}"

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        window: tuple[int, int] | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One layer.

        Args:
            x: ``(B, L, E)``.
            key_lengths: ``(B,)`` valid tokens per row (keys ``>= key_lengths[b]`` are padding).
            mask: boolean (``True`` = may attend) or float, broadcastable to ``(B, H, L, S)``.
            causal: bottom-right causal self-attention (a decoder-only model).
            window: ``(left, right)`` sliding window of the self-attention (see :func:`qkv.attention`).
            cache: a non-static :class:`KVCache` of this layer's self-attention (``S`` = cached + ``L``).
            need_weights: also return the attention weights.

        Returns:
            ``(x, weights)``: ``x (B, L, E)``, ``weights (B, H, L, S)`` or ``None``.
        """
        attend = self.norm1(x) if self.norm_first else x
        a, weights = self.self_attn(
            attend,
            mask=mask,
            key_lengths=key_lengths,
            causal=causal,
            window=window,
            cache=cache,
            need_weights=need_weights,
        )
        if self.norm_first:
            x = x + self.dropout1(a)
            x = x + self.dropout2(self._feed_forward(self.norm2(x)))
        else:
            x = self.norm1(x + self.dropout1(a))
            x = self.norm2(x + self.dropout2(self._feed_forward(x)))
        return x, weights


class TransformerDecoderLayer(_WithFeedForward):
    """Causal self-attention, cross-attention to the encoder output, then a feed-forward network.

    Args: as :class:`TransformerEncoderLayer`; ``kv_heads`` applies to both attentions and ``rotary`` to
    the self-attention only (cross-attention compares target and source positions, which RoPE does not
    relate).

    Attributes:
        self_attn: causal :class:`MultiHeadAttention` over the target.
        multihead_attn: :class:`MultiHeadAttention` from the target to the encoder output.
        linear1, linear2: the feed-forward network.
        norm1, norm2, norm3: LayerNorms of the self-attention, cross-attention and feed-forward sublayers.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        *,
        kv_heads: int | None = None,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
        rotary: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(
            d_model, num_heads, kv_heads=kv_heads, dropout=attention_dropout, rotary=rotary
        )
        self.multihead_attn = MultiHeadAttention(d_model, num_heads, kv_heads=kv_heads, dropout=attention_dropout)
        self._build_feed_forward(d_model, ffn_dim, activation, activation_dropout)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}, norm_first={self.norm_first}"

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        *,
        memory_lengths: torch.Tensor | None = None,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One layer.

        Args:
            x: ``(B, T, E)`` target states (a chunk of ``T`` new positions when decoding with caches).
            memory: ``(B, S, E)`` encoder output; may be ``None`` once ``cross_cache`` holds it.
            memory_lengths: ``(B,)`` real source tokens per row.
            self_cache: non-static :class:`KVCache` of the self-attention (``T_total`` = cached + ``T``).
            cross_cache: static :class:`KVCache` of the cross-attention (the projected ``memory``).
            need_weights: also return both attentions' weights.

        Returns:
            ``(x, self_weights, cross_weights)``: ``x (B, T, E)``; ``self_weights (B, H, T, T_total)`` and
            ``cross_weights (B, H, T, S)``, or ``None`` without ``need_weights``.
        """
        if memory is None and (cross_cache is None or cross_cache.is_empty):
            raise ValueError("memory is None but no filled cross_cache holds it; pass the encoder output (B, S, E)")
        attend = self.norm1(x) if self.norm_first else x
        a, self_weights = self.self_attn(attend, causal=True, cache=self_cache, need_weights=need_weights)
        x = x + self.dropout1(a) if self.norm_first else self.norm1(x + self.dropout1(a))

        attend = self.norm2(x) if self.norm_first else x
        c, cross_weights = self.multihead_attn(
            attend, memory, key_lengths=memory_lengths, cache=cross_cache, need_weights=need_weights
        )
        x = x + self.dropout2(c) if self.norm_first else self.norm2(x + self.dropout2(c))

        if self.norm_first:
            x = x + self.dropout3(self._feed_forward(self.norm3(x)))
        else:
            x = self.norm3(x + self.dropout3(self._feed_forward(x)))
        return x, self_weights, cross_weights
