"""LuongAttention: dot and general scores against explicit loops in numpy; masks; the 2-D query form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qkv.nn import LuongAttention

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def by_hand(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    w_a: np.ndarray | None,
    allowed: np.ndarray | None = None,
    bias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loops over batch, query and source position. ``score = h_tᵀ W_a h_s`` (``W_a = I`` for dot)."""
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
                    s = q[b, i] @ (k[b, j] if w_a is None else w_a @ k[b, j])
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


def general(query_dim: int, key_dim: int) -> tuple[LuongAttention, np.ndarray]:
    torch.manual_seed(0)
    attn = LuongAttention(query_dim, key_dim, score="general").double()
    assert attn.linear_in is not None
    return attn, attn.linear_in.weight.detach().numpy().T


def test_dot() -> None:
    attn = LuongAttention(4)
    query, keys = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 5, 4, dtype=F64)
    assert_matches(attn(query, keys), by_hand(query, keys, keys, None))
    assert list(attn.parameters()) == []


def test_dot_with_separate_values() -> None:
    attn = LuongAttention(4, 4, "dot")
    query, keys, values = (torch.randn(2, n, d, dtype=F64) for n, d in ((3, 4), (5, 4), (5, 7)))
    context, weights = attn(query, keys, values)
    assert context.shape == (2, 3, 7) and weights.shape == (2, 3, 5)
    assert_matches((context, weights), by_hand(query, keys, values, None))


def test_general_with_different_widths() -> None:
    attn, w_a = general(3, 5)
    assert w_a.shape == (3, 5)
    query, keys, values = (torch.randn(2, n, d, dtype=F64) for n, d in ((4, 3), (6, 5), (6, 2)))
    assert_matches(attn(query, keys, values), by_hand(query, keys, values, w_a))


def test_bool_mask_and_key_lengths() -> None:
    attn, w_a = general(4, 4)
    query, keys = torch.randn(3, 4, 4, dtype=F64), torch.randn(3, 6, 4, dtype=F64)
    torch.manual_seed(1)
    mask = torch.rand(3, 4, 6) < 0.7
    lengths = torch.tensor([6, 3, 0])
    allowed = mask & (torch.arange(6) < lengths[:, None, None])
    want = by_hand(query, keys, keys, w_a, allowed.numpy())
    assert_matches(attn(query, keys, mask=mask, key_lengths=lengths), want)
    assert_matches(attn(query, keys, mask=allowed), want)


def test_key_lengths_alone() -> None:
    attn = LuongAttention(4)
    query, keys = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 5, 4, dtype=F64)
    lengths = torch.tensor([2, 5])
    allowed = (torch.arange(5) < lengths[:, None, None]).expand(2, 3, 5)
    assert_matches(attn(query, keys, key_lengths=lengths), by_hand(query, keys, keys, None, allowed.numpy()))


def test_float_mask() -> None:
    attn = LuongAttention(4)
    query, keys = torch.randn(2, 3, 4, dtype=F64), torch.randn(2, 5, 4, dtype=F64)
    bias = torch.randn(2, 3, 5, dtype=F64).float().double()  # exact in float32, see test_multi_head
    assert_matches(attn(query, keys, mask=bias), by_hand(query, keys, keys, None, bias=bias.numpy()))


def test_fully_masked_rows_give_zeros_and_finite_gradients() -> None:
    attn, _ = general(4, 4)
    query = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    keys = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[0, 1] = False
    context, weights = attn(query, keys, mask=mask, key_lengths=torch.tensor([5, 0]))
    assert (context[0, 1] == 0).all() and (weights[0, 1] == 0).all()
    assert (context[1] == 0).all() and (weights[1] == 0).all()
    assert (context[0, 0] != 0).all()
    context.sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(keys.grad).all()
    assert (query.grad[1] == 0).all() and (query.grad[0, 1] == 0).all()


def test_single_step_query() -> None:
    attn, w_a = general(4, 3)
    query, keys = torch.randn(2, 4, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
    padding = torch.tensor([[True] * 5, [True, True, False, False, False]])
    context, weights = attn(query, keys, mask=padding)
    assert context.shape == (2, 3) and weights.shape == (2, 5)
    want_c, want_w = by_hand(query[:, None], keys, keys, w_a, padding[:, None, :].numpy())
    assert_matches((context, weights), (want_c[:, 0], want_w[:, 0]))
    c3, w3 = attn(query[:, None], keys, key_lengths=torch.tensor([5, 2]))
    torch.testing.assert_close(c3[:, 0], context, **TOL)
    torch.testing.assert_close(w3[:, 0], weights, **TOL)


def test_gradcheck_general() -> None:
    attn, _ = general(3, 2)
    query = torch.randn(2, 2, 3, dtype=F64, requires_grad=True)
    keys = torch.randn(2, 4, 2, dtype=F64, requires_grad=True)
    lengths = torch.tensor([4, 2])
    assert torch.autograd.gradcheck(lambda q, k: attn(q, k, key_lengths=lengths)[0], (query, keys))


# Bad input.


def test_dot_needs_equal_widths() -> None:
    with pytest.raises(ValueError, match=r"score='dot' needs key_dim == query_dim; got query_dim=4, key_dim=3"):
        LuongAttention(4, 3)


def test_unknown_score() -> None:
    with pytest.raises(ValueError, match=r"score must be one of 'dot', 'general'; got 'concat'"):
        LuongAttention(4, score="concat")


def test_query_dim_not_positive() -> None:
    with pytest.raises(ValueError, match=r"query_dim must be a positive int; got -1"):
        LuongAttention(-1)


def test_query_of_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"query must have shape \(B, L, Dq\) or \(B, Dq\) with Dq=4; got \(4,\)"):
        LuongAttention(4)(torch.randn(4), torch.randn(1, 5, 4))


def test_query_of_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"query must have shape .* with Dq=4; got \(2, 3, 5\)"):
        LuongAttention(4)(torch.randn(2, 3, 5), torch.randn(2, 5, 4))


def test_keys_of_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"keys must have shape \(B, S, Dk\) with Dk=3; got \(2, 5, 4\)"):
        LuongAttention(4, 3, "general")(torch.randn(2, 3, 4), torch.randn(2, 5, 4))


def test_keys_batch_differs_from_query() -> None:
    with pytest.raises(ValueError, match=r"keys has batch size 3 .* but query has 2"):
        LuongAttention(4)(torch.randn(2, 4), torch.randn(3, 5, 4))


def test_values_of_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"values must have shape \(B, S, Dv\) with \(B, S\) = \(2, 5\)"):
        LuongAttention(4)(torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 4, 4))


def test_mask_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 3, 5\) is not broadcastable to \(B, L, S\)"):
        LuongAttention(4)(torch.randn(2, 3, 4), torch.randn(2, 5, 4), mask=torch.ones(2, 1, 3, 5).bool())


def test_mask_of_wrong_shape_for_single_step() -> None:
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 5\) is not broadcastable to \(B, S\)"):
        LuongAttention(4)(torch.randn(2, 4), torch.randn(2, 5, 4), mask=torch.ones(2, 1, 5).bool())


def test_key_lengths_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"key_lengths must have shape \(B,\) = \(2,\); got \(2, 1\)"):
        LuongAttention(4)(torch.randn(2, 3, 4), torch.randn(2, 5, 4), key_lengths=torch.tensor([[5], [5]]))


def test_key_lengths_of_float_dtype() -> None:
    with pytest.raises(TypeError, match=r"key_lengths must be an integer tensor of shape \(B,\); got torch.float32"):
        LuongAttention(4)(torch.randn(2, 3, 4), torch.randn(2, 5, 4), key_lengths=torch.tensor([5.0, 5.0]))
