"""Counter-based attention dropout: the same keep/drop decision for a weight on every backend.

A stateful generator would tie the dropout pattern to the order in which a backend visits the score
matrix. Instead, as FlashAttention does with Philox, one seed is drawn per call (from the caller's
``torch.Generator`` or the global RNG) and the decision for weight ``(batch·head, i, j)`` is a hash of
the seed and that element's linear index. Any block can be regenerated in the forward or the backward
pass without storing an ``L×S`` mask, and the reference and tiled backends drop exactly the same weights.
"""

from __future__ import annotations

import torch

from qkv.ops.spec import AttentionSpec

_M32 = 0xFFFFFFFF


def draw_seed(generator: torch.Generator | None) -> int:
    """One 62-bit seed from ``generator`` (or the global CPU RNG); advances that generator's state."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xorshift-multiply) on int64 tensors holding values < 2**32.

    Multipliers are below 2**31, so no product overflows int64.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def keep_mask(
    spec: AttentionSpec, seed: int, r0: int, r1: int, c0: int, c1: int, device: torch.device
) -> torch.Tensor:
    """Bool ``(..., H, r, c)``: which weights of rows ``[r0, r1)`` and columns ``[c0, c1)`` survive."""
    head_index = torch.arange(spec.batch_size * spec.heads, device=device, dtype=torch.int64).reshape(
        *spec.batch_shape, spec.heads, 1, 1
    )
    rows = torch.arange(r0, r1, device=device, dtype=torch.int64).unsqueeze(-1)
    cols = torch.arange(c0, c1, device=device, dtype=torch.int64)
    index = (head_index * spec.q_len + rows) * spec.kv_len + cols
    x = _mix32((index & _M32) ^ (seed & _M32))
    x = _mix32(x ^ (index >> 32) ^ ((seed >> 32) & _M32))
    threshold = int(round(spec.dropout * 2**32))
    return x >= threshold
