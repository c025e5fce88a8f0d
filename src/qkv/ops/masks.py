"""Score modifications for any block of the score matrix: soft-capping, additive biases, masking.

Every backend applies the same transformation to a block of raw scores ``s = scale·q·kᵀ`` covering
query rows ``[r0, r0 + r)`` and key columns ``[c0, c0 + c)``:

1. soft-capping: ``s = softcap·tanh(s / softcap)``;
2. additive terms: the user's float mask and the ALiBi bias ``-slope·|i + offset - j|``;
3. masking (``-inf``) of keys that may not be attended: the user's boolean mask, ``key_lengths``,
   causal and sliding-window positions.

The reference backend calls these on the whole matrix, the tiled backend block by block, so both agree
exactly. Boolean masks follow SDPA: ``True`` = may attend.
"""

from __future__ import annotations

import torch

from qkv.ops.spec import AttentionSpec


def _slice_mask(mask: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """Slice rows/columns of a broadcastable ``(..., H|1, L|1, S|1)`` mask, keeping size-1 dims."""
    rows = slice(None) if mask.shape[-2] == 1 else slice(r0, r1)
    cols = slice(None) if mask.shape[-1] == 1 else slice(c0, c1)
    return mask[..., rows, cols]


def positional_allowed(
    spec: AttentionSpec, r0: int, r1: int, c0: int, c1: int, device: torch.device
) -> torch.Tensor | None:
    """``(r, c)`` bool: keys allowed by the causal and window rules, or ``None`` if there are none."""
    if not spec.has_positional_mask:
        return None
    rows = torch.arange(r0, r1, device=device).unsqueeze(-1) + spec.offset
    cols = torch.arange(c0, c1, device=device)
    allowed = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=device)
    right = 0 if spec.causal else spec.window_right
    if spec.causal and spec.window_right is not None:
        right = min(right, spec.window_right)
    if right is not None:
        allowed &= cols <= rows + right
    if spec.window_left is not None:
        allowed &= cols >= rows - spec.window_left
    return allowed


def block_allowed(
    spec: AttentionSpec, r0: int, r1: int, c0: int, c1: int, device: torch.device
) -> torch.Tensor | None:
    """Bool, broadcastable to ``(..., H, r, c)``: ``True`` where a key may be attended; ``None`` = all."""
    allowed = positional_allowed(spec, r0, r1, c0, c1, device)
    if spec.key_lengths is not None:
        cols = torch.arange(c0, c1, device=device)
        lengths = spec.key_lengths.reshape(*spec.batch_shape, 1, 1, 1)
        by_length = cols < lengths
        allowed = by_length if allowed is None else allowed & by_length
    if spec.mask is not None and spec.mask.dtype == torch.bool:
        user = _slice_mask(spec.mask, r0, r1, c0, c1)
        allowed = user if allowed is None else allowed & user
    return allowed


def block_bias(
    spec: AttentionSpec, r0: int, r1: int, c0: int, c1: int, device: torch.device
) -> torch.Tensor | None:
    """Float32, broadcastable to ``(..., H, r, c)``: ALiBi plus the user's float mask; ``None`` = zero."""
    bias = None
    if spec.alibi_slopes is not None:
        rows = torch.arange(r0, r1, device=device).unsqueeze(-1) + spec.offset
        cols = torch.arange(c0, c1, device=device)
        distance = (rows - cols).abs().float()
        bias = -spec.alibi_slopes * distance
    if spec.mask is not None and spec.mask.dtype != torch.bool:
        user = _slice_mask(spec.mask, r0, r1, c0, c1).float()
        bias = user if bias is None else bias + user
    return bias


def modify_scores(spec: AttentionSpec, scores: torch.Tensor, r0: int, c0: int) -> torch.Tensor:
    """Apply soft-capping, biases and masks to raw scores ``(..., H, r, c)`` starting at ``(r0, c0)``."""
    r1, c1 = r0 + scores.shape[-2], c0 + scores.shape[-1]
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    bias = block_bias(spec, r0, r1, c0, c1, scores.device)
    if bias is not None:
        scores = scores + bias
    allowed = block_allowed(spec, r0, r1, c0, c1, scores.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores
