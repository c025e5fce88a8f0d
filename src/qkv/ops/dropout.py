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
# The 32-bit finalizer ("lowbias32"): x ^= x >> shift, then x = (x · multiplier) mod 2**32 where one is given.
# Multipliers are below 2**31, so on int64 tensors holding values < 2**32 no product overflows.
_FINALIZER = ((16, 0x7FEB352D), (15, 0x2C1B3C6D), (16, None))
_GOLDEN = 0x9E3779B9  # 2**32 / golden ratio: decorrelates the seed's two halves


def draw_seed(generator: torch.Generator | None) -> int:
    """One 62-bit seed from ``generator`` (or the global CPU RNG); advances that generator's state."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def mix32(x: int) -> int:
    """The 32-bit finalizer of :func:`keep_mask` on a Python int ``< 2**32`` (xorshift-multiply, "lowbias32")."""
    for shift, multiplier in _FINALIZER:
        x ^= x >> shift
        if multiplier is not None:
            x = (x * multiplier) & _M32
    return x


def seed_keys(seed: int) -> tuple[int, int]:
    """Two 32-bit keys from a 62-bit seed: ``k1`` is XORed into every index, ``k2`` (odd) weighs its high half."""
    k1 = mix32((seed & _M32) ^ mix32(((seed >> 32) & _M32) ^ _GOLDEN))
    return k1, mix32(k1 ^ _GOLDEN) | 1


def keep_mask(spec: AttentionSpec, seed: int, r0: int, r1: int, c0: int, c1: int, device: torch.device) -> torch.Tensor:
    """Bool ``(..., H, r, c)``: which weights of rows ``[r0, r1)`` and columns ``[c0, c1)`` survive.

    Weight ``(b·h, i, j)`` has linear index ``n = (b·h · L + i) · S + j`` and survives when
    ``mix32(((n mod 2**32) ^ k1) + k2 · (n >> 32)) >= round(p · 2**32)`` (the high-half term is zero, and
    skipped, while ``B·H·L·S <= 2**32``). One finalizer round, computed in place on one int64 tensor and one
    scratch tensor: each block costs about a dozen passes over it.
    """
    k1, k2 = seed_keys(seed)
    head_index = torch.arange(spec.batch_size * spec.heads, device=device, dtype=torch.int64).reshape(
        *spec.batch_shape, spec.heads, 1, 1
    )
    rows = torch.arange(r0, r1, device=device, dtype=torch.int64).unsqueeze(-1)
    cols = torch.arange(c0, c1, device=device, dtype=torch.int64)
    x = (head_index * spec.q_len + rows) * spec.kv_len + cols
    if spec.batch_size * spec.heads * spec.q_len * spec.kv_len > 2**32:
        high = (x >> 32).mul_(k2)
        x.bitwise_and_(_M32).bitwise_xor_(k1).add_(high).bitwise_and_(_M32)
    else:
        x.bitwise_xor_(k1)
    scratch = torch.empty_like(x)
    for shift, multiplier in _FINALIZER:  # mix32, in place
        x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=scratch))
        if multiplier is not None:
            x.mul_(multiplier).bitwise_and_(_M32)
    return x >= int(round(spec.dropout * 2**32))
