"""Triton kernels of the ``triton`` backend: fused attention forward, backward (dK/dV, dQ) and Δ.

Imported only by :mod:`qkv.ops.triton_backend`, and only when a call runs on this backend: importing this
module imports Triton and decorates the kernels, for the GPU or, with ``TRITON_INTERPRET=1`` set
beforehand, for Triton's CPU interpreter.

Scores are kept in base 2: ``s₂ = log2(e)·s``, so the softmax uses ``exp2`` and ``scale·log2(e)`` is one
multiplier of ``q·kᵀ``. With soft-capping ``s = c·tanh(scale·q·kᵀ / c)``, the fold moves after the tanh:
``s₂ = (c·log2 e)·tanh((scale / c)·q·kᵀ)``. The additive terms are multiplied by ``log2(e)`` as they are
added. The log-sum-exp is written in natural-log units (qkv's convention) and converted back when the
backward pass reads it.

Blocking (every kernel): a program owns one block of rows (forward, dQ: ``BLOCK_M`` queries of one head;
dK/dV: ``BLOCK_N`` keys of one key/value head) and visits only the blocks of the other axis whose scores
can be allowed by the causal/window rules and ``key_lengths`` (the bounds are computed per program). The
visited range is cut in three: leading blocks that straddle a boundary, a middle run of blocks every rule
allows entirely, trailing straddling blocks. Only the first and last parts evaluate the positional and
length rules (``CHECK=True``); the middle part, the bulk of a long causal or windowed call, runs the plain
loop. The user's mask and ALiBi apply to every block, as they must.

The backward pass follows FlashAttention-2 and is deterministic: one program per key block accumulates dK
and dV over every query block *and*, with grouped heads, over every query head of its group, so no two
programs write the same output and there are no atomics; dQ has its own kernel, one program per query
block. Both recompute ``P = exp2(s₂ − lse₂)`` from the saved log-sum-exp.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

INTERPRETED = triton.knobs.runtime.interpret


# ---------------------------------------------------------------------------------------------------------
# Autotuning configurations
# ---------------------------------------------------------------------------------------------------------


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _capability() -> tuple[int, int]:
    if INTERPRETED or not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability()


_FALLBACK_IDS: set[int] = set()


def _fallback() -> list[triton.Config]:
    """Small tiles, shallow pipelines, appended to every GPU list: with head dim 256 or float32 inputs the
    other configurations can overflow shared memory, and the autotuner needs one that compiles. Other
    calls skip them (:func:`_prune`), which saves their compilation and timing."""
    configs = [_config(64, 32, 4, 2), _config(32, 32, 4, 1)]
    _FALLBACK_IDS.update(id(c) for c in configs)
    return configs


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: object) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    large = max(args["BLOCK_D"], args["BLOCK_DV"]) >= 256 or args["Q"].dtype == torch.float32
    kept = [c for c in configs if large or id(c) not in _FALLBACK_IDS]
    return kept or configs


def forward_configs() -> list[triton.Config]:
    """Candidates for the forward and dQ kernels: ``BLOCK_M`` query rows, ``BLOCK_N`` keys per step.

    Under the interpreter a single small configuration (no tuning; unequal blocks so the tests exercise
    the block-boundary arithmetic); on Hopper large tiles and deep pipelines (wgmma, 228 KB of shared
    memory); on Ampere and others FlashAttention-2's choices. Configurations that exceed the shared
    memory for a head dim fail to compile and are dropped by the autotuner.
    """
    if INTERPRETED:
        return [_config(32, 16, 4, 1)]
    major, _ = _capability()
    if major >= 9:
        return [
            _config(128, 128, 8, 3),
            _config(128, 64, 8, 3),
            _config(128, 64, 8, 4),
            _config(128, 128, 8, 2),
            _config(128, 64, 4, 3),
            _config(64, 64, 4, 4),
            _config(64, 128, 4, 3),
            *_fallback(),
        ]
    return [
        _config(128, 64, 4, 3),
        _config(128, 32, 4, 4),
        _config(64, 64, 4, 3),
        _config(128, 128, 8, 2),
        _config(64, 32, 4, 4),
        *_fallback(),
    ]


def dq_configs() -> list[triton.Config]:
    """Candidates for the dQ kernel (each step holds K and V blocks: smaller key blocks than forward)."""
    if INTERPRETED:
        return [_config(16, 32, 4, 1)]
    major, _ = _capability()
    if major >= 9:
        return [
            _config(128, 64, 8, 3),
            _config(128, 32, 4, 4),
            _config(128, 64, 4, 3),
            _config(64, 64, 4, 3),
            _config(128, 128, 8, 2),
            *_fallback(),
        ]
    return [
        _config(128, 32, 4, 3),
        _config(64, 64, 4, 3),
        _config(64, 32, 4, 4),
        _config(128, 64, 8, 2),
        *_fallback(),
    ]


def dkdv_configs() -> list[triton.Config]:
    """Candidates for the dK/dV kernel: ``BLOCK_N`` keys per program, ``BLOCK_M`` query rows per step."""
    if INTERPRETED:
        return [_config(16, 32, 4, 1)]
    major, _ = _capability()
    if major >= 9:
        return [
            _config(64, 128, 8, 3),
            _config(32, 128, 4, 4),
            _config(64, 128, 8, 2),
            _config(64, 64, 4, 3),
            _config(32, 64, 4, 4),
            *_fallback(),
        ]
    return [
        _config(32, 128, 4, 3),
        _config(64, 64, 4, 3),
        _config(32, 64, 4, 4),
        _config(64, 128, 8, 2),
        *_fallback(),
    ]


# Autotuning is keyed on power-of-two buckets of L and S, so a training run with varying lengths tunes a
# handful of times, not once per length.
PRUNE = {"early_config_prune": _prune}
TUNING_KEY = ["L_BUCKET", "S_BUCKET", "BLOCK_D", "BLOCK_DV", "HAS_RIGHT", "HAS_LEFT", "MASK_KIND", "SOFTCAP"]
# TRITON_PRINT_AUTOTUNING=1 prints each choice and its tuning time.


# ---------------------------------------------------------------------------------------------------------
# Score modifications (one block, in either orientation)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh to float32 accuracy (relative error < 3e-7) from exp2 alone, so that it also runs in Triton's
    interpreter (libdevice does not): ``(1 − e)/(1 + e)`` with ``e = exp(−2|x|)`` (no overflow), and
    below ``|x| = 1/8``, where ``1 − e`` cancels, the Taylor series to ``x⁷`` (next term < 2e-10)."""
    a = tl.abs(x)
    e = tl.exp2(a * (-2.0) * LOG2E)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.125, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(
    qk,
    rows,
    cols,
    L,
    n_end,
    offset,
    right,
    left,
    qk_scale,
    cap_mul,
    slope2,
    mask_base,
    stride_mask_m,
    stride_mask_n,
    CHECK: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
):
    """Base-2 scores of a block from ``qk = q·kᵀ`` and, with soft-capping, the tanh (for backward).

    ``rows`` and ``cols`` are the query and key indices broadcast to the block's orientation: ``(M, 1)``
    and ``(1, N)`` for a query-major block, ``(1, M)`` and ``(N, 1)`` for a key-major one.
    """
    if SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * cap_mul
    else:
        s = qk * qk_scale
        t = s
    if HAS_ALIBI:
        s += slope2 * tl.abs(rows + offset - cols).to(tl.float32)
    if MASK_KIND != 0:
        ptrs = mask_base + rows.to(tl.int64) * stride_mask_m + cols.to(tl.int64) * stride_mask_n
        inside = (rows < L) & (cols < n_end)
        if MASK_KIND == 1:
            keep = tl.load(ptrs, mask=inside, other=1)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            s += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32) * LOG2E
    if CHECK:
        allowed = cols < n_end
        if HAS_RIGHT:
            allowed = allowed & (cols <= rows + offset + right)
        if HAS_LEFT:
            allowed = allowed & (cols >= rows + offset - left)
        s = tl.where(allowed, s, float("-inf"))
    return s, t


@triton.jit
def _key_range(
    r0,
    L,
    n_end,
    offset,
    right,
    left,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
):
    """Key blocks of query rows ``[r0, r0 + BLOCK_M)``: ``lo ≤ a ≤ b ≤ hi``, ``[a, b)`` needing no rule.

    Every bound is a multiple of ``BLOCK_N`` except ``hi``. Divisions only see non-negative values, where
    rounding toward zero (compiled Triton) and flooring agree.
    """
    r_hi = tl.minimum(r0 + BLOCK_M, L)
    lo = 0
    hi = n_end
    if HAS_RIGHT:
        hi = tl.minimum(hi, r_hi + offset + right)
    if HAS_LEFT:
        lo = tl.maximum(r0 + offset - left, 0) // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    # Middle run: every row of the block sees every key of the key block.
    a = lo
    if HAS_LEFT:
        a = tl.maximum((tl.maximum(r_hi - 1 + offset - left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
    bound = n_end
    if HAS_RIGHT:
        bound = tl.minimum(bound, r0 + offset + right + 1)
    b = a + tl.maximum(bound - a, 0) // BLOCK_N * BLOCK_N
    a = tl.minimum(a, hi)
    b = tl.maximum(tl.minimum(b, hi), a)
    return lo, a, b, hi


@triton.jit
def _query_range(
    c0,
    L,
    n_end,
    offset,
    right,
    left,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
):
    """Query blocks seeing keys ``[c0, c0 + BLOCK_N)``: ``lo ≤ a ≤ b ≤ hi``, ``[a, b)`` needing no rule.

    Rows past ``L`` in the last block contribute nothing (their q and dO load as zeros, lse as +inf), so
    only the keys' side decides whether a block needs the rules.
    """
    c_hi = tl.minimum(c0 + BLOCK_N, n_end)
    lo = 0
    hi = L
    if HAS_RIGHT:
        lo = tl.maximum(c0 - offset - right, 0) // BLOCK_M * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(hi, c_hi - offset + left)
    hi = tl.maximum(hi, lo)
    hi = tl.where(c0 < n_end, hi, lo)
    a = lo
    if HAS_RIGHT:
        a = tl.maximum((tl.maximum(c0 + BLOCK_N - 1 - offset - right, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
    bound = hi
    if HAS_LEFT:
        bound = tl.minimum(bound, c0 - offset + left + 1)
    b = a + tl.maximum(bound - a, 0) // BLOCK_M * BLOCK_M
    # A key block cut by n_end (key_lengths or S) needs the rules everywhere.
    a = tl.where(c0 + BLOCK_N <= n_end, tl.minimum(a, hi), hi)
    b = tl.maximum(tl.minimum(b, hi), a)
    return lo, a, b, hi


# ---------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_steps(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    mask_base,
    stride_mask_m,
    stride_mask_n,
    offs_m,
    offs_d,
    offs_dv,
    start,
    stop,
    L,
    n_end,
    offset,
    right,
    left,
    qk_scale,
    cap_mul,
    slope2,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHECK: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :]
        if CHECK:
            kt = tl.load(kt_ptrs, mask=(offs_n[None, :] < n_end) & (offs_d[:, None] < D), other=0.0)
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < n_end) & (offs_dv[None, :] < DV), other=0.0)
        else:
            if EVEN_D:
                kt = tl.load(kt_ptrs)
            else:
                kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)
            if EVEN_DV:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s, _ = _scores(
            qk,
            offs_m[:, None],
            offs_n[None, :],
            L,
            n_end,
            offset,
            right,
            left,
            qk_scale,
            cap_mul,
            slope2,
            mask_base,
            stride_mask_m,
            stride_mask_n,
            CHECK,
            HAS_RIGHT,
            HAS_LEFT,
            SOFTCAP,
            HAS_ALIBI,
            MASK_KIND,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no allowed key so far keeps m = -inf; subtracting 0 instead keeps exp2 NaN-free.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=forward_configs(), key=TUNING_KEY, prune_configs_by=PRUNE)
@triton.jit
def attention_forward_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    Mask,
    Slopes,
    KeyLengths,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_mask_b,
    stride_mask_h,
    stride_mask_m,
    stride_mask_n,
    H,
    G,
    L,
    S,
    offset,
    right,
    left,
    qk_scale,
    cap_mul,
    L_BUCKET,
    S_BUCKET,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(B·H, cdiv(L, BLOCK_M))``: out ``(B, H, L, DV)`` and lse ``(B, H, L)`` of one query block."""
    pid_bh = tl.program_id(0)
    # Last query blocks first: under causal masking they are the longest, and starting them early
    # shortens the tail of the launch.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    r0 = pid_m * BLOCK_M
    offs_m = r0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    EVEN_D: tl.constexpr = D == BLOCK_D
    EVEN_DV: tl.constexpr = DV == BLOCK_DV

    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + (h // G).to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // G).to(tl.int64) * stride_vh
    mask_base = Mask + b.to(tl.int64) * stride_mask_b + h.to(tl.int64) * stride_mask_h
    n_end = S
    if HAS_KL:
        n_end = tl.load(KeyLengths + b)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = -tl.load(Slopes + pid_bh) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, a, b_mid, hi = _key_range(r0, L, n_end, offset, right, left, BLOCK_M, BLOCK_N, HAS_RIGHT, HAS_LEFT)
    acc, l_i, m_i = _fwd_steps(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        mask_base,
        stride_mask_m,
        stride_mask_n,
        offs_m,
        offs_d,
        offs_dv,
        lo,
        a,
        L,
        n_end,
        offset,
        right,
        left,
        qk_scale,
        cap_mul,
        slope2,
        D,
        DV,
        BLOCK_N,
        True,
        HAS_RIGHT,
        HAS_LEFT,
        SOFTCAP,
        HAS_ALIBI,
        MASK_KIND,
        EVEN_D,
        EVEN_DV,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_steps(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        mask_base,
        stride_mask_m,
        stride_mask_n,
        offs_m,
        offs_d,
        offs_dv,
        a,
        b_mid,
        L,
        n_end,
        offset,
        right,
        left,
        qk_scale,
        cap_mul,
        slope2,
        D,
        DV,
        BLOCK_N,
        False,
        HAS_RIGHT,
        HAS_LEFT,
        SOFTCAP,
        HAS_ALIBI,
        MASK_KIND,
        EVEN_D,
        EVEN_DV,
        DOT_PRECISION,
    )
    acc, l_i, m_i = _fwd_steps(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        mask_base,
        stride_mask_m,
        stride_mask_n,
        offs_m,
        offs_d,
        offs_dv,
        b_mid,
        hi,
        L,
        n_end,
        offset,
        right,
        left,
        qk_scale,
        cap_mul,
        slope2,
        D,
        DV,
        BLOCK_N,
        True,
        HAS_RIGHT,
        HAS_LEFT,
        SOFTCAP,
        HAS_ALIBI,
        MASK_KIND,
        EVEN_D,
        EVEN_DV,
        DOT_PRECISION,
    )

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    row_ok = offs_m < L
    o_ptrs = (
        Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + pid_bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def attention_delta_kernel(
    Out,
    DOut,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_db,
    stride_dh,
    stride_dm,
    H,
    L,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Grid ``(B·H, cdiv(L, BLOCK_M))``: ``Δ = rowsum(dO ∘ O)`` in float32, ``(B, H, L)``."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    inside = (offs_m[:, None] < L) & (offs_dv[None, :] < DV)
    o = tl.load(
        Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
        mask=inside,
        other=0.0,
    )
    do = tl.load(
        DOut + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None] * stride_dm + offs_dv[None, :],
        mask=inside,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _load_lse2(lse_ptrs, row_ok):
    """Saved lse (natural log) as base 2; ``-inf`` (no allowed key) and rows past L become ``+inf``, so
    that ``exp2(s₂ − lse₂)`` is 0 there, as the forward pass's zero output says."""
    lse = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_steps(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qm,
    stride_dom,
    mask_base,
    stride_mask_m,
    stride_mask_n,
    offs_n,
    offs_d,
    offs_dv,
    start,
    stop,
    L,
    n_end,
    offset,
    right,
    left,
    qk_scale,
    cap_mul,
    slope2,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHECK: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_m in range(start, stop, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        qt = tl.load(
            q_base + offs_m[None, :] * stride_qm + offs_d[:, None],
            mask=row_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        do = tl.load(
            do_base + offs_m[:, None] * stride_dom + offs_dv[None, :],
            mask=row_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        lse2 = _load_lse2(lse_base + offs_m, row_ok)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        qkt = tl.dot(k, qt, input_precision=DOT_PRECISION)
        st, tt = _scores(
            qkt,
            offs_m[None, :],
            offs_n[:, None],
            L,
            n_end,
            offset,
            right,
            left,
            qk_scale,
            cap_mul,
            slope2,
            mask_base,
            stride_mask_m,
            stride_mask_n,
            CHECK,
            HAS_RIGHT,
            HAS_LEFT,
            SOFTCAP,
            HAS_ALIBI,
            MASK_KIND,
        )
        pt = tl.exp2(st - lse2[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
    return dk, dv


@triton.autotune(configs=dkdv_configs(), key=TUNING_KEY, prune_configs_by=PRUNE)
@triton.jit
def attention_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DKey,
    DValue,
    Mask,
    Slopes,
    KeyLengths,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_mask_b,
    stride_mask_h,
    stride_mask_m,
    stride_mask_n,
    H,
    G,
    L,
    S,
    offset,
    right,
    left,
    qk_scale,
    cap_mul,
    scale,
    L_BUCKET,
    S_BUCKET,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(B·Hkv, cdiv(S, BLOCK_N))``: dK, dV of one key block of one key/value head, summed over the
    ``G`` query heads of its group and every query block that sees it."""
    pid_bhk = tl.program_id(0)
    hkv = H // G
    b = pid_bhk // hkv
    hk = pid_bhk % hkv
    c0 = tl.program_id(1) * BLOCK_N
    offs_n = c0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < S
    k = tl.load(
        K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
        mask=col_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    v = tl.load(
        V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
        mask=col_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    n_end = S
    if HAS_KL:
        n_end = tl.load(KeyLengths + b)
    lo, a, b_mid, hi = _query_range(c0, L, n_end, offset, right, left, BLOCK_M, BLOCK_N, HAS_RIGHT, HAS_LEFT)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DOut + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = Lse + bh.to(tl.int64) * L
        delta_base = Delta + bh.to(tl.int64) * L
        mask_base = Mask + b.to(tl.int64) * stride_mask_b + h.to(tl.int64) * stride_mask_h
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = -tl.load(Slopes + bh) * LOG2E
        dk, dv = _dkdv_steps(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qm,
            stride_dom,
            mask_base,
            stride_mask_m,
            stride_mask_n,
            offs_n,
            offs_d,
            offs_dv,
            lo,
            a,
            L,
            n_end,
            offset,
            right,
            left,
            qk_scale,
            cap_mul,
            slope2,
            D,
            DV,
            BLOCK_M,
            True,
            HAS_RIGHT,
            HAS_LEFT,
            SOFTCAP,
            HAS_ALIBI,
            MASK_KIND,
            DOT_PRECISION,
        )
        dk, dv = _dkdv_steps(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qm,
            stride_dom,
            mask_base,
            stride_mask_m,
            stride_mask_n,
            offs_n,
            offs_d,
            offs_dv,
            a,
            b_mid,
            L,
            n_end,
            offset,
            right,
            left,
            qk_scale,
            cap_mul,
            slope2,
            D,
            DV,
            BLOCK_M,
            False,
            HAS_RIGHT,
            HAS_LEFT,
            SOFTCAP,
            HAS_ALIBI,
            MASK_KIND,
            DOT_PRECISION,
        )
        dk, dv = _dkdv_steps(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qm,
            stride_dom,
            mask_base,
            stride_mask_m,
            stride_mask_n,
            offs_n,
            offs_d,
            offs_dv,
            b_mid,
            hi,
            L,
            n_end,
            offset,
            right,
            left,
            qk_scale,
            cap_mul,
            slope2,
            D,
            DV,
            BLOCK_M,
            True,
            HAS_RIGHT,
            HAS_LEFT,
            SOFTCAP,
            HAS_ALIBI,
            MASK_KIND,
            DOT_PRECISION,
        )
    dk = dk * scale
    tl.store(
        DKey
        + b.to(tl.int64) * stride_dkb
        + hk.to(tl.int64) * stride_dkh
        + offs_n[:, None] * stride_dkn
        + offs_d[None, :],
        dk.to(DKey.dtype.element_ty),
        mask=col_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DValue
        + b.to(tl.int64) * stride_dvb
        + hk.to(tl.int64) * stride_dvh
        + offs_n[:, None] * stride_dvn
        + offs_dv[None, :],
        dv.to(DValue.dtype.element_ty),
        mask=col_ok[:, None] & (offs_dv[None, :] < DV),
    )


@triton.jit
def _dq_steps(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    stride_kn,
    stride_vn,
    mask_base,
    stride_mask_m,
    stride_mask_n,
    offs_m,
    offs_d,
    offs_dv,
    start,
    stop,
    L,
    n_end,
    offset,
    right,
    left,
    qk_scale,
    cap_mul,
    slope2,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHECK: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    for start_n in range(start, stop, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_end
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
            mask=col_ok[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        vt = tl.load(
            v_base + offs_n[None, :] * stride_vn + offs_dv[:, None],
            mask=col_ok[None, :] & (offs_dv[:, None] < DV),
            other=0.0,
        )
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        s, t = _scores(
            qk,
            offs_m[:, None],
            offs_n[None, :],
            L,
            n_end,
            offset,
            right,
            left,
            qk_scale,
            cap_mul,
            slope2,
            mask_base,
            stride_mask_m,
            stride_mask_n,
            CHECK,
            HAS_RIGHT,
            HAS_LEFT,
            SOFTCAP,
            HAS_ALIBI,
            MASK_KIND,
        )
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=dq_configs(), key=TUNING_KEY, prune_configs_by=PRUNE)
@triton.jit
def attention_dq_kernel(
    Q,
    K,
    V,
    DOut,
    Lse,
    Delta,
    DQ,
    Mask,
    Slopes,
    KeyLengths,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_mask_b,
    stride_mask_h,
    stride_mask_m,
    stride_mask_n,
    H,
    G,
    L,
    S,
    offset,
    right,
    left,
    qk_scale,
    cap_mul,
    scale,
    L_BUCKET,
    S_BUCKET,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_KL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Grid ``(B·H, cdiv(L, BLOCK_M))``: dQ of one query block, over the key blocks it sees."""
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    r0 = pid_m * BLOCK_M
    offs_m = r0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D),
        other=0.0,
    )
    do = tl.load(
        DOut
        + b.to(tl.int64) * stride_dob
        + h.to(tl.int64) * stride_doh
        + offs_m[:, None] * stride_dom
        + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv[None, :] < DV),
        other=0.0,
    )
    lse2 = _load_lse2(Lse + pid_bh.to(tl.int64) * L + offs_m, row_ok)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + (h // G).to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + (h // G).to(tl.int64) * stride_vh
    mask_base = Mask + b.to(tl.int64) * stride_mask_b + h.to(tl.int64) * stride_mask_h
    n_end = S
    if HAS_KL:
        n_end = tl.load(KeyLengths + b)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = -tl.load(Slopes + pid_bh) * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, a, b_mid, hi = _key_range(r0, L, n_end, offset, right, left, BLOCK_M, BLOCK_N, HAS_RIGHT, HAS_LEFT)
    dq = _dq_steps(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        mask_base,
        stride_mask_m,
        stride_mask_n,
        offs_m,
        offs_d,
        offs_dv,
        lo,
        a,
        L,
        n_end,
        offset,
        right,
        left,
        qk_scale,
        cap_mul,
        slope2,
        D,
        DV,
        BLOCK_N,
        True,
        HAS_RIGHT,
        HAS_LEFT,
        SOFTCAP,
        HAS_ALIBI,
        MASK_KIND,
        DOT_PRECISION,
    )
    dq = _dq_steps(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        mask_base,
        stride_mask_m,
        stride_mask_n,
        offs_m,
        offs_d,
        offs_dv,
        a,
        b_mid,
        L,
        n_end,
        offset,
        right,
        left,
        qk_scale,
        cap_mul,
        slope2,
        D,
        DV,
        BLOCK_N,
        False,
        HAS_RIGHT,
        HAS_LEFT,
        SOFTCAP,
        HAS_ALIBI,
        MASK_KIND,
        DOT_PRECISION,
    )
    dq = _dq_steps(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        stride_kn,
        stride_vn,
        mask_base,
        stride_mask_m,
        stride_mask_n,
        offs_m,
        offs_d,
        offs_dv,
        b_mid,
        hi,
        L,
        n_end,
        offset,
        right,
        left,
        qk_scale,
        cap_mul,
        slope2,
        D,
        DV,
        BLOCK_N,
        True,
        HAS_RIGHT,
        HAS_LEFT,
        SOFTCAP,
        HAS_ALIBI,
        MASK_KIND,
        DOT_PRECISION,
    )
    dq = dq * scale
    tl.store(
        DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < D),
    )
