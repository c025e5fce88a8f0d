"""``SelfAttention``: the textbook single-head block, ``softmax(Q·Kᵀ/√E)·V`` with ``Q, K, V = x·W``.

Equivalent to the following, for ``x: (B, L, E)``::

    q, k, v = q_proj(x), k_proj(x), v_proj(x)  # (B, L, E) each
    weights = softmax(q @ k.transpose(-2, -1) / sqrt(E) + masks, dim=-1)  # (B, L, L)
    out = out_proj(weights @ v)  # (B, L, E)
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.checks import int_at_least
from qkv.ops import attention


class SelfAttention(nn.Module):
    """Single-head self-attention with query, key, value and output projections.

    Args:
        embed_dim: ``E``, the width of the input, of each projection and of the output.
        bias: whether the projections have biases.

    Attributes:
        q_proj, k_proj, v_proj, out_proj: ``nn.Linear(E, E)``.
    """

    def __init__(self, embed_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        int_at_least("embed_dim", embed_dim, expected="a positive int")
        self.embed_dim = embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}"

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        key_lengths: torch.Tensor | None = None,
        causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Let every position of ``x`` attend to the positions of ``x``.

        Args:
            x: ``(B, L, E)``.
            mask: boolean (``True`` = may attend) or float (added to the scores), broadcastable to
                ``(B, L, L)``.
            key_lengths: integer ``(B,)``: positions ``>= key_lengths[b]`` are padding, never attended.
            causal: position ``i`` attends only to positions ``<= i``.

        Returns:
            ``(out, weights)``: ``out (B, L, E)``, ``weights (B, L, L)`` (rows with no allowed key are zero).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, L, E); got {type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must have shape (B, L, E) with E={self.embed_dim}; got {tuple(x.shape)}")
        batch, length, _ = x.shape
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a torch.Tensor (bool or float) or None; got {type(mask).__name__}")
            target = (batch, length, length)
            if not _broadcasts_to(mask, target):
                raise ValueError(f"mask of shape {tuple(mask.shape)} is not broadcastable to (B, L, L) = {target}")
            mask = mask.reshape((1,) * (3 - mask.ndim) + tuple(mask.shape)).unsqueeze(1)

        # One head: (B, 1, L, E).
        q = self.q_proj(x).unsqueeze(1)
        k = self.k_proj(x).unsqueeze(1)
        v = self.v_proj(x).unsqueeze(1)
        out, weights = attention(q, k, v, mask=mask, key_lengths=key_lengths, causal=causal, return_weights=True)
        return self.out_proj(out.squeeze(1)), weights.squeeze(1)


def _broadcasts_to(t: torch.Tensor, target: tuple[int, ...]) -> bool:
    """Whether ``t`` broadcasts to ``target`` without adding leading dimensions beyond it."""
    try:
        return t.ndim <= len(target) and torch.broadcast_shapes(t.shape, target) == target
    except RuntimeError:
        return False
