"""Parity with ``F.scaled_dot_product_attention`` on every call SDPA itself can express.

Forward output and the gradients of q, k and v, for each backend of ``SDPA_PARITY_BACKENDS``, in float64
(1e-10) and float32 (1e-5). Bottom-right causal has no SDPA flag, so it is compared with SDPA given the
explicit mask ``ones(L, S).tril(S - L)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import qkv

from .helpers import SDPA_PARITY_BACKENDS, assert_close, grads, make_qkv, rand_bool_mask, rand_float_mask

Kwargs = dict[str, object]
Builder = Callable[[torch.dtype, "Case"], tuple[Kwargs, Kwargs]]


@dataclass(frozen=True)
class Case:
    """A call: shapes, then ``build(dtype, sizes) -> (qkv kwargs, SDPA kwargs)``."""

    name: str
    batch: tuple[int, ...] = (2,)
    heads: int = 4
    kv_heads: int = 4
    q_len: int = 5
    kv_len: int = 7
    head_dim: int = 8
    value_dim: int = 6
    build: Builder = field(default=lambda dtype, c: ({}, {}), repr=False)

    def score_shape(self, *which: str) -> tuple[int, ...]:
        """Mask shape from letters ``B`` (batch dims), ``H``, ``L``, ``S``; digits stand for themselves."""
        sizes = {"H": self.heads, "L": self.q_len, "S": self.kv_len}
        out: list[int] = []
        for letter in which:
            out.extend(self.batch if letter == "B" else (sizes.get(letter) or int(letter),))
        return tuple(out)


def _bool(*dims: str) -> Builder:
    def build(dtype: torch.dtype, c: Case) -> tuple[Kwargs, Kwargs]:
        m = rand_bool_mask(c.score_shape(*dims), seed=1)
        return {"mask": m}, {"attn_mask": m.reshape(-1, m.shape[-1]) if m.ndim == 1 else m}

    return build


def _float(*dims: str, mask_dtype: torch.dtype | None = None) -> Builder:
    def build(dtype: torch.dtype, c: Case) -> tuple[Kwargs, Kwargs]:
        m = rand_float_mask(c.score_shape(*dims), seed=2, dtype=mask_dtype or dtype, neg_inf=0.2)
        return {"mask": m}, {"attn_mask": m.to(dtype)}

    return build


def _bottom_right(causal: bool | str) -> Builder:
    def build(dtype: torch.dtype, c: Case) -> tuple[Kwargs, Kwargs]:
        explicit = torch.ones(c.q_len, c.kv_len, dtype=torch.bool).tril(diagonal=c.kv_len - c.q_len)
        return {"causal": causal}, {"attn_mask": explicit}

    return build


def _top_left(dtype: torch.dtype, c: Case) -> tuple[Kwargs, Kwargs]:
    return {"causal": "top_left"}, {"is_causal": True}


def _scale(dtype: torch.dtype, c: Case) -> tuple[Kwargs, Kwargs]:
    return {"scale": 0.37}, {"scale": 0.37}


def _gqa_mask_scale(dtype: torch.dtype, c: Case) -> tuple[Kwargs, Kwargs]:
    m = rand_bool_mask(c.score_shape("B", "1", "L", "S"), seed=3)
    return {"mask": m, "scale": 1.7}, {"attn_mask": m, "scale": 1.7}


CASES = [
    Case("no_mask"),
    Case("no_mask_L>S", q_len=7, kv_len=4),
    Case("bool_full", build=_bool("B", "H", "L", "S")),
    Case("bool_LS", build=_bool("L", "S")),
    Case("bool_B1LS", build=_bool("B", "1", "L", "S")),
    Case("bool_1H1S", build=_bool("1", "H", "1", "S")),
    Case("bool_S", build=_bool("S")),  # SDPA needs it as (1, S)
    Case("float_full", build=_float("B", "H", "L", "S")),
    Case("float_LS", build=_float("L", "S")),
    Case("float_B1LS", build=_float("B", "1", "L", "S")),
    Case("float_1H1S", build=_float("1", "H", "1", "S")),
    Case("float32_mask", build=_float("B", "H", "L", "S", mask_dtype=torch.float32)),
    Case("top_left_L<S", build=_top_left),
    Case("top_left_L>S", q_len=7, kv_len=4, build=_top_left),
    Case("causal_L=S", q_len=6, kv_len=6, build=lambda dtype, c: ({"causal": True}, {"is_causal": True})),
    Case("bottom_right_L<S", build=_bottom_right(True)),
    Case("bottom_right_L>S", q_len=7, kv_len=4, build=_bottom_right("bottom_right")),
    Case("gqa_2", heads=4, kv_heads=2),
    Case("mqa", heads=4, kv_heads=1, build=_top_left),
    Case("gqa_mask_scale", heads=6, kv_heads=2, build=_gqa_mask_scale),
    Case("scale", build=_scale),
    Case("3d", batch=(), build=_bool("L", "S")),
    Case("3d_gqa_causal", batch=(), heads=4, kv_heads=2, build=_top_left),
    Case("5d", batch=(2, 3), build=_float("B", "1", "L", "S")),
    Case("5d_gqa", batch=(2, 3), heads=4, kv_heads=2, build=_bool("1", "3", "1", "1", "S")),
    Case("D=Dv", head_dim=5, value_dim=5, build=_scale),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_parity_with_sdpa(case: Case, backend: str, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(
        case.batch,
        case.heads,
        case.kv_heads,
        case.q_len,
        case.kv_len,
        case.head_dim,
        case.value_dim,
        dtype=dtype,
        requires_grad=True,
    )
    ours_kw, sdpa_kw = case.build(dtype, case)
    if case.kv_heads != case.heads:
        sdpa_kw = {**sdpa_kw, "enable_gqa": True}

    expected = F.scaled_dot_product_attention(q, k, v, **sdpa_kw)
    out = qkv.attention(q, k, v, backend=backend, **ours_kw)

    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype, msg=f"forward, {case.name}, backend={backend}")
    for name, got, want in zip("qkv", grads(out, (q, k, v)), grads(expected, (q, k, v)), strict=True):
        assert_close(got, want, dtype, msg=f"d{name}, {case.name}, backend={backend}")
