"""Positional encodings: sinusoidal (Vaswani et al.), learned, and rotary (RoPE, Su et al.).

* :class:`SinusoidalPositionalEncoding` and :class:`LearnedPositionalEmbedding` return ``(T, E)`` vectors
  that a model adds to its token embeddings.
* :class:`RotaryEmbedding` rotates queries and keys inside attention (pass it as
  ``MultiHeadAttention(..., rotary=...)``), so that ``q·k`` depends on the distance between positions.

Every class takes the first position, ``offset``, so that a KV-cached decoder feeding one token at a time
gets the same encodings as one call over the whole sequence. Sinusoidal and rotary encodings are computed
on the fly (in float64, then cast), so they extend to any length and are bit-identical whichever chunk a
position arrives in; learned embeddings stop at ``max_positions``.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.checks import ConfigError, int_at_least


def _check_range(offset: int, length: int) -> None:
    int_at_least("offset", offset, 0, expected="a non-negative int")
    int_at_least("length", length, 0, expected="a non-negative int")


def _check_even_dim(dim: int, why: str) -> None:
    expected = f"a positive even int ({why})"
    if int_at_least("dim", dim, expected=expected) % 2:
        raise ConfigError(f"dim must be {expected}; got {dim}")


def _inverse_frequencies(dim: int, base: float, device: torch.device | None) -> torch.Tensor:
    """``base^(-2i/dim)`` for ``i = 0 .. dim/2 - 1``, float64 ``(dim/2,)``."""
    return base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)


class SinusoidalPositionalEncoding(nn.Module):
    """``pe[p, 2i] = sin(p / base^(2i/E))``, ``pe[p, 2i+1] = cos(p / base^(2i/E))`` (no parameters).

    Args:
        dim: ``E``, even.
        base: the wavelength base (10000 in the paper).
    """

    def __init__(self, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        _check_even_dim(dim, "sin and cos pairs")
        self.dim = dim
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"

    def forward(
        self, length: int, *, offset: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> torch.Tensor:
        """Encodings of positions ``offset .. offset + length - 1``: ``(length, E)``."""
        _check_range(offset, length)
        positions = torch.arange(offset, offset + length, dtype=torch.float64, device=device)
        angles = positions[:, None] * _inverse_frequencies(self.dim, self.base, device)[None, :]
        pe = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(length, self.dim)
        return pe.to(dtype)


class LearnedPositionalEmbedding(nn.Module):
    """One learned ``E``-vector per position ``0 .. max_positions - 1``.

    Args:
        max_positions: the number of positions; longer sequences are an error.
        dim: ``E``.

    Attributes:
        weight: ``(max_positions, E)``, initialized ``N(0, 0.02²)`` (BERT, GPT-2).
    """

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        for name, value in (("max_positions", max_positions), ("dim", dim)):
            int_at_least(name, value, expected="a positive int")
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}, dim={self.weight.shape[1]}"

    def forward(self, length: int, *, offset: int = 0) -> torch.Tensor:
        """Embeddings of positions ``offset .. offset + length - 1``: ``(length, E)``.

        Raises:
            ValueError: if ``offset + length > max_positions``.
        """
        _check_range(offset, length)
        if offset + length > self.max_positions:
            raise ValueError(
                f"sequence length {offset + length} exceeds max_positions={self.max_positions} of the learned "
                "positional embedding; use shorter sequences, a larger max_positions, or sinusoidal/rotary "
                "positions"
            )
        return self.weight[offset : offset + length]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) in the "rotate half" layout of GPT-NeoX and LLaMA.

    Channel ``i < D/2`` and channel ``i + D/2`` form a pair, rotated at position ``p`` by the angle
    ``p · base^(-2i/D)``: ``x1' = x1·cos − x2·sin``, ``x2' = x2·cos + x1·sin``. Rotating both queries and
    keys makes ``q_p·k_s`` a function of ``p − s`` only.

    Args:
        dim: ``D``, the head dimension, even.
        base: the frequency base (10000 in the paper).
    """

    def __init__(self, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        _check_even_dim(dim, "the head dimension")
        if not base > 1:
            raise ValueError(f"base must be > 1; got {base!r}")
        self.dim = dim
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}"

    def cos_sin(
        self, length: int, *, offset: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` of the angles of positions ``offset .. offset + length - 1``: each ``(length, D)``."""
        _check_range(offset, length)
        positions = torch.arange(offset, offset + length, dtype=torch.float64, device=device)
        angles = positions[:, None] * _inverse_frequencies(self.dim, self.base, device)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x: (..., T, D)`` (queries or keys) by positions ``offset .. offset + T - 1``; same shape."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has head dimension {x.shape[-1]} but the rotary embedding has dim={self.dim}")
        cos, sin = self.cos_sin(x.shape[-2], offset=offset, dtype=x.dtype, device=x.device)
        half = self.dim // 2
        rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated_half * sin
