"""A masked-out key or value never influences the output, even when it holds NaN or inf.

Padding beyond ``key_lengths``, key columns a mask excludes for every query, and keys outside every
query's causal reach often hold garbage (uninitialized cache slots). Backends once disagreed: NaN in
``k`` there made SDPA's output all NaN, NaN in ``v`` made math's and SDPA's NaN.
"""

from __future__ import annotations

import pytest
import torch

import qkv

from .helpers import SDPA_PARITY_BACKENDS, assert_close, grads, make_qkv, reference_attention


def _unreachable(kv_len: int) -> dict[str, tuple[dict, torch.Tensor]]:
    """Per case: the features and the ``(B, S)`` key positions no query of the call may attend."""
    cols = torch.arange(kv_len)
    lengths = torch.tensor([4, kv_len])
    padding = torch.ones(2, kv_len, dtype=torch.bool)
    padding[1, 2] = False
    float_padding = torch.zeros(2, 1, 1, kv_len, dtype=torch.float64)
    float_padding = float_padding.masked_fill(~padding[:, None, None], float("-inf"))
    return {
        "key_lengths": ({"key_lengths": lengths}, cols >= lengths[:, None]),
        "bool_key_padding": ({"mask": padding[:, None, None]}, ~padding),
        "float_key_padding": ({"mask": float_padding}, ~padding),
        "top_left_causal": ({"causal": "top_left"}, (cols >= 5).expand(2, kv_len)),
        "window": (
            {"window": (1, 0), "causal": True, "key_lengths": lengths},
            (cols < kv_len - 5 - 1) | (cols >= lengths[:, None]),
        ),
    }


CASES = _unreachable(7)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["k", "v", "kv"])
@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_garbage_in_unreachable_keys_is_ignored(case: tuple, backend: str, where: str, poison: float) -> None:
    features, unreachable = case
    q, k, v = make_qkv(batch=(2,), heads=2, kv_heads=1, q_len=5, kv_len=7, head_dim=4, value_dim=3)
    assert unreachable.any() and not unreachable.all()
    expected, _, _ = reference_attention(q, k, v, **features)
    spots = unreachable[:, None, :, None]
    k_bad = k.masked_fill(spots, poison) if "k" in where else k
    v_bad = v.masked_fill(spots, poison) if "v" in where else v
    q, k_bad, v_bad = (t.clone().requires_grad_() for t in (q, k_bad, v_bad))
    out = qkv.attention(q, k_bad, v_bad, backend=backend, **features)
    assert_close(out, expected, torch.float64)
    for name, g in zip("qkv", grads(out, (q, k_bad, v_bad)), strict=True):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
    dk, dv = grads(out, (k_bad, v_bad))
    assert not dk[spots.expand_as(dk)].any() and not dv[spots.expand_as(dv)].any()


@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
def test_garbage_that_is_attended_is_not_hidden(backend: str) -> None:
    """The rule covers masked keys only: NaN in a key some query attends still shows in the output."""
    q, k, v = make_qkv(batch=(2,), heads=2, kv_heads=1, q_len=5, kv_len=7, head_dim=4, value_dim=3)
    v = v.clone()
    v[0, :, 1] = float("nan")
    out = qkv.attention(q, k, v, backend=backend, key_lengths=torch.tensor([4, 7]))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
