"""The ``tiled`` backend: exact attention in O(N) memory, forward and backward, with weights on demand.

Two block kernels, one semantics (the ``math`` reference's, to rounding):

* ``fused`` (CPU): PyTorch's flash-attention CPU kernel called per block with only that block's mask,
  merged through log-sum-exps (:mod:`qkv.ops.tiled_fused`). Covers every feature but soft-capping and
  dropout, at the speed of PyTorch's best CPU kernel.
* ``online`` (any device, every feature): online softmax written in plain PyTorch ops
  (:mod:`qkv.ops.tiled_online`).

Only ``q, k, v, out`` and the log-sum-exp are saved for backward, which recomputes block by block.
Weights, when asked for, are recomputed from the log-sum-exp into the result tensor, with no ``L×S``
scratch besides it.
"""

from __future__ import annotations

import torch

from qkv.ops.blocks import block_sizes
from qkv.ops.math import compute_dtype, math_attention
from qkv.ops.spec import AttentionSpec
from qkv.ops.tiled_fused import fused_backward, fused_block_sizes, fused_forward, fused_unsupported_reason
from qkv.ops.tiled_online import online_backward, online_forward, recompute_weights


def tiled_kernel(spec: AttentionSpec, device: torch.device) -> str:
    """``"fused"`` when the fused CPU block kernel covers the call, else ``"online"``."""
    return "fused" if fused_unsupported_reason(spec, device) is None else "online"


class TiledAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``q, k, v, out, lse`` (O(N)) and recomputes blocks in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        spec: AttentionSpec, seed: int | None, kernel: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(q.dtype)
        qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
        if kernel == "fused":
            blocks = fused_block_sizes(spec)
            out, lse = fused_forward(qc, kc, vc, spec, *blocks)
        else:
            blocks = block_sizes(spec)
            out, lse = online_forward(qc, kc, vc, spec, seed, *blocks)
        ctx.save_for_backward(qc, kc, vc, out, lse)
        ctx.spec, ctx.seed, ctx.kernel, ctx.blocks = spec, seed, kernel, blocks  # type: ignore[attr-defined]
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor, _d_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        qc, kc, vc, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        spec, blocks = ctx.spec, ctx.blocks  # type: ignore[attr-defined]
        d_out = d_out.to(qc.dtype)
        if ctx.kernel == "fused":  # type: ignore[attr-defined]
            dq, dk, dv = fused_backward(qc, kc, vc, out, lse, d_out, spec, *blocks)
        else:
            dq, dk, dv = online_backward(qc, kc, vc, out, lse, d_out, spec, ctx.seed, *blocks)  # type: ignore[attr-defined]
        q_dtype, k_dtype, v_dtype = ctx.dtypes  # type: ignore[attr-defined]
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, seed: int | None,
    return_weights: bool, kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Tiled attention: ``(out, weights or None, lse)``; differentiable in q, k, v (weights are not).

    Inputs with an empty dimension have nothing to tile: the reference computes them.
    """
    if spec.is_empty:
        out, weights, lse = math_attention(q, k, v, spec, seed)
        return out, weights if return_weights else None, lse
    kernel = kernel or tiled_kernel(spec, q.device)
    out, lse = TiledAttention.apply(q, k, v, spec, seed, kernel)
    weights = None
    if return_weights:
        with torch.no_grad():
            weights = recompute_weights(q, k, lse, spec, seed)
    return out, weights, lse
