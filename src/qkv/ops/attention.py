"""``qkv.attention``: the one attention function, with every mask people use."""

from __future__ import annotations

from typing import Literal, overload

import torch

from qkv.ops.dispatch import BackendChoice, check_backend, choose_backend
from qkv.ops.dropout import draw_seed
from qkv.ops.masks import drop_unreachable
from qkv.ops.math import math_attention
from qkv.ops.sdpa import sdpa_attention
from qkv.ops.spec import build_spec
from qkv.ops.tiled import tiled_attention
from qkv.ops.triton_backend import triton_attention


@overload
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = ...,
    key_lengths: torch.Tensor | None = ...,
    causal: bool | str = ...,
    window: tuple[int, int] | None = ...,
    scale: float | None = ...,
    alibi_slopes: torch.Tensor | None = ...,
    softcap: float | None = ...,
    dropout: float = ...,
    generator: torch.Generator | None = ...,
    return_weights: Literal[False] = ...,
    return_lse: Literal[False] = ...,
    backend: str = ...,
) -> torch.Tensor: ...


@overload
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = ...,
    key_lengths: torch.Tensor | None = ...,
    causal: bool | str = ...,
    window: tuple[int, int] | None = ...,
    scale: float | None = ...,
    alibi_slopes: torch.Tensor | None = ...,
    softcap: float | None = ...,
    dropout: float = ...,
    generator: torch.Generator | None = ...,
    return_weights: Literal[True],
    return_lse: Literal[False] = ...,
    backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = ...,
    key_lengths: torch.Tensor | None = ...,
    causal: bool | str = ...,
    window: tuple[int, int] | None = ...,
    scale: float | None = ...,
    alibi_slopes: torch.Tensor | None = ...,
    softcap: float | None = ...,
    dropout: float = ...,
    generator: torch.Generator | None = ...,
    return_weights: Literal[False] = ...,
    return_lse: Literal[True],
    backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = ...,
    key_lengths: torch.Tensor | None = ...,
    causal: bool | str = ...,
    window: tuple[int, int] | None = ...,
    scale: float | None = ...,
    alibi_slopes: torch.Tensor | None = ...,
    softcap: float | None = ...,
    dropout: float = ...,
    generator: torch.Generator | None = ...,
    return_weights: Literal[True],
    return_lse: Literal[True],
    backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@overload
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = ...,
    key_lengths: torch.Tensor | None = ...,
    causal: bool | str = ...,
    window: tuple[int, int] | None = ...,
    scale: float | None = ...,
    alibi_slopes: torch.Tensor | None = ...,
    softcap: float | None = ...,
    dropout: float = ...,
    generator: torch.Generator | None = ...,
    return_weights: bool = ...,
    return_lse: bool = ...,
    backend: str = ...,
) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    generator: torch.Generator | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Scaled dot-product attention, ``softmax(q·kᵀ·scale + masks)·v``.

    Args:
        q: ``(..., H, L, D)`` queries.
        k: ``(..., Hkv, S, D)`` keys; ``H`` a multiple of ``Hkv`` gives grouped/multi-query attention
            (query head ``h`` uses key/value head ``h // (H // Hkv)``), without copying K/V.
        v: ``(..., Hkv, S, Dv)`` values.
        mask: boolean (``True`` = may attend, as in SDPA) or float (added to the scores; q's dtype or
            float32), broadcastable to ``(..., H, L, S)``.
        key_lengths: integer ``(...)`` (usually ``(B,)``): number of valid keys per batch element;
            keys at ``j >= key_lengths[b]`` are padding.
        causal: ``True`` (or ``"bottom_right"``) masks keys after the diagonal that aligns the last query
            with the last key (FlashAttention; what a KV-cached decoder needs); ``"top_left"`` aligns the
            first query with the first key (SDPA's ``is_causal``). Equal when ``L == S``.
        window: ``(left, right)`` sliding window: query ``i`` sees keys ``j`` with
            ``i + offset - left <= j <= i + offset + right`` (``offset = S - L``, or 0 with
            ``causal="top_left"``); ``-1`` = unbounded on that side (FlashAttention's ``window_size``).
        scale: score multiplier; default ``1/sqrt(D)``.
        alibi_slopes: ``(H,)`` or ``(..., H)``: adds ``-slope·|i + offset - j|`` to the scores.
        softcap: ``c``: scores become ``c·tanh(scores/c)``, before biases and masks.
        dropout: probability of zeroing each weight (survivors scaled by ``1/(1-p)``). The pattern comes
            from one seed drawn from ``generator`` (or the global RNG), so it is reproducible and equal
            across qkv's backends. Pass ``0.0`` outside training.
        generator: the ``torch.Generator`` dropout draws its seed from.
        return_weights: also return the weights ``(..., H, L, S)`` (after dropout: ``out == weights @ v``).
        return_lse: also return the log-sum-exp of each row's scores ``(..., H, L)``: float64 for float64
            inputs, float32 otherwise.
        backend: ``"auto"``, ``"math"`` (the reference), ``"torch"`` (SDPA), ``"tiled"`` (O(N) memory) or
            ``"triton"`` (fused Triton kernels, CUDA; no dropout); see :func:`explain_backend`.

    Returns:
        ``out (..., H, L, Dv)``, or a tuple ``(out, weights)``, ``(out, lse)`` or ``(out, weights, lse)``.

    Rows whose keys are all masked give zeros in ``out`` and ``weights`` (never NaN) and ``lse = -inf``.
    Keys and values that no query may attend (beyond ``key_lengths``, outside every query's causal or
    window reach, or masked out for every query by ``mask``) never influence the result on any backend,
    even when they hold NaN or inf: padding and unused cache slots may hold garbage. A non-finite key or
    value that some query does attend makes the output non-finite.

    Gradients: ``out`` is differentiable on every backend. When q, k or v require grad, ``weights`` and
    ``lse`` are differentiable too: such a call runs on the reference path whatever ``backend`` says
    (the differentiable weights are L×S anyway; :func:`explain_backend` says so).
    """
    backend = check_backend(backend)
    spec = build_spec(
        q,
        k,
        v,
        mask=mask,
        key_lengths=key_lengths,
        causal=causal,
        window=window,
        scale=scale,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
        dropout=dropout,
    )
    choice = choose_backend(
        spec,
        backend,
        return_weights=return_weights,
        return_lse=return_lse,
        generator=generator,
        device=q.device,
        dtype=q.dtype,
        inputs_require_grad=_require_grad(q, k, v),
    )
    k, v = drop_unreachable(k, v, spec)
    if choice.backend == "torch":
        return sdpa_attention(q, k, v, spec)
    seed = draw_seed(generator) if spec.dropout > 0 else None
    if choice.backend in ("tiled", "triton"):
        run = tiled_attention if choice.backend == "tiled" else triton_attention
        out, weights, lse = run(q, k, v, spec, seed, return_weights)
    else:
        out, weights, lse = math_attention(q, k, v, spec, seed)
    extras: tuple[torch.Tensor, ...] = ()
    if return_weights:
        assert weights is not None, "every backend returns the weights when asked for them"
        extras += (weights,)
    if return_lse:
        extras += (lse,)
    return (out, *extras) if extras else out


def explain_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    **features: object,
) -> BackendChoice:
    """Which backend ``attention(q, k, v, ...)`` with the same arguments would use, and why.

    Example::

        >>> q = k = v = torch.randn(1, 2, 128, 64)
        >>> qkv.explain_backend(q, k, v, softcap=30.0)
        BackendChoice(backend='tiled', reason='SDPA has no soft-capping, ...; tiled computes it exactly in O(N) memory')
    """
    backend = check_backend(backend)
    spec = build_spec(q, k, v, **features)  # type: ignore[arg-type]
    return choose_backend(
        spec,
        backend,
        return_weights=return_weights,
        return_lse=return_lse,
        generator=generator,
        device=q.device,
        dtype=q.dtype,
        inputs_require_grad=_require_grad(q, k, v),
    )


def _require_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
