"""Attention rollout against hand arithmetic, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.viz.rollout import attention_rollout, token_contributions

# Two layers, one head, three tokens; rows sum to 1.
A1 = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]
A2 = [[1.0, 0.0, 0.0], [0.6, 0.4, 0.0], [0.0, 0.5, 0.5]]


def random_attention(*shape: int, seed: int = 0) -> torch.Tensor:
    """Softmax rows of shape ``shape``, float64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).softmax(dim=-1)


def test_hand_computed_two_layers():
    # Residual: Ã = 0.5·A + 0.5·I; these rows already sum to 1, so re-normalizing changes nothing.
    r1 = [
        [0.5 * 1.0 + 0.5, 0.0, 0.0],  # [1, 0, 0]
        [0.5 * 0.5, 0.5 * 0.5 + 0.5, 0.0],  # [0.25, 0.75, 0]
        [0.5 * 0.2, 0.5 * 0.3, 0.5 * 0.5 + 0.5],  # [0.1, 0.15, 0.75]
    ]
    r2 = [
        [1.0, 0.0, 0.0],
        [0.5 * 0.6, 0.5 * 0.4 + 0.5, 0.0],  # [0.3, 0.7, 0]
        [0.0, 0.5 * 0.5, 0.5 * 0.5 + 0.5],  # [0, 0.25, 0.75]
    ]
    # rollout = Ã2 · Ã1, row by row: row i of Ã2 mixes the rows of Ã1.
    expected = [
        [1.0, 0.0, 0.0],
        [0.3 * 1.0 + 0.7 * 0.25, 0.7 * 0.75, 0.0],  # [0.475, 0.525, 0]
        [0.25 * 0.25 + 0.75 * 0.1, 0.25 * 0.75 + 0.75 * 0.15, 0.75 * 0.75],  # [0.1375, 0.3, 0.5625]
    ]
    assert r1[2] == pytest.approx([0.1, 0.15, 0.75]) and r2[1] == pytest.approx([0.3, 0.7, 0.0])
    attentions = torch.tensor([[A1], [A2]], dtype=torch.float64)  # (layers=2, H=1, L=3, L=3)
    rollout = attention_rollout(attentions)
    torch.testing.assert_close(rollout, torch.tensor(expected, dtype=torch.float64))
    # The order matters: Ã1 · Ã2 differs in the last row.
    assert rollout[2, 0].item() != pytest.approx(0.1 * 1.0 + 0.15 * 0.3)


def test_hand_computed_without_residual():
    rollout = attention_rollout(torch.tensor([[A1], [A2]], dtype=torch.float64), residual=False)
    expected = [
        [1.0, 0.0, 0.0],
        [0.6 * 1.0 + 0.4 * 0.5, 0.4 * 0.5, 0.0],  # [0.8, 0.2, 0]
        [0.5 * 0.5 + 0.5 * 0.2, 0.5 * 0.5 + 0.5 * 0.3, 0.5 * 0.5],  # [0.35, 0.4, 0.25]
    ]
    torch.testing.assert_close(rollout, torch.tensor(expected, dtype=torch.float64))


def test_no_residual_is_the_plain_product():
    attentions = random_attention(4, 1, 5, 5)
    expected = attentions[3, 0] @ attentions[2, 0] @ attentions[1, 0] @ attentions[0, 0]
    torch.testing.assert_close(attention_rollout(attentions, residual=False), expected)
    # With several heads, "mean" fuses them first: still a plain product, of head means.
    heads = random_attention(3, 4, 5, 5, seed=1)
    means = heads.mean(dim=1)
    torch.testing.assert_close(attention_rollout(heads, residual=False), means[2] @ means[1] @ means[0])


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", [True, False])
def test_rows_sum_to_one(head_fusion, residual):
    rollout = attention_rollout(random_attention(6, 4, 7, 7), head_fusion=head_fusion, residual=residual)
    assert rollout.shape == (7, 7) and (rollout >= 0).all()
    torch.testing.assert_close(rollout.sum(dim=-1), torch.ones(7, dtype=torch.float64))


def test_head_fusion_max_and_min_by_hand():
    # One layer, two heads, two tokens; max/min rows do not sum to 1, so re-normalization matters.
    h0 = [[0.9, 0.1], [0.4, 0.6]]
    h1 = [[0.3, 0.7], [0.2, 0.8]]
    attentions = torch.tensor([[h0, h1]], dtype=torch.float64)
    fused_max = [[0.9, 0.7], [0.4, 0.8]]  # row sums 1.6 and 1.2
    expected_max = [[0.9 / 1.6, 0.7 / 1.6], [0.4 / 1.2, 0.8 / 1.2]]
    fused = attention_rollout(attentions, head_fusion="max", residual=False)
    torch.testing.assert_close(fused, torch.tensor(expected_max, dtype=torch.float64))
    # With the residual: 0.5·fused + 0.5·I, then rows re-normalized.
    with_identity = [[0.5 * 0.9 + 0.5, 0.5 * 0.7], [0.5 * 0.4, 0.5 * 0.8 + 0.5]]  # sums 1.3, 1.1
    expected = [[0.95 / 1.3, 0.35 / 1.3], [0.2 / 1.1, 0.9 / 1.1]]
    assert with_identity[0][0] == pytest.approx(0.95) and with_identity[1][1] == pytest.approx(0.9)
    assert fused_max[0] == [max(0.9, 0.3), max(0.1, 0.7)]
    torch.testing.assert_close(
        attention_rollout(attentions, head_fusion="max"), torch.tensor(expected, dtype=torch.float64)
    )
    expected_min = [[0.3 / 0.4, 0.1 / 0.4], [0.2 / 0.8, 0.6 / 0.8]]  # min = [[0.3, 0.1], [0.2, 0.6]]
    fused = attention_rollout(attentions, head_fusion="min", residual=False)
    torch.testing.assert_close(fused, torch.tensor(expected_min, dtype=torch.float64))


def test_batched_equals_one_by_one_and_keeps_dtype():
    attentions = random_attention(3, 2, 4, 5, 5).float()  # (B=3, layers=2, H=4, L=5, L=5)
    rollout = attention_rollout(attentions, head_fusion="max")
    assert rollout.shape == (3, 5, 5) and rollout.dtype == torch.float32
    for b in range(3):
        torch.testing.assert_close(rollout[b], attention_rollout(attentions[b], head_fusion="max"))
    assert attention_rollout(np.asarray(attentions[0])).dtype == torch.float64


def test_token_contributions():
    rollout = attention_rollout(torch.tensor([[A1], [A2]], dtype=torch.float64))
    contributions = token_contributions(rollout, 2)
    torch.testing.assert_close(contributions, torch.tensor([0.1375, 0.3, 0.5625], dtype=torch.float64))
    torch.testing.assert_close(token_contributions(rollout, -1), contributions)
    batched = attention_rollout(random_attention(2, 3, 2, 4, 4))
    assert token_contributions(batched, 0).shape == (2, 4)
    with pytest.raises(ValueError, match=r"token_index=3 is out of range for 3 tokens \(0..2\)"):
        token_contributions(rollout, 3)


def test_errors():
    with pytest.raises(ValueError, match=r"shape \(2, 3, 3\); expected \(layers, H, L, L\) or \(B, layers, H, L, L\)"):
        attention_rollout(torch.ones(2, 3, 3))
    with pytest.raises(ValueError, match="square"):
        attention_rollout(torch.ones(2, 1, 3, 4))
    with pytest.raises(ValueError, match="negative weights"):
        attention_rollout(-torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="head_fusion='median'"):
        attention_rollout(torch.ones(1, 1, 2, 2), head_fusion="median")
    padded = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])  # the second query is a fully masked pad position
    for residual in (True, False):
        with pytest.raises(ValueError, match=r"all zeros \(index \[0, 1\] .*padding-free"):
            attention_rollout(padded, residual=residual)
