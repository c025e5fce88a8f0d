"""SelfAttention: equal to softmax(QKᵀ/√d)V written by hand with its own projections."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.nn import SelfAttention

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def by_hand(
    block: SelfAttention, x: torch.Tensor, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook formula; ``allowed (B, L, L)`` bool, every row with at least one allowed key."""
    q = x @ block.q_proj.weight.T + block.q_proj.bias
    k = x @ block.k_proj.weight.T + block.k_proj.bias
    v = x @ block.v_proj.weight.T + block.v_proj.bias
    scores = q @ k.transpose(-2, -1) / math.sqrt(x.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v) @ block.out_proj.weight.T + block.out_proj.bias
    return out, weights


def make_block(embed_dim: int = 6, **kwargs: bool) -> SelfAttention:
    torch.manual_seed(0)
    return SelfAttention(embed_dim, **kwargs).double()


def test_matches_the_formula() -> None:
    block = make_block()
    x = torch.randn(3, 5, 6, dtype=F64)
    out, weights = block(x)
    ref_out, ref_w = by_hand(block, x)
    assert out.shape == (3, 5, 6) and weights.shape == (3, 5, 5)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(weights, ref_w, **TOL)


def test_causal() -> None:
    block = make_block()
    x = torch.randn(2, 5, 6, dtype=F64)
    lower = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5)
    ref_out, ref_w = by_hand(block, x, lower)
    out, weights = block(x, causal=True)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(weights, ref_w, **TOL)


def test_key_lengths_and_equivalent_mask() -> None:
    block = make_block()
    x = torch.randn(3, 5, 6, dtype=F64)
    lengths = torch.tensor([5, 1, 3])
    allowed = (torch.arange(5) < lengths[:, None])[:, None, :].expand(3, 5, 5)
    ref_out, ref_w = by_hand(block, x, allowed)
    for out, weights in (block(x, key_lengths=lengths), block(x, mask=allowed[:, :1, :]), block(x, mask=allowed)):
        torch.testing.assert_close(out, ref_out, **TOL)
        torch.testing.assert_close(weights, ref_w, **TOL)


def test_shared_two_dimensional_mask() -> None:
    block = make_block()
    x = torch.randn(2, 4, 6, dtype=F64)
    pattern = torch.rand(4, 4) < 0.6
    pattern.fill_diagonal_(True)
    ref_out, _ = by_hand(block, x, pattern.expand(2, 4, 4))
    torch.testing.assert_close(block(x, mask=pattern)[0], ref_out, **TOL)


def test_without_bias() -> None:
    block = make_block(bias=False)
    assert block.q_proj.bias is None and block.out_proj.bias is None
    x = torch.randn(2, 4, 6, dtype=F64)
    q, k, v = (x @ p.weight.T for p in (block.q_proj, block.k_proj, block.v_proj))
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(6), dim=-1)
    torch.testing.assert_close(block(x)[0], (weights @ v) @ block.out_proj.weight.T, **TOL)


def test_x_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, E\) with E=6; got \(2, 4, 5\)"):
        make_block()(torch.randn(2, 4, 5, dtype=F64))


def test_mask_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 4, 4\) is not broadcastable to \(B, L, L\)"):
        make_block()(torch.randn(2, 4, 6, dtype=F64), mask=torch.ones(2, 1, 4, 4, dtype=torch.bool))


def test_embed_dim_not_positive() -> None:
    with pytest.raises(ValueError, match=r"embed_dim must be a positive int; got 0"):
        SelfAttention(0)
