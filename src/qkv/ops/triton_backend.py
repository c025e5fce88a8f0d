"""The ``triton`` backend: fused attention kernels in Triton, forward and backward, for CUDA GPUs.

One kernel launch computes a whole forward pass: each program keeps a block of query rows in registers
and streams the key/value blocks its rows may see through an online softmax (FlashAttention-2), with
every qkv feature but dropout applied inside the kernel: causal in both alignments, sliding windows,
ALiBi, soft-capping, grouped heads (K/V read in place), ``key_lengths`` and boolean or float masks read
block by block from the caller's tensor, broadcast dimensions included (stride 0, never expanded).
Memory is O(N): only ``out`` and the log-sum-exp are written, and the backward pass (one kernel for
dK/dV, one for dQ, no atomics: deterministic) recomputes the probabilities from them. The kernels are in
:mod:`qkv.ops.triton_kernels`.

Triton is optional (``pip install 'qkv[gpu]'``) and imported only when a call runs here. On CPU the
kernels run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before the first call), which the
tests use; ``backend="auto"`` never picks this backend on CPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from qkv.ops.masks import right_reach
from qkv.ops.math import batched_by_legacy_vmap, reference_gradients
from qkv.ops.spec import AttentionSpec
from qkv.ops.tiled_online import recompute_weights

MAX_HEAD_DIM = 256
MIN_TRITON = (3, 4)
MIN_TRITON_TEXT = "3.4"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Rows per program of the Δ = rowsum(dO ∘ O) kernel.
DELTA_BLOCK_M = 64


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (parsed as Triton parses it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_version_error() -> str | None:
    """Why the installed Triton is too old for the kernels (they use ``triton.knobs``, new in 3.4), or
    ``None``. Read from the package metadata, without importing Triton."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None
    parts = version.split("+")[0].split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)
    except ValueError:
        return f"cannot read Triton's version {version!r}; the kernels need Triton {MIN_TRITON_TEXT} or newer"
    if major_minor < MIN_TRITON:
        return (
            f"Triton {version} is installed, but the kernels need Triton {MIN_TRITON_TEXT} or newer "
            f"(pip install 'triton>={MIN_TRITON_TEXT}')"
        )
    return None


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install must not break dispatch
        return f"Triton is installed but failed to import ({type(e).__name__}: {e})"
    return None


def triton_unsupported_reason(spec: AttentionSpec, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot compute this call on ``device`` with inputs of ``dtype``, or ``None``.

    Cheap: imports Triton only for calls on CUDA (or with the interpreter requested), once.
    """
    if not _triton_installed():
        return "Triton is not installed (pip install 'qkv[gpu]')"
    version_error = triton_version_error()
    if version_error is not None:
        return version_error
    if device.type == "cpu":
        if not interpreting():
            return (
                "the Triton kernels need a CUDA GPU (inputs on cpu); TRITON_INTERPRET=1 runs them in "
                "Triton's CPU interpreter, slowly, for tests"
            )
        kernels = sys.modules.get("qkv.ops.triton_kernels")
        if kernels is not None and not kernels.INTERPRETED:
            return "the Triton kernels were built for the GPU before TRITON_INTERPRET=1 was set in this process"
    elif device.type != "cuda":
        return f"the Triton kernels need a CUDA GPU (inputs on {device.type})"
    elif torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        return f"the Triton kernels need compute capability 8.0 or newer (this GPU has {major}.{minor})"
    import_error = _triton_import_error()
    if import_error is not None:
        return import_error
    if dtype not in DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32 inputs (got {dtype}; use 'tiled' or 'math')"
    if spec.head_dim > MAX_HEAD_DIM or spec.value_dim > MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {MAX_HEAD_DIM} (got D={spec.head_dim}, Dv={spec.value_dim})"
    if spec.dropout > 0:
        return "the Triton kernels have no dropout (qkv's reproducible dropout runs in the tiled backend)"
    if spec.mask is not None and spec.mask.requires_grad:
        return "the float mask requires grad and the Triton backward computes no mask gradient"
    if spec.alibi_slopes is not None and spec.alibi_slopes.requires_grad:
        return "alibi_slopes requires grad and the Triton backward computes no slope gradient"
    return None


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class Launch:
    """Everything the kernels read besides q, k, v: flattened masks and the scalar/constexpr arguments.

    ``mask`` is the user's mask as a ``(B|1, H|1, L|1, S|1)`` view (booleans reinterpreted as bytes)
    with ``mask_strides`` 0 on broadcast dimensions, or a placeholder never read (``mask_kind == 0``).
    """

    batch: int
    mask: torch.Tensor
    mask_strides: tuple[int, int, int, int]
    slopes: torch.Tensor  # (B·H,) float32, or a placeholder
    key_lengths: torch.Tensor  # (B,) int32, or a placeholder
    scalars: tuple[Any, ...]  # offset, right, left, qk_scale, cap_mul
    constants: dict[str, Any]

    @classmethod
    def build(cls, spec: AttentionSpec, q: torch.Tensor) -> Launch:
        batch = spec.batch_size
        mask, strides, kind = _mask_view(spec, batch, q)
        slopes = q
        if spec.alibi_slopes is not None:
            per_head = spec.alibi_slopes.detach()[..., 0, 0].to(torch.float32)
            slopes = per_head.expand(*spec.batch_shape, spec.heads).reshape(batch * spec.heads).contiguous()
        lengths = q
        if spec.key_lengths is not None:
            lengths = spec.key_lengths.reshape(batch).to(torch.int32).contiguous()
        right, left = right_reach(spec), spec.window_left
        log2e = 1.0 / math.log(2.0)
        if spec.softcap is not None:
            qk_scale, cap_mul = spec.scale / spec.softcap, spec.softcap * log2e
        else:
            qk_scale, cap_mul = spec.scale * log2e, 1.0
        constants = {
            "D": spec.head_dim,
            "DV": spec.value_dim,
            "BLOCK_D": _pow2(spec.head_dim),
            "BLOCK_DV": _pow2(spec.value_dim),
            "HAS_RIGHT": right is not None,
            "HAS_LEFT": left is not None,
            "SOFTCAP": spec.softcap is not None,
            "HAS_ALIBI": spec.alibi_slopes is not None,
            "HAS_KL": spec.key_lengths is not None,
            "MASK_KIND": kind,
            # float32 inputs get float32 products (exact, as the other backends), not TF32.
            "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        }
        scalars = (spec.offset, right or 0, left or 0, qk_scale, cap_mul)
        return cls(batch, mask, strides, slopes, lengths, scalars, constants)


def _mask_view(
    spec: AttentionSpec, batch: int, like: torch.Tensor
) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    """The user's mask as ``(B|1, H|1, L|1, S|1)`` without expanding it, its strides (0 where broadcast),
    and its kind: 0 none, 1 boolean, 2 float."""
    if spec.mask is None:
        return like, (0, 0, 0, 0), 0
    mask = spec.mask.detach()
    kind = 2
    if mask.dtype == torch.bool:
        mask, kind = mask.view(torch.uint8), 1
    n = len(spec.batch_shape)
    lead, tail = mask.shape[:n], tuple(mask.shape[n:])
    if all(s == 1 for s in lead):
        mask = mask.reshape(1, *tail)
    elif n > 1:  # several batch dims, some broadcast: only they are materialized, never H, L or S
        mask = mask.expand(*spec.batch_shape, *tail).reshape(batch, *tail)
    b, h, r, c = (0 if mask.shape[i] == 1 else mask.stride(i) for i in range(4))
    strides = (b, h, r, c)
    return mask, strides, kind


def _as_4d(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``(..., X, Y, Z)`` as ``(B, X, Y, Z)`` with a unit last stride (a view when possible)."""
    t = t.reshape(batch, *t.shape[-3:])
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernels() -> Any:
    from qkv.ops import triton_kernels

    return triton_kernels


def _lengths(spec: AttentionSpec) -> tuple[int, int]:
    return _pow2(spec.q_len, 1), _pow2(spec.kv_len, 1)


def triton_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, launch: Launch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass on ``(B, H, L, D)``, ``(B, Hkv, S, D)``, ``(B, Hkv, S, Dv)``: out ``(B, H, L, Dv)`` in
    q's dtype, lse ``(B, H, L)`` in float32 (``-inf`` where a row has no allowed key)."""
    batch, heads, q_len, kv_len = launch.batch, spec.heads, spec.q_len, spec.kv_len
    out = q.new_empty(batch, heads, q_len, spec.value_dim)
    lse = q.new_empty(batch, heads, q_len, dtype=torch.float32)
    if kv_len == 0 or out.numel() == 0 or lse.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    kernels = _kernels()
    kernels.attention_forward_kernel[lambda meta: (batch * heads, -(-q_len // meta["BLOCK_M"]))](
        q,
        k,
        v,
        out,
        lse,
        launch.mask,
        launch.slopes,
        launch.key_lengths,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *launch.mask_strides,
        heads,
        spec.groups,
        q_len,
        kv_len,
        *launch.scalars,
        *_lengths(spec),
        **launch.constants,
    )
    return out, lse


def triton_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    spec: AttentionSpec,
    launch: Launch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (in the inputs' dtypes and 4-d shapes) by recomputation from ``lse``."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    batch, heads, q_len, kv_len = launch.batch, spec.heads, spec.q_len, spec.kv_len
    if kv_len == 0 or q_len == 0 or batch * heads == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    kernels = _kernels()
    delta = lse.new_empty(batch, heads, q_len)
    block_m = 16 if kernels.INTERPRETED else DELTA_BLOCK_M
    kernels.attention_delta_kernel[(batch * heads, -(-q_len // block_m))](
        out,
        d_out,
        delta,
        *out.stride()[:3],
        *d_out.stride()[:3],
        heads,
        q_len,
        DV=spec.value_dim,
        BLOCK_DV=launch.constants["BLOCK_DV"],
        BLOCK_M=block_m,
    )
    common = (
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *d_out.stride()[:3],
    )
    scalars = (heads, spec.groups, q_len, kv_len, *launch.scalars, spec.scale, *_lengths(spec))
    kernels.attention_dkdv_kernel[lambda meta: (batch * spec.kv_heads, -(-kv_len // meta["BLOCK_N"]))](
        q,
        k,
        v,
        d_out,
        lse,
        delta,
        dk,
        dv,
        launch.mask,
        launch.slopes,
        launch.key_lengths,
        *common,
        *dk.stride()[:3],
        *dv.stride()[:3],
        *launch.mask_strides,
        *scalars,
        **launch.constants,
    )
    kernels.attention_dq_kernel[lambda meta: (batch * heads, -(-q_len // meta["BLOCK_M"]))](
        q,
        k,
        v,
        d_out,
        lse,
        delta,
        dq,
        launch.mask,
        launch.slopes,
        launch.key_lengths,
        *common,
        *dq.stride()[:3],
        *launch.mask_strides,
        *scalars,
        **launch.constants,
    )
    return dq, dk, dv


class TritonAttention(torch.autograd.Function):
    """Autograd wrapper: saves ``q, k, v, out, lse`` (O(N)); backward runs the Δ, dK/dV and dQ kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        spec: AttentionSpec,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        launch = Launch.build(spec, q)
        q4, k4, v4 = (_as_4d(t, launch.batch) for t in (q, k, v))
        out, lse = triton_forward(q4, k4, v4, spec, launch)
        ctx.save_for_backward(q4, k4, v4, out, lse)
        ctx.spec, ctx.launch = spec, launch  # type: ignore[attr-defined]
        ctx.shapes = (q.shape, k.shape, v.shape)  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(lse)
        batch_shape = spec.batch_shape
        return out.view(*batch_shape, *out.shape[1:]), lse.view(*batch_shape, *lse.shape[1:])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor, _d_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        spec, launch = ctx.spec, ctx.launch  # type: ignore[attr-defined]
        q_shape, k_shape, v_shape = ctx.shapes  # type: ignore[attr-defined]
        if batched_by_legacy_vmap(d_out):
            dq, dk, dv = reference_gradients(q.view(q_shape), k.view(k_shape), v.view(v_shape), d_out, spec, None)
            return dq, dk, dv, None
        d_out = _as_4d(d_out.to(out.dtype), launch.batch)
        dq, dk, dv = triton_backward(q, k, v, out, lse, d_out, spec, launch)
        return dq.view(q_shape), dk.view(k_shape), dv.view(v_shape), None


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttentionSpec,
    seed: int | None,
    return_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Fused Triton attention: ``(out, weights or None, lse)``; differentiable in q, k, v.

    ``seed`` is unused (no dropout here; :func:`triton_unsupported_reason` turns such calls away); the
    weights, when asked for, are recomputed from the log-sum-exp as the tiled backend does.
    """
    out, lse = TritonAttention.apply(q, k, v, spec)  # type: ignore[no-untyped-call]
    weights = None
    if return_weights:
        with torch.no_grad():
            weights = recompute_weights(q, k, lse, spec, seed)
    return out, weights, lse
