"""Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

Raw attention of a deep layer mixes tokens that were already mixed by the layers below. Rollout follows the
mixing down to the input tokens: for each layer, fuse the heads into one ``(L, L)`` matrix ``A``, account for
the residual connection by ``Ã = 0.5·A + 0.5·I``, re-normalize each row of ``Ã`` to sum to 1, then multiply::

    rollout = Ã_layers · … · Ã_2 · Ã_1

Row ``i`` of ``rollout`` says how much each input token ``j`` contributes to token ``i`` after the last layer;
every row sums to 1.

Equivalent to the following, for one ``(layers, H, L, L)`` tensor with ``head_fusion="mean"``::

    rollout = torch.eye(L)
    for a in attentions:  # lowest layer first
        a = a.mean(dim=0)  # fuse heads
        a = 0.5 * a + 0.5 * torch.eye(L)  # residual connection
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout

Padding-free input only: every token of the sequence must be real. Padded positions would take part in the
product as if they were tokens; slice them away first (``attentions[..., :n, :n]`` for ``n`` real tokens). A
row whose fused weights are all zero (e.g. a fully masked padding query) has nothing to normalize and is
rejected.
"""

from __future__ import annotations

from typing import Literal

import torch

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS = ("mean", "max", "min")


def _as_tensor(attentions: object) -> torch.Tensor:
    if isinstance(attentions, torch.Tensor):
        return attentions.detach()
    try:
        return torch.as_tensor(attentions, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"attentions must be numbers (a tensor, array or nested lists); got {error}") from None


def fuse_heads(attentions: torch.Tensor, head_fusion: HeadFusion) -> torch.Tensor:
    """``(..., H, L, L)`` → ``(..., L, L)`` by the mean, max or min over heads."""
    if head_fusion == "mean":
        return attentions.mean(dim=-3)
    if head_fusion == "max":
        return attentions.amax(dim=-3)
    if head_fusion == "min":
        return attentions.amin(dim=-3)
    raise ValueError(f"head_fusion={head_fusion!r}; expected one of {', '.join(map(repr, HEAD_FUSIONS))}")


def attention_rollout(attentions: object, *, head_fusion: HeadFusion = "mean", residual: bool = True) -> torch.Tensor:
    """Attention rollout through all layers, lowest layer first.

    Args:
        attentions: ``(layers, H, L, L)`` self-attention of one sequence, or ``(B, layers, H, L, L)``; layer 0
            is the one nearest the input. Tensor, array or nested lists of non-negative numbers.
        head_fusion: how one layer's heads become one matrix: ``"mean"`` (the paper's), ``"max"`` or ``"min"``.
        residual: model the residual connection as ``0.5·A + 0.5·I``; ``False`` multiplies the fused matrices
            as they are (after row normalization, a no-op for ``"mean"`` of softmax rows).
    Returns:
        ``(L, L)``, or ``(B, L, L)`` for batched input: row ``i`` = contribution of each input token to token
        ``i`` at the top; rows sum to 1. The dtype of a floating-point input tensor, else float64; computed in
        float64.
    Raises:
        ValueError: a shape other than 4-D/5-D with square ``L×L`` matrices, negative or non-finite weights,
            an unknown ``head_fusion``, or a fused row that sums to 0 (padding).
    """
    tensor = _as_tensor(attentions)
    shape = tuple(tensor.shape)
    if tensor.dim() not in (4, 5) or shape[-1] != shape[-2] or 0 in shape:
        raise ValueError(
            f"attentions has shape {shape}; expected (layers, H, L, L) or (B, layers, H, L, L) self-attention "
            "with square L×L matrices"
        )
    out_dtype = tensor.dtype if tensor.is_floating_point() else torch.float64
    work = tensor.to(torch.float64)
    if not torch.isfinite(work).all():
        raise ValueError("attentions contains NaN or infinite values")
    if (work < 0).any():
        raise ValueError(f"attentions contains negative weights (smallest {work.min().item():.3g}); expected >= 0")
    fused = fuse_heads(work, head_fusion)  # (..., layers, L, L)
    # Checked before the residual, which would give an all-zero (fully masked, padding) row a weight of 0.5.
    empty = fused.sum(dim=-1) <= 0
    if empty.any():
        where = empty.nonzero()[0].tolist()
        raise ValueError(
            f"a row of fused attention is all zeros (index {where} over (..., layer, query)); rollout needs "
            "padding-free input: slice padded positions away first"
        )
    if residual:
        fused = 0.5 * fused + 0.5 * torch.eye(shape[-1], dtype=torch.float64, device=work.device)
    fused = fused / fused.sum(dim=-1, keepdim=True)
    rollout = fused[..., 0, :, :]
    for layer in range(1, fused.shape[-3]):
        rollout = fused[..., layer, :, :] @ rollout
    return rollout.to(out_dtype)


def token_contributions(rollout: torch.Tensor, token_index: int) -> torch.Tensor:
    """How much each input token contributes to token ``token_index``: its row of the rollout.

    Args:
        rollout: ``(L, L)`` or ``(B, L, L)`` from :func:`attention_rollout`.
        token_index: the token of interest, ``-L <= token_index < L`` (negative counts from the end).
    Returns:
        ``(L,)`` or ``(B, L)``, summing to 1.
    """
    if rollout.dim() not in (2, 3) or rollout.shape[-1] != rollout.shape[-2]:
        raise ValueError(f"rollout has shape {tuple(rollout.shape)}; expected (L, L) or (B, L, L)")
    length = rollout.shape[-1]
    if not -length <= token_index < length:
        raise ValueError(f"token_index={token_index} is out of range for {length} tokens (0..{length - 1})")
    return rollout[..., token_index, :]
