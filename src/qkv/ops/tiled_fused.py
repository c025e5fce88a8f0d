"""Fused block kernel on CPU: PyTorch's flash-attention CPU kernel applied block by block.

``aten::_scaled_dot_product_flash_attention_for_cpu`` computes attention with an online softmax in
cache-sized tiles and returns the log-sum-exp; its backward recomputes from it. Alone it takes one
dense mask for the whole ``L×S`` matrix, which is what SDPA builds for ALiBi, windows or bottom-right
causal. Here it is called per block of queries and keys with only that block's mask, built on the fly
from qkv's rules, and the partial results are merged exactly through their log-sum-exps::

    lse = logaddexp(lse₁, lse₂)        out = out₁·exp(lse₁ − lse) + out₂·exp(lse₂ − lse)

Blocks outside the causal/window band are never visited. The backward pass calls the kernel's backward
per block with the *final* ``out`` and ``lse``, which yields exactly each block's share of dQ, dK, dV.
Soft-capping and qkv's dropout are not expressible to this kernel; they use the online kernel.

Two limits of the kernel are kept out of its way: it reads the last dimension as if it were contiguous
(a transposed or channels-last input gives wrong values), so such inputs are copied first; and it
returns NaN for ``is_causal=True`` with a scale ``<= 0``, so the sign of the scale is folded into ``q``
(``scale·q·k = |scale|·(−q)·k``; a zero scale becomes ``q = 0``, scale 1).
"""

from __future__ import annotations

from typing import Any

import torch

from qkv.ops.blocks import BlockPlan
from qkv.ops.masks import block_allowed, block_bias
from qkv.ops.spec import AttentionSpec, flatten_batch

_FORWARD: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)

# Elements of one mask block (8 MB in float32): bounds the extra memory of masked calls.
MASK_BLOCK_ELEMENTS = 1 << 21
# The kernel's own tiling wants at least this many query rows per call to stay efficient.
MIN_BLOCK_Q = 128
MAX_BLOCK_Q = 512


def fused_unsupported_reason(spec: AttentionSpec, device: torch.device) -> str | None:
    """Why the fused CPU block kernel cannot compute this call, or ``None`` if it can."""
    if _FORWARD is None or _BACKWARD is None:
        return "this PyTorch has no CPU flash-attention kernel"
    if device.type != "cpu":
        return f"the fused block kernel is CPU-only (inputs on {device.type})"
    if spec.value_dim != spec.head_dim:
        return f"the kernel needs Dv == D (got Dv={spec.value_dim}, D={spec.head_dim})"
    if spec.softcap is not None:
        return "soft-capping is not an additive mask"
    if spec.dropout > 0:
        return "qkv's counter-based dropout is applied by the online kernel"
    return None


def kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if its last dimension is not contiguous (the kernel reads it as if it were)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def kernel_query_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float, float]:
    """``(q', scale', sign)`` with ``scale'·q'·k == scale·q·k`` and ``scale' > 0``; ``dq = sign·dq'``."""
    if scale > 0:
        return q, scale, 1.0
    if scale < 0:
        return -q, -scale, -1.0
    return torch.zeros_like(q), 1.0, 0.0


def _needs_mask(spec: AttentionSpec) -> bool:
    return not spec.only_top_left_causal and (
        spec.has_positional_mask
        or spec.mask is not None
        or spec.key_lengths is not None
        or spec.alibi_slopes is not None
    )


def fused_block_sizes(spec: AttentionSpec) -> tuple[int, int]:
    """``(bq, bk)``: whole matrix when no mask is built, else blocks whose mask fits the budget."""
    if not _needs_mask(spec):
        return max(spec.q_len, 1), max(spec.kv_len, 1)
    per_row_col = 1
    if spec.key_lengths is not None or (spec.mask is not None and spec.mask.ndim > 3):
        per_row_col *= spec.batch_size
    if spec.alibi_slopes is not None or (spec.mask is not None and spec.mask.shape[-3] > 1):
        per_row_col *= spec.heads
    bq = max(1, min(spec.q_len, MAX_BLOCK_Q, max(MIN_BLOCK_Q, MASK_BLOCK_ELEMENTS // max(1, spec.kv_len))))
    bk = max(1, min(spec.kv_len, MASK_BLOCK_ELEMENTS // (per_row_col * bq)))
    return bq, max(bk, min(spec.kv_len, 256))


def _mask_block(
    spec: AttentionSpec,
    r0: int,
    r1: int,
    c0: int,
    c1: int,
    positional: bool,
    lengths: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The block's additive mask ``(B|1, H|1, r, c)`` (``-inf`` = not allowed), or ``None``, and the rows
    ``(B|1, H|1, r)`` that allow no key at all (``None`` when no row can be empty, e.g. ALiBi alone)."""
    allowed = block_allowed(spec, r0, r1, c0, c1, device, positional=positional, lengths=lengths)
    bias = block_bias(spec, r0, r1, c0, c1, device, dtype)
    if allowed is None and bias is None:
        return None, None
    if bias is None:
        bias = torch.zeros((), dtype=dtype, device=device)
    empty_rows = None
    if allowed is not None:
        bias = torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=dtype, device=device))
        empty_rows = ~allowed.any(dim=-1)
    if spec.mask is not None and spec.mask.dtype != torch.bool:
        empty_rows = torch.isneginf(bias).all(dim=-1)  # the float mask itself may hold -inf
    flat_rows = None if empty_rows is None else flatten_batch(empty_rows.unsqueeze(-1), spec)[..., 0]
    return flatten_batch(bias, spec), flat_rows


def fused_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec, bq: int, bk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass. Inputs ``(..., H|Hkv, L|S, D)`` in the compute dtype; returns out and lse."""
    q4, k4, v4 = (kernel_layout(flatten_batch(t, spec)) for t in (q, k, v))
    q4, scale, _ = kernel_query_scale(q4, spec.scale)
    plan = BlockPlan(spec, bk)
    is_causal = spec.only_top_left_causal
    outs, lses = [], []
    for r0 in range(0, spec.q_len, bq):
        r1 = min(r0 + bq, spec.q_len)
        acc = q4.new_zeros(*q4.shape[:2], r1 - r0, spec.value_dim)
        acc_lse = q4.new_full((*q4.shape[:2], r1 - r0), float("-inf"))
        for i, (c0, c1, positional, lengths) in enumerate(plan.key_blocks(r0, r1)):
            mask, empty_rows = _mask_block(
                spec, r0, r1, c0, c1, positional and not is_causal, lengths, q.dtype, q.device
            )
            o, l = _FORWARD(
                q4[:, :, r0:r1],
                k4[:, :, c0:c1],
                v4[:, :, c0:c1],
                is_causal=is_causal,
                attn_mask=mask,
                scale=scale,
            )
            if empty_rows is not None:
                # The kernel reports lse = 0 for rows with no allowed key; in qkv that is -inf.
                l = l.masked_fill(empty_rows, float("-inf"))
            if i == 0:
                acc, acc_lse = o, l
                continue
            new_lse = torch.logaddexp(acc_lse, l)
            keep_old = torch.exp(acc_lse - new_lse).nan_to_num_(0.0).unsqueeze(-1)
            take_new = torch.exp(l - new_lse).nan_to_num_(0.0).unsqueeze(-1)
            acc = acc * keep_old + o * take_new
            acc_lse = new_lse
        outs.append(acc)
        lses.append(acc_lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)
    return out.reshape(*spec.batch_shape, *out.shape[-3:]), lse.reshape(*spec.batch_shape, *lse.shape[-2:])


def fused_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    spec: AttentionSpec,
    bq: int,
    bk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward pass, block by block with the final ``out`` and ``lse``; all in the compute dtype."""
    q4, k4, v4, o4, g4 = (kernel_layout(flatten_batch(t, spec)) for t in (q, k, v, out, d_out))
    q4, scale, sign = kernel_query_scale(q4, spec.scale)
    # Rows with no allowed key have lse = -inf; +inf makes the kernel's exp(s - lse) = 0 there.
    lse3 = flatten_batch(lse.unsqueeze(-1), spec).squeeze(-1)
    lse3 = torch.where(torch.isneginf(lse3), torch.full_like(lse3, float("inf")), lse3)
    dq, dk, dv = torch.zeros_like(q4), torch.zeros_like(k4), torch.zeros_like(v4)
    plan = BlockPlan(spec, bk)
    is_causal = spec.only_top_left_causal
    for r0 in range(0, spec.q_len, bq):
        r1 = min(r0 + bq, spec.q_len)
        for c0, c1, positional, lengths in plan.key_blocks(r0, r1):
            mask, _ = _mask_block(spec, r0, r1, c0, c1, positional and not is_causal, lengths, q.dtype, q.device)
            dq_b, dk_b, dv_b = _BACKWARD(
                g4[:, :, r0:r1],
                q4[:, :, r0:r1],
                k4[:, :, c0:c1],
                v4[:, :, c0:c1],
                o4[:, :, r0:r1],
                lse3[:, :, r0:r1],
                0.0,
                is_causal,
                attn_mask=mask,
                scale=scale,
            )
            dq[:, :, r0:r1] += dq_b
            dk[:, :, c0:c1] += dk_b
            dv[:, :, c0:c1] += dv_b
    if sign != 1.0:
        dq.mul_(sign)
    shape = spec.batch_shape
    return dq.reshape(*shape, *dq.shape[-3:]), dk.reshape(*shape, *dk.shape[-3:]), dv.reshape(*shape, *dv.shape[-3:])
