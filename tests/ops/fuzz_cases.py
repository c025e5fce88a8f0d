"""Random ``qkv.attention`` calls for the differential fuzz (``test_fuzz.py``), one per integer seed.

:func:`draw_case` turns a seed into a :class:`FuzzCase` (shapes, dtype, memory layouts, features, what
to return and differentiate) with a NumPy generator; :func:`build_inputs` turns the case into tensors
with a torch generator seeded the same way. Both are pure functions of the seed, so a failing case is
rebuilt from its id alone::

    >>> draw_case(17)
    FuzzCase(seed=17, dtype=torch.float64, batch=(3,), heads=2, kv_heads=2, q_len=14, kv_len=6, ...)

The draws favour the corners where backends disagree: ``L != S``, ``L = 1``, ``S = 1``, odd ``D``,
``Dv != D``, grouped heads, rows with no allowed key, both causal alignments, negative and tiny scales,
and inputs that are not contiguous (transposed, head/sequence-permuted, sliced with a step, expanded).
Values are finite (no NaN or inf in q, k, v).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .helpers import make_gen

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DTYPE_WEIGHTS = (0.35, 0.35, 0.15, 0.15)
# Memory layouts of q, k and v; every one holds the same logical (..., H, L, D) tensor.
LAYOUTS = ("contiguous", "transposed", "permuted", "strided", "expanded")
CAUSAL: tuple[bool | str, ...] = (False, True, "bottom_right", "top_left")
# Where a mask broadcasts from, against (..., H, L, S).
MASK_SHAPES = ("LS", "full", "batch_LS", "padding", "rows", "heads_S")
# Elements a strided layout skips hold this value: finite (inputs are NaN-free) and far from unit-normal
# values, so a backend that reads them gives visibly wrong results.
SKIPPED_VALUE = 1000.0


@dataclass(frozen=True)
class FuzzCase:
    """One random call: ``q (*batch, heads, q_len, head_dim)``, ``k, v (*batch, kv_heads, kv_len, ·)``.

    Feature fields hold what is passed to ``qkv.attention`` (``None`` = not passed); ``mask`` is
    ``"none"``, ``"bool"`` or ``"float"``, with ``mask_shape`` from :data:`MASK_SHAPES`, ``mask_dtype``
    the float mask's dtype and ``mask_requires_grad`` whether its gradient is compared too (likewise
    ``slopes_requires_grad``); ``alibi`` is ``"none"``, ``"H"`` or ``"batch_H"``.
    """

    seed: int
    dtype: torch.dtype
    batch: tuple[int, ...]
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    layouts: tuple[str, str, str]
    mask: str
    mask_shape: str
    mask_dtype: torch.dtype | None
    mask_requires_grad: bool
    key_lengths: bool
    causal: bool | str
    window: tuple[int, int] | None
    scale: float | None
    alibi: str
    slopes_requires_grad: bool
    softcap: float | None
    dropout: float
    return_weights: bool
    return_lse: bool
    grads: bool
    batched_grads: bool


@dataclass(frozen=True)
class FuzzInputs:
    """The tensors of a case: ``q, k, v`` in their layouts (views of leaf tensors that require grad when
    the case compares gradients) and the keyword arguments of ``qkv.attention`` (the features only)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict[str, Any]


def _length(rng: np.random.Generator, medium: bool) -> int:
    """A sequence length: 1 often (a decoder step, a one-key cache), else small; 257-300 for ``medium``
    cases, so that the tiled backend's online kernel splits the queries into more than one block."""
    if medium:
        return int(rng.integers(257, 301))
    if rng.random() < 0.15:
        return 1
    return int(rng.integers(1, 65))


def _scale(rng: np.random.Generator) -> float | None:
    kind = rng.choice(["default", "positive", "negative", "tiny"], p=[0.3, 0.25, 0.25, 0.2])
    if kind == "default":
        return None
    if kind == "tiny":
        return float(rng.choice([0.0, 1e-12, -1e-9, 1e-6]))
    magnitude = float(rng.uniform(0.05, 2.0))
    return magnitude if kind == "positive" else -magnitude


def _layouts(rng: np.random.Generator) -> tuple[str, str, str]:
    picks = rng.choice(LAYOUTS, size=3, p=[0.4, 0.15, 0.15, 0.15, 0.15])
    return str(picks[0]), str(picks[1]), str(picks[2])


def draw_case(seed: int) -> FuzzCase:
    """The random call of ``seed`` (the same on every machine and run).

    About a third of the cases are *plain*: each optional feature is five times rarer there, so that
    calls reaching the backends' fast paths (plain causal, no mask, out alone) are common too.
    """
    rng = np.random.default_rng(seed)
    plain = rng.random() < 0.35

    def chance(p: float) -> bool:
        return bool(rng.random() < (p / 5 if plain else p))

    dtype = DTYPES[int(rng.choice(len(DTYPES), p=DTYPE_WEIGHTS))]
    exact = dtype in (torch.float64, torch.float32)
    batch = tuple(int(n) for n in rng.integers(1, 4, size=int(rng.choice([0, 1, 2], p=[0.2, 0.6, 0.2]))))
    kv_heads = int(rng.integers(1, 4))
    heads = kv_heads * int(rng.integers(1, 4))
    medium = rng.random() < 0.08
    if medium:  # few heads, so that the reference's (i, j) loops and the backends stay fast
        batch, heads, kv_heads = (1,), int(rng.integers(1, 3)), 1
    q_len, kv_len = _length(rng, medium), (_length(rng, False) if not medium else int(rng.integers(1, 201)))
    head_dim = int(rng.integers(1, 34))
    value_dim = head_dim if rng.random() < 0.5 else int(rng.integers(1, 34))

    mask = str(rng.choice(["bool", "float"])) if chance(0.6) else "none"
    mask_dtype = None
    if mask == "float":
        mask_dtype = dtype if rng.random() < 0.5 else torch.float32
    alibi = str(rng.choice(["H", "batch_H"])) if chance(0.3) else "none"
    window = (int(rng.integers(-1, 9)), int(rng.integers(-1, 9))) if chance(0.35) else None
    grads = exact and rng.random() < 0.7
    # Gradients of a float mask and of the slopes only where they are exact enough to compare: float64.
    mask_requires_grad = grads and mask == "float" and mask_dtype == torch.float64 and rng.random() < 0.6
    slopes_requires_grad = grads and alibi != "none" and dtype == torch.float64 and rng.random() < 0.6
    return FuzzCase(
        seed=seed,
        dtype=dtype,
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        value_dim=value_dim,
        layouts=_layouts(rng),
        mask=mask,
        mask_shape=str(rng.choice(MASK_SHAPES)),
        mask_dtype=mask_dtype,
        mask_requires_grad=mask_requires_grad,
        key_lengths=chance(0.3),
        causal=CAUSAL[int(rng.choice(len(CAUSAL), p=[0.4, 0.2, 0.1, 0.3]))],
        window=window,
        scale=_scale(rng),
        alibi=alibi,
        slopes_requires_grad=slopes_requires_grad,
        softcap=float(rng.uniform(0.5, 5.0)) if chance(0.2) else None,
        dropout=float(rng.choice([0.1, 0.3, 0.6])) if chance(0.15) else 0.0,
        return_weights=chance(0.35),
        return_lse=chance(0.35),
        grads=grads,
        batched_grads=grads and bool(rng.random() < 0.2),
    )


def _in_layout(x: torch.Tensor, layout: str, requires_grad: bool) -> torch.Tensor:
    """``x (..., H, L, D)`` stored in ``layout``; with ``requires_grad`` a view of a leaf that does.

    ``transposed``: a ``(..., H, D, L)`` tensor seen through ``.transpose(-1, -2)``; ``permuted``: the
    ``(..., L, H, D)`` layout of a projection's output seen as ``(..., H, L, D)``; ``strided``: every
    other row and column of a larger buffer; ``expanded``: the first head (or batch element) broadcast
    with stride 0, so its values repeat.
    """
    if layout == "transposed":
        base = x.transpose(-1, -2).contiguous()
        return base.requires_grad_(requires_grad).transpose(-1, -2)
    if layout == "permuted":
        base = x.transpose(-3, -2).contiguous()
        return base.requires_grad_(requires_grad).transpose(-3, -2)
    if layout == "strided":
        base = x.new_full((*x.shape[:-2], 2 * x.shape[-2], 2 * x.shape[-1]), SKIPPED_VALUE)
        base[..., ::2, ::2] = x
        return base.requires_grad_(requires_grad)[..., ::2, ::2]
    if layout == "expanded":
        base = x.narrow(0, 0, 1).contiguous()
        return base.requires_grad_(requires_grad).expand_as(x)
    return x.clone().requires_grad_(requires_grad)


def _mask_shape(case: FuzzCase) -> tuple[int, ...]:
    b, h, lq, s = case.batch, case.heads, case.q_len, case.kv_len
    return {
        "LS": (lq, s),
        "full": (*b, h, lq, s),
        "batch_LS": (*b, 1, lq, s),
        "padding": (*b, 1, 1, s),
        "rows": (h, lq, 1),
        "heads_S": (h, 1, s),
    }[case.mask_shape]


def _mask(case: FuzzCase, g: torch.Generator) -> torch.Tensor:
    """A bool (``True`` = may attend) or float (``-inf`` = may not) mask in which, where it can, one
    query row (or, for a padding mask, one batch element's keys) allows no key at all."""
    shape = _mask_shape(case)
    p_allowed = 0.4 + 0.55 * float(torch.rand((), generator=g))
    allowed = torch.rand(shape, generator=g) < p_allowed
    if len(shape) >= 2 and shape[-2] > 1 and shape[-1] > 1:
        allowed[..., int(torch.randint(0, shape[-2], (), generator=g)), :] = False
    elif case.mask_shape == "padding" and case.batch:
        allowed.view(-1, shape[-1])[0] = False
    if case.mask == "bool":
        return allowed
    # Multiples of 1/64: exact in every dtype that holds them, so the sum with ALiBi has no rounding.
    values = (torch.randn(shape, generator=g, dtype=torch.float64) * 64).round() / 64
    values = values.masked_fill(~allowed, float("-inf"))
    assert case.mask_dtype is not None
    return values.to(case.mask_dtype).requires_grad_(case.mask_requires_grad)


def build_inputs(case: FuzzCase) -> FuzzInputs:
    """The tensors of ``case``: unit-normal q, k, v in their layouts, masks, lengths and slopes."""
    g = make_gen(case.seed)
    shapes = (
        (*case.batch, case.heads, case.q_len, case.head_dim),
        (*case.batch, case.kv_heads, case.kv_len, case.head_dim),
        (*case.batch, case.kv_heads, case.kv_len, case.value_dim),
    )
    q, k, v = (
        _in_layout(torch.randn(shape, generator=g, dtype=torch.float64).to(case.dtype), layout, case.grads)
        for shape, layout in zip(shapes, case.layouts, strict=True)
    )
    kwargs: dict[str, Any] = {}
    if case.mask != "none":
        kwargs["mask"] = _mask(case, g)
    if case.key_lengths:
        kwargs["key_lengths"] = torch.randint(0, case.kv_len + 1, case.batch, generator=g)
    if case.causal is not False:
        kwargs["causal"] = case.causal
    if case.window is not None:
        kwargs["window"] = case.window
    if case.scale is not None:
        kwargs["scale"] = case.scale
    if case.alibi != "none":
        slopes_shape = (case.heads,) if case.alibi == "H" else (*case.batch, case.heads)
        slopes = torch.randint(1, 65, slopes_shape, generator=g).to(torch.float64) / 64
        kwargs["alibi_slopes"] = slopes.requires_grad_(case.slopes_requires_grad)
    if case.softcap is not None:
        kwargs["softcap"] = case.softcap
    return FuzzInputs(q, k, v, kwargs)
