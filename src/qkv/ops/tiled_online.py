"""Online-softmax block kernel in plain PyTorch ops: any device, every feature (softcap, dropout too).

For each block of query rows, key blocks are visited in order, keeping per row a running maximum ``m``,
a running sum ``l`` of ``exp(s - m)`` and an accumulator ``acc = Σ exp(s - m)·v`` rescaled whenever
``m`` grows (Milakov & Gimelshein 2018; FlashAttention). Only ``out`` and the log-sum-exp
``lse = m + log l`` are kept. The backward pass recomputes each block's probabilities from ``lse``
(``P = exp(S - lse)``) and accumulates, with ``Δ = rowsum(dO ∘ O)``::

    dV += Pᵀ·dO        dP = dO·Vᵀ        dS = P ∘ (dP − Δ)        dQ += dS·K·scale        dK += dSᵀ·Q·scale

in a fixed order, so it is deterministic. Scratch memory is a few blocks of ``(..., H, bq, bk)``.
"""

from __future__ import annotations

import torch

from qkv.ops.blocks import BlockPlan, as_heads, block_sizes, query_block
from qkv.ops.dropout import keep_mask
from qkv.ops.masks import modify_scores
from qkv.ops.math import compute_dtype
from qkv.ops.spec import AttentionSpec


def _scores(
    q_blk: torch.Tensor,
    k_t: torch.Tensor,
    plan: BlockPlan,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    positional: bool,
    lengths: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Modified scores ``(..., Hkv, G·r, c)`` of a block and, if soft-capped, ``tanh`` of it for backward."""
    s = q_blk @ k_t[..., c0:c1]
    heads_view = as_heads(s, plan.spec, r1 - r0)
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


def online_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    seed: int | None,
    bq: int,
    bk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass. Inputs in the compute dtype; returns out ``(..., H, L, Dv)``, lse ``(..., H, L)``."""
    plan = BlockPlan(spec, bk)
    k_t = k.transpose(-2, -1)
    q_scaled = q * spec.scale
    out = q.new_zeros(*spec.batch_shape, spec.heads, spec.q_len, spec.value_dim)
    lse = q.new_full((*spec.batch_shape, spec.heads, spec.q_len), float("-inf"))
    for r0 in range(0, spec.q_len, bq):
        r1 = min(r0 + bq, spec.q_len)
        q_blk = query_block(q_scaled, spec, r0, r1)
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
        out[..., r0:r1, :] = as_heads(acc, spec, rows // spec.groups)
        lse[..., r0:r1] = as_heads(block_lse, spec, rows // spec.groups).squeeze(-1)
    return out, lse


def online_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    spec: AttentionSpec,
    seed: int | None,
    bq: int,
    bk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass by recomputation from ``lse``; all tensors in the compute dtype."""
    plan = BlockPlan(spec, bk)
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
        q_blk = query_block(q_scaled, spec, r0, r1)
        do_blk = query_block(d_out, spec, r0, r1)
        lse_blk = query_block(lse_safe.unsqueeze(-1), spec, r0, r1)
        delta_blk = query_block(delta.unsqueeze(-1), spec, r0, r1)
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
        dq[..., r0:r1, :] = as_heads(dq_blk, spec, r1 - r0) * spec.scale
    return dq, dk, dv


def recompute_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    spec: AttentionSpec,
    seed: int | None,
    rows: tuple[int, int] | None = None,
    heads: list[int] | None = None,
    bk: int | None = None,
) -> torch.Tensor:
    """Attention weights ``(..., h, r, S)`` of query rows ``[r0, r1)`` (and ``heads``, default all),
    from q, k and the log-sum-exp.

    Written block by block into the result: no scratch beyond one ``(..., H, r, bk)`` block. With
    ``seed`` and ``spec.dropout > 0``, the dropped weights (as the forward pass applied them).
    """
    r0, r1 = rows if rows is not None else (0, spec.q_len)
    bk = bk or block_sizes(spec)[1]
    dtype = compute_dtype(q.dtype)
    q_blk = query_block(q.to(dtype) * spec.scale, spec, r0, r1)
    k_t = k.to(dtype).transpose(-2, -1)
    lse_c = lse.to(dtype)
    lse_blk = query_block(torch.where(torch.isinf(lse_c), torch.inf, lse_c).unsqueeze(-1), spec, r0, r1)
    n_heads = spec.heads if heads is None else len(heads)
    weights = q.new_zeros(*spec.batch_shape, n_heads, r1 - r0, spec.kv_len)
    plan = BlockPlan(spec, bk)
    for c0, c1, positional, lengths in plan.key_blocks(r0, r1):
        s, _ = _scores(q_blk, k_t, plan, r0, r1, c0, c1, positional, lengths)
        p = s.sub_(lse_blk).exp_()
        if spec.dropout > 0 and seed is not None:
            p.mul_(_dropout_scale(spec, seed, r0, r1, c0, c1, p))
        p_heads = as_heads(p, spec, r1 - r0)
        weights[..., c0:c1] = p_heads if heads is None else p_heads[..., heads, :, :]
    return weights
