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

from collections.abc import Callable
from typing import Any

import torch

from qkv.ops.blocks import block_sizes
from qkv.ops.math import batched_by_legacy_vmap, compute_dtype, math_attention, reference_gradients
from qkv.ops.spec import AttentionSpec
from qkv.ops.tiled_fused import fused_backward, fused_block_sizes, fused_forward, fused_unsupported_reason
from qkv.ops.tiled_online import online_backward, online_forward, recompute_weights


def tiled_kernel(spec: AttentionSpec, device: torch.device) -> str:
    """``"fused"`` when the fused CPU block kernel covers the call, else ``"online"``."""
    return "fused" if fused_unsupported_reason(spec, device) is None else "online"


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, seed: int | None, kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of one call; inputs in the compute dtype."""
    if kernel == "fused":
        return fused_forward(q, k, v, spec, *fused_block_sizes(spec))
    return online_forward(q, k, v, spec, seed, *block_sizes(spec))


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    spec: AttentionSpec,
    seed: int | None,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of one call; all in the compute dtype."""
    if kernel == "fused":
        return fused_backward(q, k, v, out, lse, d_out, spec, *fused_block_sizes(spec))
    return online_backward(q, k, v, out, lse, d_out, spec, seed, *block_sizes(spec))


def _per_slice(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    batch_size: int,
    in_dims: tuple[int | None, ...],
    tensors: tuple[torch.Tensor, ...],
    *args: object,
) -> tuple[torch.Tensor, ...]:
    """A vmap rule: ``fn`` on each slice of the vmapped dimension, results stacked along dim 0.

    Slicing keeps every slice's call identical to an unbatched one (same blocks, same dropout pattern,
    which depends on positions within the call), so vmapped and looped results agree exactly.
    """
    results = [
        fn(*(t if d is None else t.select(d, i) for t, d in zip(tensors, in_dims, strict=True)), *args)
        for i in range(batch_size)
    ]
    return tuple(torch.stack(parts) for parts in zip(*results, strict=True))


class TiledAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``q, k, v, out, lse`` (O(N)) and recomputes blocks in backward.

    Inputs and outputs are in the compute dtype (the caller casts). ``torch.func.vmap`` runs it slice
    by slice, and its backward works under batched gradients (``is_grads_batched``, ``check_batched_grad``).
    """

    @staticmethod
    def forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        spec: AttentionSpec,
        seed: int | None,
        kernel: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(q, k, v, spec, seed, kernel)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        q, k, v, spec, seed, kernel = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.seed, ctx.kernel = spec, seed, kernel
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor, _d_lse: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        if batched_by_legacy_vmap(d_out):
            dq, dk, dv = reference_gradients(q, k, v, d_out, ctx.spec, ctx.seed)
        else:
            dq, dk, dv = TiledAttentionBackward.apply(  # type: ignore[no-untyped-call]
                q, k, v, out, lse, d_out, ctx.spec, ctx.seed, ctx.kernel
            )
        return dq, dk, dv, None, None, None

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        spec: AttentionSpec,
        seed: int | None,
        kernel: str,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[int, int]]:
        outs = _per_slice(_forward, info.batch_size, in_dims[:3], (q, k, v), spec, seed, kernel)
        return outs, (0, 0)


class TiledAttentionBackward(torch.autograd.Function):
    """The tiled backward pass as a function of its own, so that it has a vmap rule (batched gradients).

    Not differentiable itself: gradients of gradients need ``backend="math"``.
    """

    @staticmethod
    def forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        d_out: torch.Tensor,
        spec: AttentionSpec,
        seed: int | None,
        kernel: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(q, k, v, out, lse, d_out.to(q.dtype), spec, seed, kernel)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, ...]:
        raise RuntimeError(
            "the tiled backend computes first derivatives only; for gradients of gradients "
            "(create_graph=True, double backward) use backend='math'"
        )

    @staticmethod
    def vmap(
        info: Any,
        in_dims: tuple[int | None, ...],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        d_out: torch.Tensor,
        spec: AttentionSpec,
        seed: int | None,
        kernel: str,
    ) -> tuple[tuple[torch.Tensor, ...], tuple[int, int, int]]:
        grads = _per_slice(
            lambda *t: TiledAttentionBackward.forward(*t),
            info.batch_size,
            in_dims[:6],
            (q, k, v, out, lse, d_out),
            spec,
            seed,
            kernel,
        )
        return grads, (0, 0, 0)


def tiled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    seed: int | None,
    return_weights: bool,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Tiled attention: ``(out, weights or None, lse)``; ``out`` is differentiable in q, k, v, the
    weights and lse are not (:func:`qkv.attention` takes differentiable ones from the reference).

    Inputs with an empty dimension have nothing to tile: the reference computes them.
    """
    if spec.is_empty:
        out, all_weights, lse = math_attention(q, k, v, spec, seed)
        return out, all_weights if return_weights else None, lse
    kernel = kernel or tiled_kernel(spec, q.device)
    dtype = compute_dtype(q.dtype)
    out, lse = TiledAttention.apply(  # type: ignore[no-untyped-call]
        q.to(dtype), k.to(dtype), v.to(dtype), spec, seed, kernel
    )
    out = out.to(q.dtype)
    weights: torch.Tensor | None = None
    if return_weights:
        with torch.no_grad():
            weights = recompute_weights(q, k, lse, spec, seed)
    return out, weights, lse
