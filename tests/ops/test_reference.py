"""Backends against the independent float64 reference of ``helpers.py``, feature by feature.

Also: the oracle itself against hand-written matrices, the return conventions (weights, lse, tuple
order), fully-masked rows, empty dimensions, and the torch backend against math on every call it takes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import qkv

from .helpers import (
    DIFFERENTIABLE_EXTRAS_BACKENDS,
    EVERY_CALL_BACKENDS,
    REFERENCE_CASES,
    SDPA_CASES,
    SDPA_PARITY_BACKENDS,
    Call,
    assert_close,
    expand_kv,
    grads,
    make_qkv,
    rand_bool_mask,
    reference_attention,
    reference_distance,
    reference_positional,
    reference_scores,
)

CASE_IDS = [c.name for c in REFERENCE_CASES]


# --- the oracle ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q_len", "kv_len", "causal", "window", "expected"),
    [
        (2, 4, True, None, [[1, 1, 1, 0], [1, 1, 1, 1]]),
        (2, 4, "top_left", None, [[1, 0, 0, 0], [1, 1, 0, 0]]),
        (3, 2, True, None, [[0, 0], [1, 0], [1, 1]]),
        (3, 2, "top_left", None, [[1, 0], [1, 1], [1, 1]]),
        (3, 3, False, (1, 0), [[1, 0, 0], [1, 1, 0], [0, 1, 1]]),
        (2, 4, False, (0, 1), [[0, 0, 1, 1], [0, 0, 0, 1]]),
        (2, 4, False, (-1, 0), [[1, 1, 1, 0], [1, 1, 1, 1]]),
        (2, 4, True, (1, 5), [[0, 1, 1, 0], [0, 0, 1, 1]]),
        (2, 4, "top_left", (-1, 1), [[1, 0, 0, 0], [1, 1, 0, 0]]),
        (2, 4, False, (1, -1), [[0, 1, 1, 1], [0, 0, 1, 1]]),
    ],
)
def test_oracle_positional_rules(q_len, kv_len, causal, window, expected) -> None:
    """The documented rule: query i sees j with i + offset - left <= j <= i + offset + right."""
    got = reference_positional(q_len, kv_len, causal, window)
    assert got.tolist() == [[bool(x) for x in row] for row in expected]


def test_oracle_alibi_distance() -> None:
    assert reference_distance(2, 3).tolist() == [[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]
    assert reference_distance(2, 3, "top_left").tolist() == [[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]]


def test_oracle_matches_sdpa_on_plain_gqa_call() -> None:
    q, k, v = make_qkv(heads=4, kv_heads=2)
    out, weights, _ = reference_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1], dtype=torch.float64))


# --- every feature against the reference ----------------------------------------------------------------


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=CASE_IDS)
def test_matches_reference(case: Call, backend: str) -> None:
    q, k, v = case.tensors(requires_grad=True)
    kw = case.kwargs()
    out, weights, lse = qkv.attention(q, k, v, return_weights=True, return_lse=True, backend=backend, **kw)
    ref_out, ref_weights, ref_lse = reference_attention(q, k, v, **kw)

    assert_close(out, ref_out, torch.float64, msg=f"out of {case.name}")
    assert_close(weights, ref_weights, torch.float64, msg=f"weights of {case.name}")
    assert lse.dtype == torch.float64
    assert_close(lse, ref_lse, torch.float64, msg=f"lse of {case.name}")
    for name, got, want in zip("qkv", grads(out, (q, k, v)), grads(ref_out, (q, k, v)), strict=True):
        assert_close(got, want, torch.float64, msg=f"d{name} of {case.name}")


@pytest.mark.parametrize("backend", DIFFERENTIABLE_EXTRAS_BACKENDS)
@pytest.mark.parametrize("case", REFERENCE_CASES[::5], ids=CASE_IDS[::5])
def test_weights_are_differentiable(case: Call, backend: str) -> None:
    """The returned weights are part of the graph (e.g. for a loss on attention maps)."""
    q, k, v = case.tensors(requires_grad=True)
    kw = case.kwargs()
    _, weights = qkv.attention(q, k, v, return_weights=True, backend=backend, **kw)
    _, ref_weights, _ = reference_attention(q, k, v, **kw)
    for name, got, want in zip("qkv", grads(weights, (q, k, v)), grads(ref_weights, (q, k, v)), strict=True):
        assert_close(got, want, torch.float64, msg=f"d{name} through the weights of {case.name}")


@pytest.mark.parametrize("case", SDPA_CASES, ids=[c.name for c in SDPA_CASES])
def test_torch_backend_equals_math(case: Call) -> None:
    """Key lengths, windows, ALiBi and bottom-right causal become one dense mask for SDPA."""
    q, k, v = case.tensors(requires_grad=True)
    kw = case.kwargs()
    expected = qkv.attention(q, k, v, backend="math", **kw)
    out = qkv.attention(q, k, v, backend="torch", **kw)
    assert_close(out, expected, torch.float64, msg=case.name)
    for name, got, want in zip("qkv", grads(out, (q, k, v)), grads(expected, (q, k, v)), strict=True):
        assert_close(got, want, torch.float64, msg=f"d{name} of {case.name}")


def test_sdpa_cases_cover_the_dense_mask_conversions() -> None:
    names = " ".join(c.name for c in SDPA_CASES)
    for feature in ("key_lengths", "window", "alibi", "causal_L>S", "everything"):
        assert feature in names


LONG_FEATURES = {
    "plain": {},
    "bottom_right_key_lengths": {"causal": True, "key_lengths": torch.tensor([1100, 3])},
    "window_alibi": {"window": (100, 5), "alibi_slopes": torch.tensor([1 / 64, 1 / 8])},
    "top_left_softcap_mask": {"causal": "top_left", "softcap": 3.0, "mask": rand_bool_mask((1100,), 15, 0.9)},
}


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
@pytest.mark.parametrize("features", LONG_FEATURES.values(), ids=LONG_FEATURES.keys())
def test_long_keys_match_reference(features: dict, backend: str) -> None:
    """S > 1024 and L of a few dozen: enough for a blocked backend to visit, skip and mask several blocks."""
    q, k, v = make_qkv(
        batch=(2,), heads=2, kv_heads=1, q_len=40, kv_len=1100, head_dim=8, value_dim=4, requires_grad=True
    )
    out, weights, lse = qkv.attention(q, k, v, return_weights=True, return_lse=True, backend=backend, **features)
    ref_out, ref_weights, ref_lse = reference_attention(q, k, v, **features)
    assert_close(out, ref_out, torch.float64, msg="out")
    assert_close(weights, ref_weights, torch.float64, msg="weights")
    assert_close(lse, ref_lse, torch.float64, msg="lse")
    for name, got, want in zip("qkv", grads(out, (q, k, v)), grads(ref_out, (q, k, v)), strict=True):
        assert_close(got, want, torch.float64, msg=f"d{name}")


@pytest.mark.parametrize("backend", DIFFERENTIABLE_EXTRAS_BACKENDS)
def test_long_weights_and_lse_are_differentiable(backend: str) -> None:
    """Also at sizes where auto prefers a blocked backend: returned weights and lse stay in the graph."""
    q, k, v = make_qkv(
        batch=(1,), heads=2, kv_heads=1, q_len=40, kv_len=1100, head_dim=8, value_dim=4, requires_grad=True
    )
    features = LONG_FEATURES["bottom_right_key_lengths"] | {"key_lengths": torch.tensor([900])}
    _, weights, lse = qkv.attention(q, k, v, return_weights=True, return_lse=True, backend=backend, **features)
    _, ref_weights, ref_lse = reference_attention(q, k, v, **features)
    assert weights.requires_grad and lse.requires_grad
    for name, got, want in zip("qk", grads(weights, (q, k)), grads(ref_weights, (q, k)), strict=True):
        assert_close(got, want, torch.float64, msg=f"d{name} through the weights")
    finite = torch.isfinite(ref_lse)
    for name, got, want in zip("qk", grads(lse[finite], (q, k)), grads(ref_lse[finite], (q, k)), strict=True):
        assert_close(got, want, torch.float64, msg=f"d{name} through the lse")


# --- semantics checked by hand, independent of the oracle ------------------------------------------------


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_softcap_applies_before_float_mask(backend: str) -> None:
    """One query, two keys with raw scores 4 and 0: capped at c=1 first, then +3 on key 1."""
    q = torch.tensor([[[[2.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[2.0, 0.0], [0.0, 5.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0], [0.0]]]], dtype=torch.float64)
    mask = torch.tensor([0.0, 3.0], dtype=torch.float64)
    _, weights = qkv.attention(q, k, v, scale=1.0, softcap=1.0, mask=mask, return_weights=True, backend=backend)
    s0, s1 = math.tanh(4.0), math.tanh(0.0) + 3.0
    expected = [math.exp(s0) / (math.exp(s0) + math.exp(s1)), math.exp(s1) / (math.exp(s0) + math.exp(s1))]
    torch.testing.assert_close(weights.flatten(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_alibi_bias_by_hand(backend: str) -> None:
    """q = 0: scores are the bias alone, -slope·|i + S - L - j|."""
    q = torch.zeros(1, 1, 2, 4, dtype=torch.float64)
    k = torch.ones(1, 1, 3, 4, dtype=torch.float64)
    v = torch.eye(3, dtype=torch.float64).reshape(1, 1, 3, 3)
    (
        _,
        lse,
    ) = qkv.attention(q, k, v, alibi_slopes=torch.tensor([0.5]), return_lse=True, backend=backend)
    rows = [[-0.5, 0.0, -0.5], [-1.0, -0.5, 0.0]]
    expected = torch.tensor([math.log(sum(math.exp(x) for x in row)) for row in rows], dtype=torch.float64)
    torch.testing.assert_close(lse.flatten(), expected)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_bottom_right_causal_with_more_queries_than_keys_gives_zero_rows(backend: str) -> None:
    q, k, v = make_qkv(q_len=7, kv_len=4, requires_grad=True)
    out, weights, lse = qkv.attention(q, k, v, causal=True, return_weights=True, return_lse=True, backend=backend)
    assert torch.equal(out[..., :3, :], torch.zeros_like(out[..., :3, :]))
    assert torch.equal(weights[..., :3, :], torch.zeros_like(weights[..., :3, :]))
    assert torch.isneginf(lse[..., :3]).all() and torch.isfinite(lse[..., 3:]).all()
    assert (out[..., 3:, :].abs().sum(-1) > 0).all()
    dq, dk, dv = grads(out, (q, k, v))
    assert torch.equal(dq[..., :3, :], torch.zeros_like(dq[..., :3, :]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


# --- return conventions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=CASE_IDS)
def test_weights_and_lse_conventions(case: Call, backend: str) -> None:
    q, k, v = case.tensors()
    kw = case.kwargs()
    out, weights, lse = qkv.attention(q, k, v, return_weights=True, return_lse=True, backend=backend, **kw)
    masked_scores = reference_scores(q, k, **kw)
    empty = ~torch.isfinite(masked_scores).any(-1)

    sums = weights.sum(-1)
    torch.testing.assert_close(sums[~empty], torch.ones_like(sums[~empty]), atol=1e-12, rtol=0)
    assert torch.equal(weights[empty], torch.zeros_like(weights[empty]))
    assert (weights[torch.isneginf(masked_scores)] == 0).all(), "a masked key got weight"
    torch.testing.assert_close(out, weights @ expand_kv(v, case.heads), atol=1e-12, rtol=1e-12)
    assert torch.isneginf(lse[empty]).all()
    assert_close(lse, torch.logsumexp(masked_scores, dim=-1), torch.float64)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_tuple_order_out_weights_lse(backend: str) -> None:
    q, k, v = make_qkv(q_len=3, kv_len=9, value_dim=2)
    kw = {"causal": True, "backend": backend}
    plain = qkv.attention(q, k, v, **kw)
    assert isinstance(plain, torch.Tensor)

    both = qkv.attention(q, k, v, return_weights=True, return_lse=True, **kw)
    only_w = qkv.attention(q, k, v, return_weights=True, **kw)
    only_lse = qkv.attention(q, k, v, return_lse=True, **kw)
    assert isinstance(both, tuple) and len(both) == 3
    assert isinstance(only_w, tuple) and len(only_w) == 2
    assert isinstance(only_lse, tuple) and len(only_lse) == 2
    out, weights, lse = both
    assert out.shape == (2, 4, 3, 2) and weights.shape == (2, 4, 3, 9) and lse.shape == (2, 4, 3)
    assert lse.dtype == torch.float64 and weights.dtype == torch.float64  # lse: float64 for float64 inputs
    for got in (out, only_w[0], only_lse[0]):
        assert torch.equal(got, plain)
    assert torch.equal(only_w[1], weights)
    assert torch.equal(only_lse[1], lse)


# --- empty dimensions ------------------------------------------------------------------------------------

EMPTY_SHAPES = {
    "S=0": {"kv_len": 0},
    "L=0": {"q_len": 0},
    "H=0": {"heads": 0, "kv_heads": 1},
    "B=0": {"batch": (0,)},
    "Dv=0": {"value_dim": 0},
}


@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
@pytest.mark.parametrize("dims", EMPTY_SHAPES.values(), ids=EMPTY_SHAPES.keys())
def test_empty_dimensions(dims: dict, backend: str) -> None:
    """An empty KV cache (S = 0), no queries, no heads: well-defined shapes, zeros, and a backward pass."""
    sizes = {"batch": (2,), "heads": 2, "kv_heads": 1, "q_len": 3, "kv_len": 4, "head_dim": 4, "value_dim": 3}
    sizes.update(dims)
    q, k, v = make_qkv(**sizes, requires_grad=True)
    out = qkv.attention(q, k, v, causal=True, backend=backend)
    ref_out, _, _ = reference_attention(q, k, v, causal=True)
    assert out.shape == ref_out.shape
    assert_close(out, ref_out, torch.float64)
    for got in grads(out, (q, k, v)):
        assert torch.isfinite(got).all()


# --- bugs: precision and NaN -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
def test_float64_mask_keeps_float64_precision(backend: str) -> None:
    """A float64 mask with float64 q is accepted, so it must not be rounded to float32."""
    q, k, v = make_qkv()
    mask = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = qkv.attention(q, k, v, mask=mask, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert_close(out, expected, torch.float64)


@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
def test_float64_alibi_keeps_float64_precision(backend: str) -> None:
    q, k, v = make_qkv(q_len=16, kv_len=40)
    slopes = torch.rand(4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = qkv.attention(q, k, v, alibi_slopes=slopes, backend=backend)
    ref_out, _, _ = reference_attention(q, k, v, alibi_slopes=slopes)
    assert_close(out, ref_out, torch.float64)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_infinite_softcap_is_rejected(backend: str) -> None:
    """``c·tanh(s/c)`` computed literally with ``c = inf`` is ``inf·0 = NaN``: qkv rejects it (``None`` = no cap)."""
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=r"softcap must be a positive finite number or None; got inf"):
        qkv.attention(q, k, v, softcap=float("inf"), backend=backend)
