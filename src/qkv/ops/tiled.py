"""The ``tiled`` backend: exact attention in O(N) memory by online softmax over key blocks.

For each block of query rows, key blocks are visited in order, keeping per row a running maximum ``m``,
a running sum ``l`` of ``exp(s - m)`` and an accumulator ``acc = Σ exp(s - m)·v`` rescaled whenever
``m`` grows (Milakov & Gimelshein 2018; FlashAttention). Only ``out`` and the log-sum-exp
``lse = m + log l`` are kept. The backward pass recomputes each block's probabilities from ``lse``
(``P = exp(S - lse)``) and accumulates, with ``Δ = rowsum(dO ∘ O)``::

    dV += Pᵀ·dO        dP = dO·Vᵀ        dS = P ∘ (dP − Δ)        dQ += dS·K·scale        dK += dSᵀ·Q·scale

in a fixed order, so it is deterministic. Scratch memory is a few blocks of ``(..., H, bq, bk)``.

Layout trick: a query block of ``(..., Hkv, G, L, D)`` is copied to ``(..., Hkv, G·bq, D)``, so every
product is a plain batched matmul against the shared K/V head (no K/V repeat for grouped heads) and the
``(..., Hkv, G·bq, bk)`` score block is, without a copy, the ``(..., H, bq, bk)`` block that masks index.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qkv.ops.dropout import keep_mask
from qkv.ops.masks import modify_scores, positional_block_state, right_reach
from qkv.ops.math import compute_dtype
from qkv.ops.spec import AttentionSpec

# Score-block budget in elements (all heads together): about 4 MB of float32, which keeps a block's
# elementwise passes in the caches of this class of CPU while making each matmul large.
BLOCK_ELEMENTS = 1 << 20
MAX_BLOCK_Q = 256
MAX_BLOCK_K = 1024


def block_sizes(spec: AttentionSpec) -> tuple[int, int]:
    """Query and key block sizes ``(bq, bk)`` for a call: large matmuls within the element budget."""
    heads = spec.heads
    for n in spec.batch_shape:
        heads *= n
    bk = min(MAX_BLOCK_K, max(spec.kv_len, 1))
    bq = max(16, min(MAX_BLOCK_Q, BLOCK_ELEMENTS // max(1, heads * bk)))
    return min(bq, max(spec.q_len, 1)), bk


class _Plan:
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


def _query_block(t: torch.Tensor, spec: AttentionSpec, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a ``(..., H, L, X)`` tensor as a contiguous ``(..., Hkv, G·r, X)``."""
    block = t[..., r0:r1, :].reshape(*spec.batch_shape, spec.kv_heads, spec.groups, r1 - r0, t.shape[-1])
    return block.reshape(*spec.batch_shape, spec.kv_heads, spec.groups * (r1 - r0), t.shape[-1])


def _as_heads(block: torch.Tensor, spec: AttentionSpec, rows: int) -> torch.Tensor:
    """View a ``(..., Hkv, G·r, X)`` block as ``(..., H, r, X)``."""
    return block.view(*spec.batch_shape, spec.heads, rows, block.shape[-1])


def _scores(
    q_blk: torch.Tensor, k_t: torch.Tensor, plan: _Plan, r0: int, r1: int,
    c0: int, c1: int, positional: bool, lengths: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Modified scores ``(..., Hkv, G·r, c)`` of a block and, if soft-capped, ``tanh`` of it for backward."""
    s = q_blk @ k_t[..., c0:c1]
    heads_view = _as_heads(s, plan.spec, r1 - r0)
    tanh = None
    if plan.spec.softcap is not None:
        tanh = heads_view.div_(plan.spec.softcap).tanh_().clone()
        heads_view.mul_(plan.spec.softcap)
    modify_scores(plan.mask_spec, heads_view, r0, c0, inplace=True, positional=positional, lengths=lengths)
    return s, tanh


def _dropout_scale(
    spec: AttentionSpec, seed: int | None, r0: int, r1: int, c0: int, c1: int, like: torch.Tensor
) -> torch.Tensor:
    """``keep / (1 - p)`` for a block, shaped ``(..., Hkv, G·r, c)``."""
    assert seed is not None
    keep = keep_mask(spec, seed, r0, r1, c0, c1, like.device)
    scale = keep.to(like.dtype) / (1.0 - spec.dropout)
    return scale.reshape(*spec.batch_shape, spec.kv_heads, spec.groups * (r1 - r0), c1 - c0)


def tiled_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, seed: int | None,
    bq: int, bk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass. Inputs in the compute dtype; returns out ``(..., H, L, Dv)``, lse ``(..., H, L)``."""
    plan = _Plan(spec, bk)
    k_t = k.transpose(-2, -1)
    q_scaled = q * spec.scale
    out = q.new_zeros(*spec.batch_shape, spec.heads, spec.q_len, spec.value_dim)
    lse = q.new_full((*spec.batch_shape, spec.heads, spec.q_len), float("-inf"))
    for r0 in range(0, spec.q_len, bq):
        r1 = min(r0 + bq, spec.q_len)
        q_blk = _query_block(q_scaled, spec, r0, r1)
        rows = q_blk.shape[-2]
        m = q.new_full((*q_blk.shape[:-1], 1), float("-inf"))
        l = q.new_zeros(m.shape)
        acc = q.new_zeros(*q_blk.shape[:-1], spec.value_dim)
        for c0, c1, positional, lengths in plan.key_blocks(r0, r1):
            s, _ = _scores(q_blk, k_t, plan, r0, r1, c0, c1, positional, lengths)
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            m_safe = m_new.nan_to_num(neginf=0.0)
            p = s.sub_(m_safe).exp_()
            alpha = (m - m_safe).exp_()
            l.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
            if spec.dropout > 0:
                p.mul_(_dropout_scale(spec, seed, r0, r1, c0, c1, p))
            acc.mul_(alpha).add_(p @ v[..., c0:c1, :])
            m = m_new
        empty = l == 0
        acc.div_(torch.where(empty, torch.ones_like(l), l))
        block_lse = torch.where(empty, torch.full_like(l, float("-inf")), m + l.log())
        out[..., r0:r1, :] = _as_heads(acc, spec, rows // spec.groups)
        lse[..., r0:r1] = _as_heads(block_lse, spec, rows // spec.groups).squeeze(-1)
    return out, lse


def tiled_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    d_out: torch.Tensor, spec: AttentionSpec, seed: int | None, bq: int, bk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass by recomputation from ``lse``; all tensors in the compute dtype."""
    plan = _Plan(spec, bk)
    k_t = k.transpose(-2, -1)
    q_scaled = q * spec.scale
    # Fully-masked rows have lse = -inf; +inf makes exp(s - lse) = 0 there instead of NaN.
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    delta = (d_out * out).sum(dim=-1)
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for r0 in range(0, spec.q_len, bq):
        r1 = min(r0 + bq, spec.q_len)
        q_blk = _query_block(q_scaled, spec, r0, r1)
        do_blk = _query_block(d_out, spec, r0, r1)
        lse_blk = _query_block(lse_safe.unsqueeze(-1), spec, r0, r1)
        delta_blk = _query_block(delta.unsqueeze(-1), spec, r0, r1)
        dq_blk = torch.zeros_like(q_blk)
        for c0, c1, positional, lengths in plan.key_blocks(r0, r1):
            s, tanh = _scores(q_blk, k_t, plan, r0, r1, c0, c1, positional, lengths)
            p = s.sub_(lse_blk).exp_()
            dp = do_blk @ v[..., c0:c1, :].transpose(-2, -1)
            if spec.dropout > 0:
                drop = _dropout_scale(spec, seed, r0, r1, c0, c1, p)
                dv[..., c0:c1, :] += (p * drop).transpose(-2, -1) @ do_blk
                dp.mul_(drop)
            else:
                dv[..., c0:c1, :] += p.transpose(-2, -1) @ do_blk
            ds = dp.sub_(delta_blk).mul_(p)
            if tanh is not None:
                ds.mul_(1 - tanh.view(ds.shape).square())
            dq_blk += ds @ k[..., c0:c1, :]
            dk[..., c0:c1, :] += ds.transpose(-2, -1) @ q_blk
        dq[..., r0:r1, :] = _as_heads(dq_blk, spec, r1 - r0) * spec.scale
    return dq, dk, dv


class TiledAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``q, k, v, out, lse`` (O(N)) and recomputes blocks in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        spec: AttentionSpec, seed: int | None, bq: int, bk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(q.dtype)
        qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
        out, lse = tiled_forward(qc, kc, vc, spec, seed, bq, bk)
        ctx.save_for_backward(qc, kc, vc, out, lse)
        ctx.spec, ctx.seed, ctx.blocks = spec, seed, (bq, bk)  # type: ignore[attr-defined]
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor, _d_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        qc, kc, vc, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        bq, bk = ctx.blocks  # type: ignore[attr-defined]
        dq, dk, dv = tiled_backward(
            qc, kc, vc, out, lse, d_out.to(qc.dtype), ctx.spec, ctx.seed, bq, bk  # type: ignore[attr-defined]
        )
        q_dtype, k_dtype, v_dtype = ctx.dtypes  # type: ignore[attr-defined]
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None


def recompute_weights(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, spec: AttentionSpec, seed: int | None,
    rows: tuple[int, int] | None = None, heads: list[int] | None = None, bk: int | None = None,
) -> torch.Tensor:
    """Attention weights ``(..., h, r, S)`` of query rows ``[r0, r1)`` (and ``heads``, default all),
    from q, k and the log-sum-exp.

    Written block by block into the result: no scratch beyond one ``(..., H, r, bk)`` block. With
    ``seed`` and ``spec.dropout > 0``, the dropped weights (as the forward pass applied them).
    """
    r0, r1 = rows if rows is not None else (0, spec.q_len)
    bk = bk or block_sizes(spec)[1]
    dtype = compute_dtype(q.dtype)
    q_blk = _query_block(q.to(dtype) * spec.scale, spec, r0, r1)
    k_t = k.to(dtype).transpose(-2, -1)
    lse_c = lse.to(dtype)
    lse_blk = _query_block(torch.where(torch.isinf(lse_c), torch.inf, lse_c).unsqueeze(-1), spec, r0, r1)
    n_heads = spec.heads if heads is None else len(heads)
    weights = q.new_zeros(*spec.batch_shape, n_heads, r1 - r0, spec.kv_len)
    plan = _Plan(spec, bk)
    for c0, c1, positional, lengths in plan.key_blocks(r0, r1):
        s, _ = _scores(q_blk, k_t, plan, r0, r1, c0, c1, positional, lengths)
        p = s.sub_(lse_blk).exp_()
        if spec.dropout > 0 and seed is not None:
            p.mul_(_dropout_scale(spec, seed, r0, r1, c0, c1, p))
        p_heads = _as_heads(p, spec, r1 - r0)
        weights[..., c0:c1] = p_heads if heads is None else p_heads[..., heads, :, :]
    return weights


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, seed: int | None,
    return_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Tiled attention: ``(out, weights or None, lse)``; differentiable in q, k, v."""
    bq, bk = block_sizes(spec)
    out, lse = TiledAttention.apply(q, k, v, spec, seed, bq, bk)
    weights = None
    if return_weights:
        with torch.no_grad():
            weights = recompute_weights(q, k, lse, spec, seed, bk=bk)
    return out, weights, lse
