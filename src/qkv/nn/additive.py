"""``AdditiveAttention``: the concat/MLP attention of Bahdanau, Cho & Bengio (2015).

A decoder state ``q`` scores every encoder state ``k`` with a one-hidden-layer network::

    score(q, k) = vᵀ tanh(W_q q + W_k k)

then ``weights = softmax(scores + masks)`` over the source and ``context = Σ_s weights_s · value_s``.
``W_k k`` does not depend on the decoder step: compute it once per source sentence with
:meth:`AdditiveAttention.precompute_keys` and pass it back as ``projected_keys`` at every step.

Mask rules as :class:`~qkv.nn.LuongAttention`: boolean ``True`` = may attend, float added to the scores,
``key_lengths (B,)`` for padding; rows whose keys are all masked give zero context and zero weights.
"""

from __future__ import annotations

import torch
from torch import nn

from qkv.checks import int_at_least
from qkv.nn.luong import Seq2SeqInputs, check_seq2seq_inputs


class AdditiveAttention(nn.Module):
    """Bahdanau (2015) additive attention, ``score(q, k) = vᵀ tanh(W_q q + W_k k)``.

    Args:
        query_dim: ``Dq``, the decoder state width.
        key_dim: ``Dk``, the encoder state width.
        hidden_dim: ``Dh``, the width of the scoring network's hidden layer.

    Attributes:
        query_layer: ``W_q``, ``nn.Linear(Dq, Dh, bias=False)``.
        key_layer: ``W_k``, ``nn.Linear(Dk, Dh, bias=False)``.
        energy_layer: ``v``, ``nn.Linear(Dh, 1, bias=False)``.

    No biases, as in the paper (and JoeyNMT, whose parameter names these are).
    """

    def __init__(self, query_dim: int, key_dim: int, hidden_dim: int) -> None:
        super().__init__()
        for name, value in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            int_at_least(name, value, expected="a positive int")
        self.query_dim = query_dim
        self.key_dim = key_dim
        self.hidden_dim = hidden_dim
        self.query_layer = nn.Linear(query_dim, hidden_dim, bias=False)
        self.key_layer = nn.Linear(key_dim, hidden_dim, bias=False)
        self.energy_layer = nn.Linear(hidden_dim, 1, bias=False)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, hidden_dim={self.hidden_dim}"

    def precompute_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """``W_k k`` for each encoder state, ``(B, S, Dk)`` → ``(B, S, Dh)``; pass as ``projected_keys``."""
        if not isinstance(keys, torch.Tensor) or keys.ndim != 3 or keys.shape[-1] != self.key_dim:
            got = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape (B, S, Dk) with Dk={self.key_dim}; got {got}")
        projected: torch.Tensor = self.key_layer(keys)  # nn.Module.__call__ is typed as returning Any
        return projected

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        key_lengths: torch.Tensor | None = None,
        projected_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend from decoder states to encoder states.

        Args:
            query: ``(B, L, Dq)`` decoder states, or ``(B, Dq)`` for a single step.
            keys: ``(B, S, Dk)`` encoder states.
            values: ``(B, S, Dv)``; default ``keys``.
            mask: boolean (``True`` = may attend) or float (added to the scores), broadcastable to
                ``(B, L, S)``, or ``(B, S)`` for a 2-D query.
            key_lengths: integer ``(B,)``: source positions ``>= key_lengths[b]`` are padding.
            projected_keys: ``(B, S, Dh)``, ``precompute_keys(keys)`` computed once per source; default:
                computed here.

        Returns:
            ``(context, weights)``: ``(B, L, Dv)`` and ``(B, L, S)``, or ``(B, Dv)`` and ``(B, S)`` for a 2-D
            query. Rows with no allowed key give zeros.
        """
        inputs = check_seq2seq_inputs(
            query, keys, values, mask, key_lengths, query_dim=self.query_dim, key_dim=self.key_dim
        )
        if projected_keys is None:
            projected_keys = self.key_layer(inputs.keys)
        else:
            expected = (*inputs.keys.shape[:2], self.hidden_dim)
            if not isinstance(projected_keys, torch.Tensor) or tuple(projected_keys.shape) != expected:
                got = (
                    tuple(projected_keys.shape)
                    if isinstance(projected_keys, torch.Tensor)
                    else type(projected_keys).__name__
                )
                raise ValueError(f"projected_keys must have shape (B, S, Dh) = {expected}; got {got}")
        # (B, L, 1, Dh) + (B, 1, S, Dh) -> (B, L, S).
        hidden = torch.tanh(self.query_layer(inputs.query).unsqueeze(2) + projected_keys.unsqueeze(1))
        scores = self.energy_layer(hidden).squeeze(-1)
        weights = _masked_softmax(scores, inputs)
        return inputs.finish(weights @ inputs.values, weights)


def _masked_softmax(scores: torch.Tensor, inputs: Seq2SeqInputs) -> torch.Tensor:
    """Softmax over ``S`` of ``scores (B, L, S)`` after the masks; rows with nothing allowed give zeros."""
    if inputs.mask is not None and inputs.mask.dtype != torch.bool:
        scores = scores + inputs.mask
    allowed = None
    if inputs.mask is not None and inputs.mask.dtype == torch.bool:
        allowed = inputs.mask
    if inputs.key_lengths is not None:
        positions = torch.arange(scores.shape[-1], device=scores.device)
        by_length = positions < inputs.key_lengths.to(scores.device).reshape(-1, 1, 1)
        allowed = by_length if allowed is None else allowed & by_length
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    # A row of -inf would give 0/0: softmax it as zeros instead, and zero its weights afterwards.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    return weights.masked_fill(empty, 0.0)
