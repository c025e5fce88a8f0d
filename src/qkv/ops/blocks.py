"""Blocking shared by the tiled kernels: block sizes, which key blocks a query block visits, layouts.

Layout trick: a query block of ``(..., Hkv, G, L, D)`` is copied to ``(..., Hkv, G·bq, D)``, so every
product is a plain batched matmul against the shared K/V head (no K/V repeat for grouped heads) and the
``(..., Hkv, G·bq, bk)`` score block is, without a copy, the ``(..., H, bq, bk)`` block that masks index.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qkv.ops.masks import positional_block_state, right_reach
from qkv.ops.spec import AttentionSpec

# Score-block budget in elements (all heads together): about 4 MB of float32, which keeps a block's
# elementwise passes in the caches of this class of CPU while making each matmul large.
BLOCK_ELEMENTS = 1 << 20
MAX_BLOCK_Q = 256
MAX_BLOCK_K = 1024


def block_sizes(spec: AttentionSpec) -> tuple[int, int]:
    """Query and key block sizes ``(bq, bk)`` for a call: large matmuls within the element budget."""
    heads = spec.batch_size * spec.heads
    bk = min(MAX_BLOCK_K, max(spec.kv_len, 1))
    bq = max(16, min(MAX_BLOCK_Q, BLOCK_ELEMENTS // max(1, heads * bk)))
    return min(bq, max(spec.q_len, 1)), bk


class BlockPlan:
    """Which key blocks a query block visits, and which rules each block must still apply."""

    def __init__(self, spec: AttentionSpec, bk: int) -> None:
        self.spec = spec
        self.bk = bk
        # Soft-capping is applied by _scores itself (its tanh is needed in backward), the rest by masks.
        self.mask_spec = replace(spec, softcap=None)
        lengths = spec.key_lengths
        self.max_len = spec.kv_len if lengths is None or lengths.numel() == 0 else int(lengths.max())
        self.min_len = spec.kv_len if lengths is None or lengths.numel() == 0 else int(lengths.min())

    def key_blocks(self, r0: int, r1: int) -> list[tuple[int, int, bool, bool]]:
        """``(c0, c1, positional, lengths)`` per key block rows ``[r0, r1)`` may attend; the flags say
        whether the causal/window and ``key_lengths`` rules must still be applied inside the block.

        Blocks are clipped to the span of keys the rows can see at all, so a causal or windowed call
        never computes scores beyond its diagonal band's bounding columns.
        """
        spec = self.spec
        lo, hi = 0, min(spec.kv_len, self.max_len)
        right = right_reach(spec)
        if right is not None:
            hi = min(hi, r1 - 1 + spec.offset + right + 1)
        if spec.window_left is not None:
            lo = max(lo, r0 + spec.offset - spec.window_left)
        blocks = []
        for c0 in range(lo, hi, self.bk):
            c1 = min(c0 + self.bk, hi)
            state = positional_block_state(spec, r0, r1, c0, c1) if spec.has_positional_mask else "all"
            if state != "none":
                blocks.append((c0, c1, state == "some", c1 > self.min_len))
        return blocks


def query_block(t: torch.Tensor, spec: AttentionSpec, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a ``(..., H, L, X)`` tensor as a contiguous ``(..., Hkv, G·r, X)``."""
    block = t[..., r0:r1, :].reshape(*spec.batch_shape, spec.kv_heads, spec.groups, r1 - r0, t.shape[-1])
    return block.reshape(*spec.batch_shape, spec.kv_heads, spec.groups * (r1 - r0), t.shape[-1])


def as_heads(block: torch.Tensor, spec: AttentionSpec, rows: int) -> torch.Tensor:
    """View a ``(..., Hkv, G·r, X)`` block as ``(..., H, r, X)``."""
    return block.view(*spec.batch_shape, spec.heads, rows, block.shape[-1])
