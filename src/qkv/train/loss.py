"""Label-smoothed cross-entropy over the target tokens, padding ignored.

For a target token ``y`` with log-probabilities ``log p`` over ``V`` classes and smoothing ``ε``::

    loss = (1 - ε) · (-log p[y]) + ε · mean_v(-log p[v])

the cross-entropy against ``(1 - ε) · onehot(y) + ε / V`` (every class, the target included), which is
what ``F.cross_entropy(..., label_smoothing=ε)`` computes. Positions whose target is ``pad_id`` count
nothing. The functions return sums: the trainer divides by the number of target tokens of the whole
(possibly accumulated, possibly distributed) batch, so every token weighs the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothed_loss(
    logits: torch.Tensor, target: torch.Tensor, *, smoothing: float, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed smoothed loss and summed NLL of ``logits (B, T, V)`` against ``target (B, T)``.

    Returns:
        ``(loss_sum, nll_sum, tokens)``: float32 scalars (``loss_sum`` differentiable) and the count of
        non-pad target positions.
    """
    if logits.ndim != 3 or target.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and target (B, T); got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1); got {smoothing}")
    log_probs = F.log_softmax(logits.float(), dim=-1)
    keep = target != pad_id
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -log_probs.mean(dim=-1)
    per_token = (1.0 - smoothing) * nll + smoothing * smooth
    zero = per_token.new_zeros(())
    loss_sum = torch.where(keep, per_token, zero).sum()
    nll_sum = torch.where(keep, nll, zero).sum()
    return loss_sum, nll_sum.detach(), int(keep.sum())
