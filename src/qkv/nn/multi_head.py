"""``MultiHeadAttention``: batch-first multi-head self- and cross-attention, with grouped-query heads.

Computes what ``torch.nn.MultiheadAttention(batch_first=True)`` computes (the same numbers once its
weights are copied in), through :func:`qkv.attention`, so it also takes ``key_lengths``, bottom-right
``causal`` for KV-cached decoding, grouped-query / multi-query heads (``kv_heads``) and a
:class:`~qkv.nn.KVCache`.

Parameters, as ``nn.MultiheadAttention`` stores them: when ``kdim == vdim == E`` (self-attention, and
cross-attention between equal widths) one ``in_proj = Linear(E, E + 2·Hkv·head_dim)`` holds the query, key and
value projections stacked in that order, so self-attention projects with one matrix product (as nanoGPT's
``c_attn``); otherwise ``q_proj``, ``k_proj`` and ``v_proj`` are separate. ``nn.MultiheadAttention``'s weights
map as ``in_proj.weight = in_proj_weight`` (or ``q_proj.weight = q_proj_weight``, ... when ``kdim``/``vdim``
differ), the biases likewise from ``in_proj_bias``, and ``out_proj`` as is. :meth:`projection_weights` gives the
four projections one by one whatever is stored, and a state dict with separate ``q_proj``/``k_proj``/``v_proj``
entries (qkv before the fused parameter, Hugging Face name maps) loads into a fused module: the entries are
stacked on load.

Mask polarity: a boolean ``mask`` here means ``True`` = **may attend** (as in
``F.scaled_dot_product_attention``), the **opposite** of ``nn.MultiheadAttention``, whose boolean
``attn_mask`` and ``key_padding_mask`` mean ``True`` = ignore. Convert with ``mask=~attn_mask``, and
``key_padding_mask`` with ``mask=~key_padding_mask[:, None, None, :]`` (or pass ``key_lengths``).
Fully masked rows give zeros, not NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
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
        in_proj: ``nn.Linear(E, E + 2 * Hkv * head_dim)``, rows ``[q; k; v]`` (when ``kdim == vdim == E``).
        q_proj: ``nn.Linear(E, E)`` (only when ``kdim`` or ``vdim`` differ from ``E``).
        k_proj: ``nn.Linear(kdim, Hkv * head_dim)`` (idem).
        v_proj: ``nn.Linear(vdim, Hkv * head_dim)`` (idem).
        out_proj: ``nn.Linear(E, E)``.

    Parameters are initialized as ``nn.MultiheadAttention`` initializes separate projection weights:
    Xavier-uniform q/k/v weights (each its own fan, also inside ``in_proj``), zero q/k/v and output biases.
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

        self.kv_width = kv_heads * self.head_dim
        self.fused = kdim == embed_dim and vdim == embed_dim
        if self.fused:
            self.in_proj = nn.Linear(embed_dim, embed_dim + 2 * self.kv_width, bias=bias)
        else:
            self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
            self.k_proj = nn.Linear(kdim, self.kv_width, bias=bias)
            self.v_proj = nn.Linear(vdim, self.kv_width, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.rotary = rotary
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform q/k/v weights, ``nn.Linear``'s init for ``out_proj.weight``, zero biases."""
        self.out_proj.reset_parameters()
        projections = self.projection_weights()
        with torch.no_grad():
            for name in ("q", "k", "v"):
                nn.init.xavier_uniform_(projections[name][0])
            for _, bias in projections.values():
                if bias is not None:
                    nn.init.zeros_(bias)

    def _widths(self) -> tuple[int, int, int]:
        """The rows of ``in_proj`` that project queries, keys and values: ``(E, Hkv·head_dim, Hkv·head_dim)``."""
        return (self.embed_dim, self.kv_width, self.kv_width)

    def projection_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """The four projections as ``{"q", "k", "v", "out"}`` → ``(weight, bias)`` (``bias`` None without biases).

        Shapes: q ``(E, E)``, k ``(Hkv·head_dim, kdim)``, v ``(Hkv·head_dim, vdim)``, out ``(E, E)``; the
        weights are ``nn.Linear``'s ``(out_features, in_features)``. With a fused ``in_proj`` they are views
        of its rows (writing into them writes the parameter; their gradients flow into it). For exporters and
        loaders that need the projections one by one, whatever the module stores.
        """
        out = (self.out_proj.weight, self.out_proj.bias)
        if not self.fused:
            return {
                "q": (self.q_proj.weight, self.q_proj.bias),
                "k": (self.k_proj.weight, self.k_proj.bias),
                "v": (self.v_proj.weight, self.v_proj.bias),
                "out": out,
            }
        weights = self.in_proj.weight.split(self._widths())
        biases = (None,) * 3 if self.in_proj.bias is None else self.in_proj.bias.split(self._widths())
        return {**{n: (w, b) for n, w, b in zip("qkv", weights, biases, strict=True)}, "out": out}

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Stack separate ``q_proj``/``k_proj``/``v_proj`` entries into ``in_proj`` (older qkv checkpoints and
        name maps from other libraries) before the usual loading."""
        if self.fused:
            for fused, separate in _projection_groups(prefix).items():
                if fused not in state_dict and all(n in state_dict for n in separate):
                    state_dict[fused] = torch.cat([state_dict.pop(n) for n in separate])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

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
        check_input_dtype("query", query, self.out_proj.weight)
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
            q = self._project_query(query)
        else:
            key, value = self._check_key_value(query, key, value, cache)
            q, k, v = self._project(query, key, value)
            if self.rotary is not None:
                k = self.rotary(k, offset)
            if cache is not None:
                k, v = cache.update(k, v)

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
        check_input_dtype("key", key, self.out_proj.weight)
        value = key if value is None else value
        value = _check_rank3("value", value, "(B, S, vdim)", "vdim", self.vdim)
        check_input_dtype("value", value, self.out_proj.weight)
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

    def _project_query(self, query: torch.Tensor) -> torch.Tensor:
        """``query (B, L, E)`` → ``q (B, H, L, head_dim)``."""
        if not self.fused:
            return self._split(self.q_proj(query), self.num_heads)
        w, b, e = self.in_proj.weight, self.in_proj.bias, self.embed_dim
        return self._split(F.linear(query, w[:e], None if b is None else b[:e]), self.num_heads)

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q (B, H, L, head_dim)``, ``k, v (B, Hkv, S, head_dim)``: one matrix product for self-attention
        (``query is key is value``), one for the keys and values when they are one tensor."""
        if not self.fused:
            q = self._split(self.q_proj(query), self.num_heads)
            return q, self._split(self.k_proj(key), self.kv_heads), self._split(self.v_proj(value), self.kv_heads)
        if query is key and key is value:
            q, k, v = self.in_proj(query).split(self._widths(), dim=-1)
        else:
            w, b = self.in_proj.weight, self.in_proj.bias
            e = self.embed_dim
            q = F.linear(query, w[:e], None if b is None else b[:e])
            if key is value:
                k, v = F.linear(key, w[e:], None if b is None else b[e:]).split(self.kv_width, dim=-1)
            else:
                kv_w, kv_b = w[e:].split(self.kv_width), (None, None) if b is None else b[e:].split(self.kv_width)
                k, v = F.linear(key, kv_w[0], kv_b[0]), F.linear(value, kv_w[1], kv_b[1])
        return self._split(q, self.num_heads), self._split(k, self.kv_heads), self._split(v, self.kv_heads)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """``(B, T, heads * head_dim)`` → ``(B, heads, T, head_dim)``."""
        return x.reshape(x.shape[0], x.shape[1], heads, self.head_dim).transpose(1, 2)


def linear_layers(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(name, weight, bias)`` of every ``nn.Linear`` in ``model``, in module order, with the fused ``in_proj`` of
    a :class:`MultiHeadAttention` given as its three projections (``<name>.q``, ``.k``, ``.v``: views of its
    rows), so that an initializer that depends on the fan of each weight (Xavier) treats them as separate."""
    layers: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention) and module.fused:
            projections = module.projection_weights()
            layers += [(f"{name}.{p}", *projections[p]) for p in "qkv"]
        elif isinstance(module, nn.Linear) and not name.endswith("in_proj"):
            layers.append((name, module.weight, module.bias))
    return layers


def _projection_groups(prefix: str) -> dict[str, list[str]]:
    """``{prefix + "in_proj.weight": [q, k, v weight keys], ... bias}`` for one fused module."""
    return {f"{prefix}in_proj.{kind}": [f"{prefix}{p}_proj.{kind}" for p in "qkv"] for kind in ("weight", "bias")}


def separate_projection_keys(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """Where ``names`` (the keys of a state dict) hold the separate q/k/v projections of a fused
    :class:`MultiHeadAttention` of ``model``: ``{fused key: [its q, k, v keys]}``.

    The keys of a state dict written before ``in_proj`` existed (older qkv checkpoints) or renamed from
    another library's names; a loader that compares keys before loading stacks each group (``torch.cat`` of
    the tensors, the sum of the first dimensions of the shapes) into the fused key. Only groups whose three
    keys are all present and whose fused key is absent are returned.
    """
    present = set(names)
    groups: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention) and module.fused:
            prefix = f"{module_name}." if module_name else ""
            for fused, separate in _projection_groups(prefix).items():
                if fused not in present and all(n in present for n in separate):
                    groups[fused] = separate
    return groups


def stack_separate_projections(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the separate q/k/v projections of ``model``'s fused attention modules stacked into their
    ``in_proj`` entries (see :func:`separate_projection_keys`); other entries unchanged, in their order."""
    groups = separate_projection_keys(model, state)
    if not groups:
        return dict(state)
    replaced = {old: fused for fused, olds in groups.items() for old in olds}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        fused = replaced.get(key)
        if fused is None:
            out[key] = value
        elif fused not in out:
            parts = [state[n] for n in groups[fused]]
            if len({tuple(p.shape[1:]) for p in parts}) != 1:
                shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip(groups[fused], parts, strict=True))
                raise ValueError(f"the q/k/v projections for {fused} do not stack: {shapes}")
            out[fused] = torch.cat(parts)
    return out


def unstack_projections(state: Mapping[str, torch.Tensor], *, kv_width: int | None = None) -> dict[str, torch.Tensor]:
    """The inverse of :func:`stack_separate_projections`: ``state`` with every ``<prefix>in_proj.weight`` /
    ``.bias`` split into ``<prefix>q_proj``, ``k_proj`` and ``v_proj`` entries, in their place, for exporters to
    libraries that keep them apart (BERT, ViT). ``kv_width`` is the rows of the keys (and values), ``Hkv ·
    head_dim``; by default a third of the rows (no grouped-query heads).

    Raises:
        ValueError: an ``in_proj`` whose rows do not split as ``(E, kv_width, kv_width)``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix, _, kind = key.rpartition("in_proj.")
        if not _ or kind not in ("weight", "bias") or (prefix and not prefix.endswith(".")):
            out[key] = tensor
            continue
        rows = tensor.shape[0]
        kv = rows // 3 if kv_width is None else kv_width
        if (kv_width is None and rows % 3) or rows - 2 * kv <= 0:
            raise ValueError(
                f"{key} has {rows} rows, which do not split into q, k, v rows (E, {kv}, {kv}); "
                "pass kv_width (Hkv * head_dim) for grouped-query heads"
            )
        for name, part in zip("qkv", tensor.split([rows - 2 * kv, kv, kv]), strict=True):
            out[f"{prefix}{name}_proj.{kind}"] = part
    return out
