"""Label-smoothed cross-entropy against a hand computation and against torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qkv.train.loss import label_smoothed_loss

PAD = 0


def test_against_a_hand_computation():
    # One real token, V = 3, logits (0, ln 2, ln 5): probabilities 1/8, 2/8, 5/8; the target is class 2.
    logits = torch.tensor([[[0.0, math.log(2.0), math.log(5.0)], [9.0, 1.0, 3.0]]])
    target = torch.tensor([[2, PAD]])  # the second position is padding: it must not count
    eps = 0.1
    nll = -math.log(5 / 8)
    uniform = -(math.log(1 / 8) + math.log(2 / 8) + math.log(5 / 8)) / 3
    loss, nll_sum, tokens = label_smoothed_loss(logits, target, smoothing=eps, pad_id=PAD)
    assert tokens == 1
    assert float(nll_sum) == pytest.approx(nll, rel=1e-6)
    assert float(loss) == pytest.approx((1 - eps) * nll + eps * uniform, rel=1e-6)


def test_equals_torch_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    target = torch.randint(1, 11, (3, 5))
    target[0, 3:] = PAD
    target[2, 1:] = PAD
    loss, nll, tokens = label_smoothed_loss(logits, target, smoothing=0.2, pad_id=PAD)
    expected = F.cross_entropy(
        logits.flatten(0, 1), target.flatten(), ignore_index=PAD, label_smoothing=0.2, reduction="sum"
    )
    plain = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD, reduction="sum")
    assert tokens == int((target != PAD).sum())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, plain)


def test_gradient_flows_and_ignores_padding():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss, _, _ = label_smoothed_loss(logits, torch.tensor([[1, 2, PAD]]), smoothing=0.1, pad_id=PAD)
    loss.backward()
    assert logits.grad[0, 2].abs().max() == 0 and logits.grad[0, :2].abs().max() > 0
