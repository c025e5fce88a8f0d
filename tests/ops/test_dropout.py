"""Attention dropout: reproducible from a seed, unbiased, drops a fraction p, and differentiable.

Statistical tests use fixed seeds and bounds of at least 5 standard deviations, so they are
deterministic and fail only if the behaviour changes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qkv
from qkv.ops.dropout import draw_seed, keep_mask
from qkv.ops.spec import build_spec

from .helpers import (
    EVERY_CALL_BACKENDS,
    SDPA_PARITY_BACKENDS,
    expand_kv,
    grads,
    make_gen,
    make_qkv,
    reference_attention,
)

FEATURES = {"causal": True, "key_lengths": torch.tensor([7, 4])}


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_same_generator_seed_same_output_and_weights(backend: str) -> None:
    q, k, v = make_qkv()
    kw = {"dropout": 0.3, "return_weights": True, "backend": backend, **FEATURES}
    a = qkv.attention(q, k, v, generator=make_gen(5), **kw)
    b = qkv.attention(q, k, v, generator=make_gen(5), **kw)
    c = qkv.attention(q, k, v, generator=make_gen(6), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1] == 0, c[1] == 0)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_generator_advances_between_calls(backend: str) -> None:
    q, k, v = make_qkv()
    g = make_gen(5)
    first = qkv.attention(q, k, v, dropout=0.3, generator=g, backend=backend)
    second = qkv.attention(q, k, v, dropout=0.3, generator=g, backend=backend)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_global_rng_seed_reproducible(backend: str) -> None:
    q, k, v = make_qkv()
    torch.manual_seed(11)
    a = qkv.attention(q, k, v, dropout=0.3, backend=backend)
    torch.manual_seed(11)
    b = qkv.attention(q, k, v, dropout=0.3, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_weights_with_dropout(backend: str) -> None:
    """Dropped weights are 0, the others the undropped ones over 1 - p, and out == weights @ v."""
    p = 0.4
    q, k, v = make_qkv(heads=6, kv_heads=2)
    clean = qkv.attention(q, k, v, return_weights=True, backend=backend, **FEATURES)[1]
    out, weights = qkv.attention(
        q, k, v, dropout=p, generator=make_gen(1), return_weights=True, backend=backend, **FEATURES
    )
    dropped = weights == 0
    assert dropped.any() and (~dropped & (clean > 0)).any()
    torch.testing.assert_close(weights[~dropped], clean[~dropped] / (1 - p), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, weights @ expand_kv(v, 6), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_fraction_dropped_is_p(backend: str, p: float) -> None:
    q, k, v = make_qkv(batch=(4,), heads=4, kv_heads=4, q_len=64, kv_len=64, head_dim=4, value_dim=1)
    _, weights = qkv.attention(q, k, v, dropout=p, generator=make_gen(2), return_weights=True, backend=backend)
    n = weights.numel()
    fraction = (weights == 0).double().mean().item()
    assert abs(fraction - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-9, (fraction, p)
    # per query row too: a hash with a stride defect would drop whole rows or columns
    per_row = (weights == 0).double().mean(-1)
    assert (per_row - p).abs().max() < 5 * (p * (1 - p) / 64) ** 0.5 + 0.05


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_mean_over_draws_is_the_undropped_output(backend: str) -> None:
    """Unbiased: E[out] = out without dropout. 2000 independent patterns in one call (a batch of copies)."""
    draws, p = 2000, 0.3
    q, k, v = make_qkv(batch=(1,), heads=2, kv_heads=1, q_len=4, kv_len=6, head_dim=4, value_dim=3)
    clean = qkv.attention(q, k, v, backend=backend)
    big = [t.expand(draws, *t.shape[1:]) for t in (q, k, v)]
    outs = qkv.attention(*big, dropout=p, generator=make_gen(3), backend=backend)
    mean, std = outs.mean(0), outs.std(0)
    assert (std > 0).all()
    assert ((mean - clean[0]).abs() <= 5 * std / draws**0.5).all()
    assert not torch.allclose(outs[0], clean[0], atol=1e-3)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_gradient_with_dropout_uses_the_same_keep_mask(backend: str) -> None:
    """Gradients equal the reference's given the keep mask the call drew (qkv.ops.dropout.keep_mask)."""
    p = 0.35
    q, k, v = make_qkv(heads=4, kv_heads=2, requires_grad=True)
    out, weights = qkv.attention(
        q, k, v, dropout=p, generator=make_gen(4), return_weights=True, backend=backend, **FEATURES
    )
    seed = draw_seed(make_gen(4))
    spec = build_spec(q, k, v, dropout=p, **FEATURES)
    keep = keep_mask(spec, seed, 0, spec.q_len, 0, spec.kv_len, q.device)
    ref_out, ref_weights, _ = reference_attention(q, k, v, dropout=p, keep=keep, **FEATURES)
    torch.testing.assert_close(weights, ref_weights, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    for got, want in zip(grads(out, (q, k, v)), grads(ref_out, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_keep_mask_is_the_same_for_any_block() -> None:
    """Counter-based: a block of the mask equals the same block cut from the whole mask."""
    q, k, v = make_qkv(heads=4, kv_heads=2, q_len=9, kv_len=11)
    spec = build_spec(q, k, v, dropout=0.5)
    whole = keep_mask(spec, 1234, 0, 9, 0, 11, q.device)
    assert torch.equal(keep_mask(spec, 1234, 3, 7, 2, 10, q.device), whole[..., 3:7, 2:10])
    assert not torch.equal(keep_mask(spec, 1235, 0, 9, 0, 11, q.device), whole)
    heads = whole.reshape(-1, 9, 11)
    assert all(not torch.equal(heads[0], heads[i]) for i in range(1, heads.shape[0]))


@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
def test_dropout_zero_is_no_dropout(backend: str) -> None:
    """dropout=0 with a generator: the same output as without, and the generator is not consumed."""
    q, k, v = make_qkv()
    g = make_gen(9)
    state = g.get_state()
    out = qkv.attention(q, k, v, dropout=0.0, generator=g, backend=backend, **FEATURES)
    assert torch.equal(g.get_state(), state)
    expected = qkv.attention(q, k, v, backend="math", **FEATURES)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_torch_backend_refuses_a_generator() -> None:
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match=r"backend='torch' cannot run this call: .*torch\.Generator"):
        qkv.attention(q, k, v, dropout=0.1, generator=make_gen(0), backend="torch")


def test_auto_with_generator_runs_qkv_dropout() -> None:
    q, k, v = make_qkv()
    auto = qkv.attention(q, k, v, dropout=0.2, generator=make_gen(8))
    math = qkv.attention(q, k, v, dropout=0.2, generator=make_gen(8), backend="math")
    torch.testing.assert_close(auto, math, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", EVERY_CALL_BACKENDS)
def test_dropout_pattern_is_the_same_on_every_backend(backend: str) -> None:
    """The documented promise: the pattern comes from one seed drawn from the generator *or the global RNG*
    and is equal across qkv's backends. Without a generator, backend='auto' must not switch patterns."""
    q, k, v = make_qkv()
    torch.manual_seed(21)
    expected = qkv.attention(q, k, v, dropout=0.3, backend="math")
    torch.manual_seed(21)
    out = qkv.attention(q, k, v, dropout=0.3, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_keep_decisions_are_uncorrelated_between_neighbours_heads_and_seeds() -> None:
    """Neighbouring weights, heads and two seeds agree as often as independent coins would,
    p² + (1-p)² = 0.58 at p = 0.3 (within 0.01 over ≥ 2·10⁵ weights, about 10 standard errors)."""
    q, k, v = make_qkv(heads=4, kv_heads=4, q_len=128, kv_len=512)
    spec = build_spec(q, k, v, dropout=0.3)
    keep = keep_mask(spec, 2024, 0, 128, 0, 512, q.device).reshape(-1, 4, 128, 512)
    independent = 0.3**2 + 0.7**2
    assert keep.float().mean().item() == pytest.approx(0.7, abs=0.005)
    pairs = {
        "next column": (keep[..., 1:], keep[..., :-1]),
        "next row": (keep[..., 1:, :], keep[..., :-1, :]),
        "next head": (keep[:, 1:], keep[:, :-1]),
        "another seed": (keep, keep_mask(spec, 2025, 0, 128, 0, 512, q.device).reshape(keep.shape)),
    }
    for name, (a, b) in pairs.items():
        assert (a == b).float().mean().item() == pytest.approx(independent, abs=0.01), name


def test_indices_past_two_to_the_32_use_their_high_bits() -> None:
    """With B·H·L·S > 2**32 the weight 2**32 places further on is decided independently (the high half of
    the index enters the hash), and the keep rate stays 1 - p there."""
    q, k, v = make_qkv(heads=2, kv_heads=2, q_len=4, kv_len=8192)
    spec = dataclasses.replace(build_spec(q, k, v, dropout=0.5), q_len=2**20)  # 2·2**20·8192 = 2**34 weights
    rows_per_2_32 = 2**32 // 8192
    low = keep_mask(spec, 7, 0, 8, 0, 8192, q.device)
    high = keep_mask(spec, 7, rows_per_2_32, rows_per_2_32 + 8, 0, 8192, q.device)
    assert high.float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (low == high).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_keep_mask_is_its_documented_formula() -> None:
    """Every decision equals ``mix32((n ^ k1)) >= round(p·2**32)`` computed on Python ints, the definition that
    any other implementation (a GPU kernel) must reproduce."""
    from qkv.ops.dropout import mix32, seed_keys

    q, k, v = make_qkv(heads=2, kv_heads=2, q_len=3, kv_len=5)
    spec = build_spec(q, k, v, dropout=0.4)
    k1, _ = seed_keys(77)
    keep = keep_mask(spec, 77, 0, 3, 0, 5, q.device).reshape(-1)
    expected = [mix32(n ^ k1) >= round(0.4 * 2**32) for n in range(keep.numel())]
    assert keep.tolist() == expected
