"""The ``torch`` backend: delegation to ``F.scaled_dot_product_attention`` (SDPA).

SDPA covers a call when everything the call asks for is either native to SDPA (boolean or float mask,
top-left causal, grouped heads, dropout from the global RNG) or expressible as an additive mask
(``key_lengths``, bottom-right causal with ``L != S``, sliding windows, ALiBi). The latter are built into
one dense ``(..., H|1, L, S)`` mask, which makes SDPA fall back from its fused kernels on some devices:
that cost is what the ``tiled`` backend exists to avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qkv.ops.masks import block_allowed, block_bias, positional_block_state
from qkv.ops.spec import AttentionSpec, flatten_batch


def sdpa_unsupported_reason(
    spec: AttentionSpec, *, return_weights: bool, return_lse: bool, generator: torch.Generator | None
) -> str | None:
    """Why SDPA cannot compute this call exactly as qkv defines it, or ``None`` if it can."""
    if return_weights:
        return "SDPA does not return the attention weights (return_weights=True)"
    if return_lse:
        return "SDPA does not return the log-sum-exp (return_lse=True)"
    if spec.softcap is not None:
        return "SDPA has no soft-capping, and softcap is not an additive mask"
    if spec.dropout > 0 and generator is not None:
        return "SDPA's dropout cannot take a torch.Generator"
    return None


def sdpa_dense_mask_reason(spec: AttentionSpec) -> str | None:
    """Why SDPA would need an ``L×S`` mask built for it (a materialized path), or ``None``."""
    if spec.alibi_slopes is not None:
        return "ALiBi would reach SDPA as a dense (H, L, S) float mask"
    if not spec.has_positional_mask or _positional_allows_all(spec) or spec.top_left_causal:
        return None
    if spec.window_left is not None or spec.window_right is not None:
        return "a sliding window would reach SDPA as a dense (L, S) mask"
    return "bottom-right causal with L != S would reach SDPA as a dense (L, S) mask"


def _positional_allows_all(spec: AttentionSpec) -> bool:
    """Whether causal/window rules exclude no key at all (e.g. one query at the end of a KV cache)."""
    return positional_block_state(spec, 0, spec.q_len, 0, spec.kv_len) == "all"


def sdpa_mask(spec: AttentionSpec, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """The mask to hand SDPA and its ``is_causal`` flag.

    Returns ``(None, True)`` when the call is plain top-left causal, a boolean mask when every rule is
    a yes/no, and otherwise a float mask (biases, ``-inf`` where not allowed), broadcastable to
    ``(..., H, L, S)``.
    """
    all_positions = not spec.has_positional_mask or _positional_allows_all(spec)
    if not all_positions and spec.only_top_left_causal:
        return None, True
    allowed = block_allowed(spec, 0, spec.q_len, 0, spec.kv_len, device, positional=not all_positions)
    bias = block_bias(spec, 0, spec.q_len, 0, spec.kv_len, device, dtype)
    if bias is None:
        return allowed, False
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias, False


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Attention through SDPA. Shapes as :func:`qkv.attention`; returns ``(..., H, L, Dv)``.

    A scale ``<= 0`` is folded into ``q`` (``scale·q·k = |scale|·(−q)·k``, and ``0·q`` for zero):
    PyTorch's CPU flash kernel, which SDPA picks for ``is_causal=True``, returns NaN for such scales.
    """
    mask, is_causal = sdpa_mask(spec, q.device, q.dtype)
    scale = spec.scale
    if scale < 0:
        q, scale = -q, -scale
    elif scale == 0:
        q, scale = q * 0.0, 1.0
    out = F.scaled_dot_product_attention(
        flatten_batch(q, spec),
        flatten_batch(k, spec),
        flatten_batch(v, spec),
        attn_mask=None if mask is None else flatten_batch(mask, spec),
        dropout_p=spec.dropout,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=spec.kv_heads != spec.heads,
    )
    shape = (*spec.batch_shape, spec.heads, spec.q_len, spec.value_dim)
    return out if out.shape == shape else out.reshape(shape)
