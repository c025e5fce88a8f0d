"""AdditiveAttention: vᵀ tanh(W_q q + W_k k) against explicit loops in numpy; masks; precomputed keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qkv.nn import AdditiveAttention

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def by_hand(
    attn: AdditiveAttention,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    allowed: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loops over batch, query and source position, with the module's weights as numpy arrays."""
    w_q = attn.query_layer.weight.detach().numpy()
    w_k = attn.key_layer.weight.detach().numpy()
    v_a = attn.energy_layer.weight.detach().numpy()[0]
    q, k, v = (t.detach().numpy() for t in (query, keys, values))
    batch, q_len, _ = q.shape
    src_len = k.shape[1]
    context = np.zeros((batch, q_len, v.shape[-1]))
    weights = np.zeros((batch, q_len, src_len))
    for b in range(batch):
        for i in range(q_len):
            scores = {}
            for j in range(src_len):
                if allowed is None or allowed[b, i, j]:
                    s = v_a @ np.tanh(w_q @ q[b, i] + w_k @ k[b, j])
                    scores[j] = s + (0.0 if bias is None else bias[b, i, j])
            if not scores:
                continue
            top = max(scores.values())
            total = sum(math.exp(s - top) for s in scores.values())
            for j, s in scores.items():
                weights[b, i, j] = math.exp(s - top) / total
                context[b, i] += weights[b, i, j] * v[b, j]
    return context, weights


def assert_matches(got: tuple[torch.Tensor, torch.Tensor], want: tuple[np.ndarray, np.ndarray]) -> None:
    torch.testing.assert_close(got[0], torch.from_numpy(want[0]), **TOL)
    torch.testing.assert_close(got[1], torch.from_numpy(want[1]), **TOL)


def make(query_dim: int = 4, key_dim: int = 3, hidden_dim: int = 5) -> AdditiveAttention:
    torch.manual_seed(0)
    return AdditiveAttention(query_dim, key_dim, hidden_dim).double()


def inputs(batch: int = 2, q_len: int = 3, src_len: int = 5, value_dim: int = 3) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    query = torch.randn(batch, q_len, 4, dtype=F64)
    keys = torch.randn(batch, src_len, 3, dtype=F64)
    values = torch.randn(batch, src_len, value_dim, dtype=F64)
    return query, keys, values


def test_matches_the_formula() -> None:
    attn = make()
    query, keys, values = inputs(value_dim=6)
    context, weights = attn(query, keys, values)
    assert context.shape == (2, 3, 6) and weights.shape == (2, 3, 5)
    assert_matches((context, weights), by_hand(attn, query, keys, values))


def test_values_default_to_keys() -> None:
    attn = make()
    query, keys, _ = inputs()
    assert_matches(attn(query, keys), by_hand(attn, query, keys, keys))


def test_no_biases() -> None:
    attn = make()
    assert all(layer.bias is None for layer in (attn.query_layer, attn.key_layer, attn.energy_layer))


def test_bool_mask_and_key_lengths() -> None:
    attn = make()
    query, keys, values = inputs(batch=3, q_len=4, src_len=6)
    torch.manual_seed(2)
    mask = torch.rand(3, 4, 6) < 0.7
    lengths = torch.tensor([6, 2, 0])
    allowed = mask & (torch.arange(6) < lengths[:, None, None])
    want = by_hand(attn, query, keys, values, allowed.numpy())
    assert_matches(attn(query, keys, values, mask=mask, key_lengths=lengths), want)
    assert_matches(attn(query, keys, values, mask=allowed), want)


def test_key_lengths_alone() -> None:
    attn = make()
    query, keys, values = inputs()
    lengths = torch.tensor([3, 5])
    allowed = (torch.arange(5) < lengths[:, None, None]).expand(2, 3, 5)
    assert_matches(attn(query, keys, values, key_lengths=lengths), by_hand(attn, query, keys, values, allowed.numpy()))


def test_float_mask() -> None:
    attn = make()
    query, keys, values = inputs()
    bias = torch.randn(2, 3, 5, dtype=F64)
    assert_matches(attn(query, keys, values, mask=bias), by_hand(attn, query, keys, values, bias=bias.numpy()))


def test_fully_masked_rows_give_zeros_and_finite_gradients() -> None:
    attn = make()
    query, keys, values = (t.requires_grad_() for t in inputs())
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[0, 2] = False
    context, weights = attn(query, keys, values, mask=mask, key_lengths=torch.tensor([5, 0]))
    assert (context[0, 2] == 0).all() and (weights[0, 2] == 0).all()
    assert (context[1] == 0).all() and (weights[1] == 0).all()
    assert (weights[0, :2].sum(-1) - 1).abs().max() < 1e-12
    context.sum().backward()
    for t in (query, keys, values, attn.energy_layer.weight):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert (query.grad[1] == 0).all() and (query.grad[0, 2] == 0).all()


def test_float_mask_of_minus_infinity_row_gives_zeros_and_finite_gradients() -> None:
    attn = make()
    query, keys, values = (t.requires_grad_() for t in inputs())
    bias = torch.zeros(2, 3, 5, dtype=F64)
    bias[1, 0] = float("-inf")
    context, weights = attn(query, keys, values, mask=bias)
    assert (context[1, 0] == 0).all() and (weights[1, 0] == 0).all()
    assert not context.isnan().any()
    context.sum().backward()
    for t in (query, keys, values, attn.energy_layer.weight, attn.key_layer.weight):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_precomputed_keys() -> None:
    attn = make()
    query, keys, values = inputs()
    projected = attn.precompute_keys(keys)
    assert projected.shape == (2, 5, 5)
    lengths = torch.tensor([4, 5])
    want = attn(query, keys, values, key_lengths=lengths)
    got = attn(query, keys, values, key_lengths=lengths, projected_keys=projected)
    torch.testing.assert_close(got, want, **TOL)
    # The precomputed keys are what is used: a different projection changes the result.
    other = attn(query, keys, values, projected_keys=projected.flip(1))
    assert not torch.allclose(other[0], want[0])


def test_single_step_query() -> None:
    attn = make()
    query, keys, values = inputs(q_len=1)
    padding = torch.tensor([[True] * 5, [True, False, True, True, False]])
    context, weights = attn(query[:, 0], keys, values, mask=padding, projected_keys=attn.precompute_keys(keys))
    assert context.shape == (2, 3) and weights.shape == (2, 5)
    want_c, want_w = by_hand(attn, query, keys, values, padding[:, None, :].numpy())
    assert_matches((context, weights), (want_c[:, 0], want_w[:, 0]))


def test_gradcheck() -> None:
    attn = make(2, 3, 3)
    query = torch.randn(2, 2, 2, dtype=F64, requires_grad=True)
    keys = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    lengths = torch.tensor([4, 1])
    assert torch.autograd.gradcheck(lambda q, k: attn(q, k, key_lengths=lengths)[0], (query, keys))


# Bad input.


def test_hidden_dim_not_positive() -> None:
    with pytest.raises(ValueError, match=r"hidden_dim must be a positive int; got 0"):
        AdditiveAttention(4, 3, 0)


def test_query_of_wrong_width() -> None:
    query, keys, _ = inputs()
    with pytest.raises(ValueError, match=r"query must have shape \(B, L, Dq\) or \(B, Dq\) with Dq=4; got \(2, 3, 3\)"):
        make()(query[..., :3], keys)


def test_keys_of_wrong_width() -> None:
    query, keys, _ = inputs()
    with pytest.raises(ValueError, match=r"keys must have shape \(B, S, Dk\) with Dk=3; got \(2, 5, 2\)"):
        make()(query, keys[..., :2])


def test_precompute_keys_of_wrong_width() -> None:
    _, keys, _ = inputs()
    with pytest.raises(ValueError, match=r"keys must have shape \(B, S, Dk\) with Dk=3; got \(2, 5, 2\)"):
        make().precompute_keys(keys[..., :2])


def test_projected_keys_of_wrong_shape() -> None:
    query, keys, _ = inputs()
    with pytest.raises(ValueError, match=r"projected_keys must have shape \(B, S, Dh\) = \(2, 5, 5\); got \(2, 4, 5\)"):
        make()(query, keys, projected_keys=torch.zeros(2, 4, 5, dtype=F64))


def test_key_lengths_out_of_range() -> None:
    query, keys, _ = inputs()
    with pytest.raises(ValueError, match=r"key_lengths must lie in \[0, S=5\]; got values from 2 to 6"):
        make()(query, keys, key_lengths=torch.tensor([2, 6]))


def test_mask_of_wrong_shape() -> None:
    query, keys, _ = inputs()
    with pytest.raises(ValueError, match=r"mask of shape \(2, 5\) is not broadcastable to \(B, L, S\) = \(2, 3, 5\)"):
        make()(query, keys, mask=torch.ones(2, 5, dtype=torch.bool))
