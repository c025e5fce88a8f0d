"""float16, bfloat16 and float32 against the float64 reference, and the dtypes of what comes back.

The reference is computed in float64 on the same (rounded) inputs, so the tolerances measure the
backend's arithmetic only. For unit-scale inputs (q, k, v ~ N(0, 1), D = 16, L = 32, S = 48):

* float32: atol = rtol = 1e-5 (observed errors ~1e-6);
* float16: forward atol = rtol = 2e-3, gradients 4e-3 (observed ≤ 1e-3 and ≤ 2e-3: one fp16 ulp at 1-4);
* bfloat16: forward atol 2e-2 rtol 1e-2, gradients atol 3e-2 rtol 2e-2 (observed ≤ 6e-3 and ≤ 1.6e-2).

Half inputs are computed in float32 internally, so errors are dominated by the final rounding.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import qkv

from .helpers import (
    EVERY_CALL_BACKENDS,
    SDPA_PARITY_BACKENDS,
    make_qkv,
    rand_bool_mask,
    rand_float_mask,
    rand_slopes,
    reference_attention,
)

LOW_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# dtype: ((forward atol, rtol), (gradient atol, rtol))
TOLERANCES = {
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)),
    torch.float16: ((2e-3, 2e-3), (4e-3, 4e-3)),
    torch.bfloat16: ((2e-2, 1e-2), (3e-2, 2e-2)),
}
SIZES = {"batch": (2,), "heads": 4, "kv_heads": 2, "q_len": 32, "kv_len": 48, "head_dim": 16, "value_dim": 16}


def _features(name: str, dtype: torch.dtype) -> dict[str, Any]:
    score_shape = (2, 4, 32, 48)
    return {
        "plain": {},
        "causal_key_lengths": {"causal": True, "key_lengths": torch.tensor([20, 48])},
        "alibi_mask": {"alibi_slopes": rand_slopes((4,), 1), "mask": rand_float_mask(score_shape, 2).to(dtype)},
        "float32_mask_top_left": {
            "mask": rand_float_mask((32, 48), 3, torch.float32, neg_inf=0.1),
            "causal": "top_left",
        },
        "window_bool_mask": {"window": (8, 2), "mask": rand_bool_mask(score_shape, 4, 0.8)},
        "softcap": {"softcap": 1.0, "causal": True},
    }[name]


FEATURES = ["plain", "causal_key_lengths", "alibi_mask", "float32_mask_top_left", "window_bool_mask", "softcap"]
BACKEND_FEATURES = [(b, f) for b in EVERY_CALL_BACKENDS for f in FEATURES] + [
    ("torch", f) for f in FEATURES if f != "softcap"
]


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize(("backend", "features"), BACKEND_FEATURES)
def test_low_precision_against_float64(backend: str, features: str, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(**SIZES, dtype=dtype, requires_grad=True)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw = _features(features, dtype)
    out = qkv.attention(q, k, v, backend=backend, **kw)
    ref_out, _, _ = reference_attention(q64, k64, v64, **kw)
    (fwd_atol, fwd_rtol), (bwd_atol, bwd_rtol) = TOLERANCES[dtype]

    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, atol=fwd_atol, rtol=fwd_rtol)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(out, (q, k, v), upstream)
    want = torch.autograd.grad(ref_out, (q64, k64, v64), upstream.double())
    for name, g, w in zip("qkv", got, want, strict=True):
        assert g.dtype == dtype, f"d{name}"
        torch.testing.assert_close(
            g.double(), w, atol=bwd_atol, rtol=bwd_rtol, msg=lambda m, name=name: f"d{name}\n{m}"
        )


@pytest.mark.parametrize("dtype", [*LOW_DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_returned_dtypes(backend: str, dtype: torch.dtype) -> None:
    """out and weights in q's dtype; lse float32, float64 for float64 inputs (it is compared with scores)."""
    q, k, v = make_qkv(**SIZES, dtype=dtype)
    out, weights, lse = qkv.attention(q, k, v, causal=True, return_weights=True, return_lse=True, backend=backend)
    assert out.dtype == dtype and weights.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (2, 4, 32, 16) and weights.shape == (2, 4, 32, 48) and lse.shape == (2, 4, 32)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
def test_output_dtype_of_every_backend(backend: str, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(**SIZES, dtype=dtype)
    assert qkv.attention(q, k, v, backend=backend).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
def test_half_inputs_accept_float32_and_own_dtype_masks(backend: str, dtype: torch.dtype) -> None:
    q, k, v = make_qkv(**SIZES, dtype=dtype)
    mask32 = rand_float_mask((32, 48), 4, torch.float32)
    a = qkv.attention(q, k, v, mask=mask32, backend=backend)
    b = qkv.attention(q, k, v, mask=mask32.to(dtype), backend=backend)
    # mask values are multiples of 1/64, exact in both dtypes: the two calls are the same call
    torch.testing.assert_close(a, b, atol=0, rtol=0)
