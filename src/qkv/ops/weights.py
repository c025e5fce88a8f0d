"""Attention weights on demand: any slice of the ``(..., H, L, S)`` matrix from q, k and the log-sum-exp.

The tiled backend never stores the weights; with the ``lse`` it returns (``return_lse=True``), the
weights of any query rows and heads are ``exp(scores - lse)``, recomputed key block by key block.
For long inputs this shows what some heads attend to without the ``L×S`` matrix of every head.
"""

from __future__ import annotations

import torch

from qkv.ops.spec import build_spec
from qkv.ops.tiled_online import recompute_weights


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    rows: tuple[int, int] | None = None,
    heads: list[int] | slice | None = None,
    mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Recompute attention weights (before dropout) for some query rows and heads.

    Args:
        q: ``(..., H, L, D)`` and k: ``(..., Hkv, S, D)``, as passed to :func:`qkv.attention`.
        lse: ``(..., H, L)`` the log-sum-exp returned by ``attention(..., return_lse=True)`` for the same
            call (same masks and options, which must be passed again here).
        rows: ``(start, stop)`` query rows; default all.
        heads: indices or a slice of the ``H`` query heads to return; default all.

    Returns:
        ``(..., h, r, S)`` weights in q's dtype; only the selected heads are kept, one key block at a time.
    """
    spec = build_spec(
        q,
        k,
        k,
        mask=mask,
        key_lengths=key_lengths,
        causal=causal,
        window=window,
        scale=scale,
        alibi_slopes=alibi_slopes,
        softcap=softcap,
    )
    expected = (*spec.batch_shape, spec.heads, spec.q_len)
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != expected:
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must have shape (..., H, L) = {expected}; got {got}")
    r0, r1 = rows if rows is not None else (0, spec.q_len)
    if not (isinstance(r0, int) and isinstance(r1, int) and 0 <= r0 <= r1 <= spec.q_len):
        raise ValueError(f"rows must be (start, stop) with 0 <= start <= stop <= L={spec.q_len}; got {rows!r}")
    if heads is None:
        selected = None
    else:
        selected = list(range(spec.heads))[heads] if isinstance(heads, slice) else list(heads)
        bad = [h for h in selected if not (isinstance(h, int) and 0 <= h < spec.heads)]
        if bad or not selected:
            raise ValueError(
                f"heads must select some of the H={spec.heads} query heads (0..{spec.heads - 1}); got {heads!r}"
            )
    with torch.no_grad():
        return recompute_weights(q, k, lse, spec, None, rows=(r0, r1), heads=selected)
