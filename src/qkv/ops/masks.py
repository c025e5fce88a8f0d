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


def right_reach(spec: AttentionSpec) -> int | None:
    """How far right of the diagonal a query may look: 0 if causal, the window's right side, or None."""
    if spec.causal:
        return 0 if spec.window_right is None else min(0, spec.window_right)
    return spec.window_right


def positional_allowed(
    spec: AttentionSpec, r0: int, r1: int, c0: int, c1: int, device: torch.device
) -> torch.Tensor | None:
    """``(r, c)`` bool: keys allowed by the causal and window rules, or ``None`` if there are none."""
    if not spec.has_positional_mask:
        return None
    rows = torch.arange(r0, r1, device=device).unsqueeze(-1) + spec.offset
    cols = torch.arange(c0, c1, device=device)
    allowed = torch.ones(r1 - r0, c1 - c0, dtype=torch.bool, device=device)
    right = right_reach(spec)
    if right is not None:
        allowed &= cols <= rows + right
    if spec.window_left is not None:
        allowed &= cols >= rows - spec.window_left
    return allowed


def block_allowed(
    spec: AttentionSpec,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    device: torch.device,
    *,
    positional: bool = True,
    lengths: bool = True,
) -> torch.Tensor | None:
    """Bool, broadcastable to ``(..., H, r, c)``: ``True`` where a key may be attended; ``None`` = all.

    ``positional=False`` / ``lengths=False`` leave out the causal/window or ``key_lengths`` rules, for
    blocks a caller already knows they allow entirely.
    """
    allowed = positional_allowed(spec, r0, r1, c0, c1, device) if positional else None
    if spec.key_lengths is not None and lengths:
        cols = torch.arange(c0, c1, device=device)
        by_length = cols < spec.key_lengths.reshape(*spec.batch_shape, 1, 1, 1)
        allowed = by_length if allowed is None else allowed & by_length
    if spec.mask is not None and spec.mask.dtype == torch.bool:
        user = _slice_mask(spec.mask, r0, r1, c0, c1)
        allowed = user if allowed is None else allowed & user
    return allowed


def block_bias(
    spec: AttentionSpec, r0: int, r1: int, c0: int, c1: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """``dtype``, broadcastable to ``(..., H, r, c)``: ALiBi plus the user's float mask; ``None`` = zero."""
    bias = None
    if spec.alibi_slopes is not None:
        rows = torch.arange(r0, r1, device=device).unsqueeze(-1) + spec.offset
        cols = torch.arange(c0, c1, device=device)
        distance = (rows - cols).abs().to(dtype)
        bias = -spec.alibi_slopes.to(dtype) * distance
    if spec.mask is not None and spec.mask.dtype != torch.bool:
        user = _slice_mask(spec.mask, r0, r1, c0, c1).to(dtype)
        bias = user if bias is None else bias + user
    return bias


def positional_key_range(spec: AttentionSpec) -> tuple[int, int]:
    """``[lo, hi)``: the keys the causal and window rules let at least one query reach."""
    if not spec.has_positional_mask:
        return 0, spec.kv_len
    right, left = right_reach(spec), spec.window_left
    hi = spec.kv_len if right is None else min(spec.kv_len, spec.q_len - 1 + spec.offset + right + 1)
    lo = 0 if left is None else max(0, spec.offset - left)
    return lo, hi


def may_exclude_keys(spec: AttentionSpec) -> bool:
    """Whether some key might be unreachable for every query (a cheap test on the spec, no tensor pass)."""
    lo, hi = positional_key_range(spec)
    return (
        lo > 0
        or hi < spec.kv_len
        or spec.key_lengths is not None
        or (spec.mask is not None and spec.mask.shape[-1] == spec.kv_len)
    )


def reachable_keys(spec: AttentionSpec, device: torch.device) -> torch.Tensor | None:
    """Bool ``(... or 1s, 1, S, 1)``: keys that at least one query of the call may attend, ``None`` = all.

    A key outside every query's causal/window reach, beyond ``key_lengths``, or masked out for every query
    and head (a ``False`` boolean mask or a ``-inf`` float mask column) is unreachable.
    """
    s = spec.kv_len
    reachable = None
    lo, hi = positional_key_range(spec)
    if lo > 0 or hi < s:
        cols = torch.arange(s, device=device)
        reachable = (cols >= lo) & (cols < hi)
    if spec.key_lengths is not None:
        by_length = torch.arange(s, device=device) < spec.key_lengths.unsqueeze(-1)
        reachable = by_length if reachable is None else reachable & by_length
    if spec.mask is not None and spec.mask.shape[-1] == s:
        if spec.mask.dtype == torch.bool:
            by_mask = spec.mask.any(dim=-2).any(dim=-2)
        else:
            by_mask = spec.mask.amax(dim=-2).amax(dim=-2) > float("-inf")
        reachable = by_mask if reachable is None else reachable & by_mask
    if reachable is None:
        return None
    return reachable.reshape(*reachable.shape[:-1], 1, s, 1)


def drop_unreachable(k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v`` with the keys and values no query may attend set to zero.

    A masked-out key or value must never influence the output, even when it holds NaN or inf (padding
    and unused cache slots often do): masking with ``-inf`` scores and zero weights alone lets NaN
    through (``NaN + -inf``, ``0·NaN``). Inputs without unreachable keys, or (on CPU) without any
    non-finite value, are returned as they are.
    """
    if not may_exclude_keys(spec) or _surely_finite(k, v):
        return k, v
    reachable = reachable_keys(spec, k.device)
    if reachable is None:
        return k, v
    return k.masked_fill(~reachable, 0.0), v.masked_fill(~reachable, 0.0)


def _surely_finite(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``k`` and ``v`` hold only finite values, checked where that is cheap: on CPU, with one
    summing pass (a sum that overflows just means copying for nothing). Elsewhere the check would
    synchronize with the device on every call, so the copy is made unconditionally."""
    batched = torch._C._functorch.is_batchedtensor
    if k.device.type != "cpu" or batched(k) or batched(v):
        return False
    with torch.no_grad():
        total = k.sum(dtype=torch.float32) + v.sum(dtype=torch.float32)
    return bool(torch.isfinite(total))


def positional_block_state(spec: AttentionSpec, r0: int, r1: int, c0: int, c1: int) -> str:
    """Whether the causal/window rules allow ``"all"``, ``"none"`` or ``"some"`` of a block's scores."""
    right, left = right_reach(spec), spec.window_left
    if right is not None and c0 > r1 - 1 + spec.offset + right:
        return "none"
    if left is not None and c1 - 1 < r0 + spec.offset - left:
        return "none"
    all_right = right is None or c1 - 1 <= r0 + spec.offset + right
    all_left = left is None or c0 >= r1 - 1 + spec.offset - left
    return "all" if all_right and all_left else "some"


def modify_scores(
    spec: AttentionSpec,
    scores: torch.Tensor,
    r0: int,
    c0: int,
    *,
    inplace: bool = False,
    positional: bool = True,
    lengths: bool = True,
) -> torch.Tensor:
    """Apply soft-capping, biases and masks to raw scores ``(..., H, r, c)`` starting at ``(r0, c0)``.

    ``inplace=True`` overwrites ``scores`` (for backends outside autograd); ``positional`` and
    ``lengths`` as in :func:`block_allowed`.
    """
    r1, c1 = r0 + scores.shape[-2], c0 + scores.shape[-1]
    if spec.softcap is not None:
        if inplace:
            scores.div_(spec.softcap).tanh_().mul_(spec.softcap)
        else:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
    bias = block_bias(spec, r0, r1, c0, c1, scores.device, scores.dtype)
    if bias is not None:
        scores = scores.add_(bias) if inplace else scores + bias
    allowed = block_allowed(spec, r0, r1, c0, c1, scores.device, positional=positional, lengths=lengths)
    if allowed is not None:
        scores = (
            scores.masked_fill_(~allowed, float("-inf")) if inplace else scores.masked_fill(~allowed, float("-inf"))
        )
    return scores
