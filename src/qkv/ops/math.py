"""The reference backend: attention written out as the formula, the oracle for every other backend.

Equivalent to the following, for ``q: (..., H, L, D)``, ``k: (..., Hkv, S, D)``, ``v: (..., Hkv, S, Dv)``::

    scores = scale * q @ k.transpose(-2, -1)  # (..., H, L, S), K/V heads shared by groups
    scores = softcap * tanh(scores / softcap)  # if softcap
    scores = scores + alibi_bias + float_mask  # if given
    scores = scores.masked_fill(~allowed, -inf)  # bool mask, key_lengths, causal, window
    weights = softmax(scores, dim=-1)  # rows with no allowed key: all zeros
    weights = weights * keep / (1 - dropout)  # if dropout
    out = weights @ v  # (..., H, L, Dv)

Half-precision inputs are computed in float32 and the output cast back.
"""

from __future__ import annotations

import torch

from qkv.ops.dropout import keep_mask
from qkv.ops.masks import modify_scores
from qkv.ops.spec import HALF_DTYPES, AttentionSpec


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half inputs, the input dtype otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def grouped(t: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """View query-head tensors ``(..., H, L, X)`` as ``(..., Hkv, G, L, X)``."""
    return t.reshape(*spec.batch_shape, spec.kv_heads, spec.groups, *t.shape[-2:])


def safe_softmax(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim and its log-sum-exp; rows with no finite score give zeros and ``-inf``.

    Args:
        scores: ``(..., L, S)`` float, ``-inf`` where masked.
    Returns:
        weights ``(..., L, S)`` and lse ``(..., L)``.
    """
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(scores - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    empty = denom == 0
    safe_denom = torch.where(empty, torch.ones_like(denom), denom)
    weights = exp / safe_denom
    lse = torch.where(empty, torch.full_like(denom, float("-inf")), row_max + torch.log(safe_denom))
    return weights, lse.squeeze(-1)


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    dropout_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference attention.

    Returns:
        out ``(..., H, L, Dv)`` in q's dtype, weights ``(..., H, L, S)`` in q's dtype (after dropout, so
        ``out == weights @ v``), lse ``(..., H, L)`` in the compute dtype (float32 for half inputs).
    """
    dtype = compute_dtype(q.dtype)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    if spec.kv_len == 0:
        # An empty sum, kept in the autograd graph so that backward still reaches q, k, v.
        weights = (grouped(qc, spec) @ kc.unsqueeze(-3).transpose(-2, -1)).reshape(spec.score_shape)
        out = (grouped(weights, spec) @ vc.unsqueeze(-3)).reshape(
            *spec.batch_shape, spec.heads, spec.q_len, spec.value_dim
        )
        lse = qc.new_full((*spec.batch_shape, spec.heads, spec.q_len), float("-inf"))
        return out.to(q.dtype), weights.to(q.dtype), lse

    scores = grouped(qc, spec) @ kc.unsqueeze(-3).transpose(-2, -1) * spec.scale
    scores = modify_scores(spec, scores.reshape(spec.score_shape), 0, 0)
    weights, lse = safe_softmax(scores)
    if spec.dropout > 0:
        assert dropout_seed is not None, "dropout needs a seed"
        keep = keep_mask(spec, dropout_seed, 0, spec.q_len, 0, spec.kv_len, q.device)
        weights = weights * keep / (1.0 - spec.dropout)
    out = grouped(weights, spec) @ vc.unsqueeze(-3)
    out = out.reshape(*spec.batch_shape, spec.heads, spec.q_len, spec.value_dim)
    return out.to(q.dtype), weights.to(q.dtype), lse


def batched_by_legacy_vmap(t: torch.Tensor) -> bool:
    """Whether ``t`` is a gradient batched by ``torch.autograd.grad(..., is_grads_batched=True)``."""
    return bool(torch._C._functorch.is_legacy_batchedtensor(t))


def reference_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    spec: AttentionSpec,
    seed: int | None,
) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` of ``out`` for the output gradient ``d_out``, through the reference formula.

    The fused backends' backward passes use it for gradients batched by the legacy vmap of
    ``torch.autograd.grad(..., is_grads_batched=True)`` (and ``gradcheck(check_batched_grad=True)``):
    that vmap dispatches no ``autograd.Function`` vmap rule, and block kernels that accumulate in place
    or call fused kernels have no batching rule, while every op here has one. Exact (the same dropout
    pattern for the same seed), at the reference's O(L·S) memory.
    """
    with torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        out, _, _ = math_attention(qd, kd, vd, spec, seed)
        return torch.autograd.grad(out, (qd, kd, vd), d_out, allow_unused=True, materialize_grads=True)
