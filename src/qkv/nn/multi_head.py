"""``MultiHeadAttention``: batch-first multi-head self- and cross-attention, with grouped-query heads.

Computes what ``torch.nn.MultiheadAttention(batch_first=True)`` computes (the same numbers once its
weights are copied in), through :func:`qkv.attention`, so it also takes ``key_lengths``, bottom-right
``causal`` for KV-cached decoding, grouped-query / multi-query heads (``kv_heads``) and a
:class:`~qkv.nn.KVCache`. Its weights map as ``q_proj.weight, k_proj.weight, v_proj.weight =
in_proj_weight.chunk(3)`` (or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when ``kdim`` or
``vdim`` differ from ``E``), the biases likewise from ``in_proj_bias``, and ``out_proj`` as is.

Mask polarity: a boolean ``mask`` here means ``True`` = **may attend** (as in
``F.scaled_dot_product_attention``), the **opposite** of ``nn.MultiheadAttention``, whose boolean
``attn_mask`` and ``key_padding_mask`` mean ``True`` = ignore. Convert with ``mask=~attn_mask``, and
``key_padding_mask`` with ``mask=~key_padding_mask[:, None, None, :]`` (or pass ``key_lengths``).
Fully masked rows give zeros, not NaN.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.checks import int_at_least, probability
from qkv.nn.kv_cache import KVCache
from qkv.ops import attention


def _check_rank3(name: str, t: object, expected: str, dim_name: str, last: int) -> torch.Tensor:
    """``t`` must be a 3-D tensor of shape ``expected`` whose last dimension, ``dim_name``, is ``last``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}; got {type(t).__name__}")
    if t.ndim != 3:
        raise ValueError(f"{name} must have shape {expected} (3-D, batch first); got {tuple(t.shape)}")
    if t.shape[-1] != last:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; expected {expected} with {dim_name}={last}, "
            f"got {dim_name}={t.shape[-1]}"
        )
    return t


def check_input_dtype(name: str, t: torch.Tensor, weight: torch.Tensor) -> None:
    """``t`` must be floating point and, outside autocast, of the module's parameter dtype."""
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point tensor of embeddings; got dtype {t.dtype} "
            "(token ids go through an embedding layer first)"
        )
    if t.dtype != weight.dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(
            f"{name} has dtype {t.dtype} but the module's parameters are {weight.dtype}; convert the input "
            f"({name}.to({weight.dtype})) or the module (module.to({t.dtype}))"
        )


class MultiHeadAttention(nn.Module):
    """Multi-head attention, ``out_proj(concat_h softmax(q_h·k_hᵀ/√d + masks)·v_h)``.

    Args:
        embed_dim: ``E``, the query and output width; ``head_dim = E // num_heads``.
        num_heads: ``H``, the number of query heads; must divide ``embed_dim``.
        kv_heads: ``Hkv``, the number of key/value heads (default ``H``); ``H`` must be a multiple of it.
            ``1 < Hkv < H`` is grouped-query attention, ``Hkv = 1`` multi-query attention: ``k_proj`` and
            ``v_proj`` then project to ``Hkv * head_dim`` and query head ``h`` reads key/value head
            ``h // (H // Hkv)``.
        kdim: width of ``key`` (default ``E``).
        vdim: width of ``value`` (default ``E``).
        bias: whether the four projections have biases.
        dropout: probability of zeroing an attention weight, applied in training mode only.
        rotary: a module ``rotary(x, offset)`` that rotates ``x: (B, heads, T, head_dim)`` by the positions
            ``offset, offset + 1, ...`` (e.g. :class:`qkv.nn.RotaryEmbedding`), applied to the projected
            queries and keys of each call, with ``offset`` = the number of keys already in a non-static
            cache (0 without one), so that cached keys keep their positions. For self-attention.

    Attributes:
        q_proj: ``nn.Linear(E, E)``.
        k_proj: ``nn.Linear(kdim, Hkv * head_dim)``.
        v_proj: ``nn.Linear(vdim, Hkv * head_dim)``.
        out_proj: ``nn.Linear(E, E)``.

    Parameters are initialized as ``nn.MultiheadAttention`` initializes separate projection weights:
    Xavier-uniform q/k/v weights (each its own fan), zero q/k/v and output biases.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        rotary: nn.Module | None = None,
    ) -> None:
        super().__init__()
        embed_dim = int_at_least("embed_dim", embed_dim, expected="a positive int")
        num_heads = int_at_least("num_heads", num_heads, expected="a positive int")
        kv_heads = num_heads if kv_heads is None else int_at_least("kv_heads", kv_heads, expected="a positive int")
        kdim = embed_dim if kdim is None else int_at_least("kdim", kdim, expected="a positive int")
        vdim = embed_dim if vdim is None else int_at_least("vdim", vdim, expected="a positive int")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                "embed_dim must be a multiple of num_heads"
            )
        if num_heads % kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of kv_heads={kv_heads}; each key/value head must "
                "serve the same number of query heads"
            )
        dropout = probability("dropout", dropout)
        if rotary is not None and not isinstance(rotary, nn.Module):
            raise TypeError(f"rotary must be an nn.Module or None; got {type(rotary).__name__}")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.kv_heads = kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim
        self.vdim = vdim
        self.dropout = dropout

        kv_width = kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, kv_width, bias=bias)
        self.v_proj = nn.Linear(vdim, kv_width, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.rotary = rotary
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform q/k/v weights, ``nn.Linear``'s init for ``out_proj.weight``, zero biases."""
        self.out_proj.reset_parameters()
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def projection_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The four projections as ``{"q", "k", "v", "out"}`` → ``(weight, bias)`` (``bias`` None without biases).

        Shapes: q ``(E, E)``, k ``(Hkv·head_dim, kdim)``, v ``(Hkv·head_dim, vdim)``, out ``(E, E)``; the
        weights are ``nn.Linear``'s ``(out_features, in_features)``. For exporters and loaders that need
        the projections one by one, whatever the module stores.
        """
        return {
            name: (proj.weight, proj.bias)
            for name, proj in (("q", self.q_proj), ("k", self.k_proj), ("v", self.v_proj), ("out", self.out_proj))
        }

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kv_heads={self.kv_heads}, "
            f"kdim={self.kdim}, vdim={self.vdim}, dropout={self.dropout}"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        key_lengths: torch.Tensor | None = None,
        causal: bool = False,
        window: tuple[int, int] | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
        average_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from ``query`` to ``key``/``value`` (or to ``query`` itself).

        Args:
            query: ``(B, L, E)``.
            key: ``(B, S, kdim)``; ``None`` = self-attention (``key = value = query``, which needs
                ``kdim == vdim == E``).
            value: ``(B, S, vdim)``; ``None`` = ``key``.
            mask: boolean (``True`` = may attend; the opposite of ``nn.MultiheadAttention``) or float
                (added to the scores), broadcastable to ``(B, H, L, S)``; e.g. ``(L, S)`` for a pattern
                shared by the batch, ``(B, 1, 1, S)`` for padding.
            key_lengths: integer ``(B,)``: keys at positions ``>= key_lengths[b]`` are padding.
            causal: mask keys after the diagonal that aligns the last query with the last key
                (bottom-right, as a KV-cached decoder needs; the usual causal mask when ``L == S``).
            window: ``(left, right)`` sliding window of :func:`qkv.attention` (bottom-right aligned like
                ``causal``, so a cached decode sees the same keys as one call over the whole sequence).
            cache: a :class:`KVCache`. Non-static: this call's projected keys/values are appended and
                the queries attend over everything cached (``S`` = cached + new). Static: the first
                call stores the projected ``key``/``value``; later calls reuse them and ignore
                ``key``/``value``, which may then be ``None``. ``mask`` and ``key_lengths`` describe
                the whole key sequence, ``S`` included the cached part.
            need_weights: also return the attention weights (after dropout, so
                ``out == out_proj(weights @ v)``); see ``qkv.explain_backend`` for the path.
            average_weights: with ``need_weights``, average the weights over heads.

        Returns:
            ``(out, weights)``: ``out (B, L, E)``; ``weights (B, H, L, S)``, ``(B, L, S)`` when averaged,
            or ``None`` without ``need_weights``.
        """
        query = _check_rank3("query", query, "(B, L, E)", "E", self.embed_dim)
        check_input_dtype("query", query, self.q_proj.weight)
        if average_weights and not need_weights:
            raise ValueError("average_weights=True needs need_weights=True; got need_weights=False")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a qkv.nn.KVCache or None; got {type(cache).__name__}")
        batch, q_len, _ = query.shape
        if self.rotary is not None and cache is not None and cache.static:
            raise ValueError(
                "this MultiHeadAttention has a rotary embedding, which needs positions: use a non-static "
                "cache (self-attention), or no rotary for cross-attention"
            )
        offset = 0 if cache is None else cache.seq_len

        if cache is not None and cache.k is not None and cache.k.shape[0] != batch:
            raise ValueError(
                f"query has batch size {batch} but the cache holds {cache.k.shape[0]}; "
                "reorder the cache or start a new one"
            )
        if cache is not None and cache.static and cache.k is not None and cache.v is not None:
            k, v = cache.k, cache.v
            if key is not None and tuple(key.shape[:2]) != (k.shape[0], k.shape[2]):
                raise ValueError(
                    f"key has shape {tuple(key.shape)} but the static cache holds B={k.shape[0]}, "
                    f"S={k.shape[2]}; pass key=None to reuse the cache, or a new KVCache for a new source"
                )
        else:
            key, value = self._check_key_value(query, key, value, cache)
            k = self._split(self.k_proj(key), self.kv_heads)
            v = self._split(self.v_proj(value), self.kv_heads)
            if self.rotary is not None:
                k = self.rotary(k, offset)
            if cache is not None:
                k, v = cache.update(k, v)

        q = self._split(self.q_proj(query), self.num_heads)
        if self.rotary is not None:
            q = self.rotary(q, offset)
        result = attention(
            q,
            k,
            v,
            mask=mask,
            key_lengths=key_lengths,
            causal=causal,
            window=window,
            dropout=self.dropout if self.training else 0.0,
            return_weights=need_weights,
        )
        out, weights = result if need_weights else (result, None)
        assert isinstance(out, torch.Tensor)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, q_len, self.embed_dim))
        if weights is not None and average_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def _check_key_value(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resolve the defaults of ``key``/``value`` and check their shapes against ``query``."""
        if key is None:
            if value is not None:
                raise ValueError("value was given without key; pass key too (key=None means self-attention)")
            if cache is not None and cache.static:
                raise ValueError(
                    "key is None but the static cache is empty; the first call with a static cache needs "
                    "the encoder output as key"
                )
            if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
                raise ValueError(
                    f"key is None (self-attention), which needs kdim == vdim == embed_dim; got "
                    f"kdim={self.kdim}, vdim={self.vdim}, embed_dim={self.embed_dim}"
                )
            return query, query
        key = _check_rank3("key", key, "(B, S, kdim)", "kdim", self.kdim)
        check_input_dtype("key", key, self.k_proj.weight)
        value = key if value is None else value
        value = _check_rank3("value", value, "(B, S, vdim)", "vdim", self.vdim)
        check_input_dtype("value", value, self.v_proj.weight)
        if key.shape[0] != query.shape[0]:
            raise ValueError(
                f"key has batch size {key.shape[0]} (shape {tuple(key.shape)}) but query has "
                f"{query.shape[0]} (shape {tuple(query.shape)}); they must be equal"
            )
        if value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"value has shape {tuple(value.shape)} but key has {tuple(key.shape)}; their (B, S) must be equal"
            )
        return key, value

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``(B, T, heads * head_dim)`` → ``(B, heads, T, head_dim)``."""
        return x.reshape(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)
