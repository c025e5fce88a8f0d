"""``LuongAttention``: the global attention of Luong, Pham & Manning (2015), "dot" and "general" scores.

A decoder state ``h_t`` scores every encoder state ``h_s``::

    dot:      score(h_t, h_s) = h_tᵀ h_s
    general:  score(h_t, h_s) = h_tᵀ W_a h_s

then ``weights = softmax(scores + masks)`` over the source and ``context = Σ_s weights_s · value_s``.
No ``1/√d`` scaling, as in the paper.

This module also holds the input handling shared with :class:`~qkv.nn.AdditiveAttention`
(:func:`check_seq2seq_inputs`): the same shapes, the same mask rules (boolean ``True`` = may attend, or
float added to the scores; ``key_lengths (B,)`` for padding), and the same rule for rows whose keys are
all masked: zero context and zero weights, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qkv.checks import int_at_least, one_of
from qkv.ops import attention
from qkv.ops.spec import is_integer_tensor

SCORES = ("dot", "general")


@dataclass(frozen=True)
class Seq2SeqInputs:
    """Checked inputs of a seq2seq attention call, with a query-length dimension always present.

    Attributes:
        query: ``(B, L, Dq)`` (``L = 1`` for a single decoder step).
        keys: ``(B, S, Dk)``.
        values: ``(B, S, Dv)``.
        mask: ``None`` or the user's mask viewed as ``(B|1, L|1, S|1)``.
        key_lengths: ``None`` or integer ``(B,)`` in ``[0, S]``.
        single_step: whether the query was given as ``(B, Dq)``; then :meth:`finish` drops ``L``.
    """

    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None
    key_lengths: torch.Tensor | None
    single_step: bool

    def finish(self, context: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, L, Dv), (B, L, S)`` → ``(B, Dv), (B, S)`` for a single step; unchanged otherwise."""
        if self.single_step:
            return context.squeeze(1), weights.squeeze(1)
        return context, weights


def check_seq2seq_inputs(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor | None,
    key_lengths: torch.Tensor | None,
    *,
    query_dim: int,
    key_dim: int,
) -> Seq2SeqInputs:
    """Check the arguments of a seq2seq attention ``forward`` and give the query a length dimension.

    Args:
        query: ``(B, L, Dq)`` or ``(B, Dq)``.
        keys: ``(B, S, Dk)``.
        values: ``(B, S, Dv)``, or ``None`` for ``keys``.
        mask: boolean (``True`` = may attend) or float, broadcastable to ``(B, L, S)``, or to ``(B, S)``
            for a 2-D query.
        key_lengths: integer ``(B,)`` in ``[0, S]``.
        query_dim, key_dim: the expected ``Dq`` and ``Dk``.
    """
    for name, t in (("query", query), ("keys", keys), ("values", values)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if query.ndim not in (2, 3) or query.shape[-1] != query_dim:
        raise ValueError(f"query must have shape (B, L, Dq) or (B, Dq) with Dq={query_dim}; got {tuple(query.shape)}")
    if keys.ndim != 3 or keys.shape[-1] != key_dim:
        raise ValueError(f"keys must have shape (B, S, Dk) with Dk={key_dim}; got {tuple(keys.shape)}")
    if keys.shape[0] != query.shape[0]:
        raise ValueError(
            f"keys has batch size {keys.shape[0]} (shape {tuple(keys.shape)}) but query has {query.shape[0]} "
            f"(shape {tuple(query.shape)}); they must be equal"
        )
    values = keys if values is None else values
    if values.ndim != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"values must have shape (B, S, Dv) with (B, S) = {tuple(keys.shape[:2])} as keys; "
            f"got {tuple(values.shape)}"
        )
    single_step = query.ndim == 2
    batch, src_len = keys.shape[:2]
    if single_step:
        query = query.unsqueeze(1)
    if mask is not None:
        mask = _check_mask(mask, batch, query.shape[1], src_len, single_step)
    if key_lengths is not None:
        _check_key_lengths(key_lengths, batch, src_len)
    return Seq2SeqInputs(query, keys, values, mask, key_lengths, single_step)


def _check_mask(mask: object, batch: int, q_len: int, src_len: int, single_step: bool) -> torch.Tensor:
    """The mask as ``(B|1, L|1, S|1)``, checked to broadcast to ``(B, L, S)`` (``(B, S)``: single step)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor (bool or float) or None; got {type(mask).__name__}")
    target = (batch, src_len) if single_step else (batch, q_len, src_len)
    try:
        ok = mask.ndim <= len(target) and torch.broadcast_shapes(mask.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        expected = "(B, S)" if single_step else "(B, L, S)"
        raise ValueError(f"mask of shape {tuple(mask.shape)} is not broadcastable to {expected} = {target}")
    mask = mask.reshape((1,) * (len(target) - mask.ndim) + tuple(mask.shape))
    return mask.unsqueeze(1) if single_step else mask


def _check_key_lengths(key_lengths: object, batch: int, src_len: int) -> None:
    if not is_integer_tensor(key_lengths):
        got = key_lengths.dtype if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
        raise TypeError(f"key_lengths must be an integer tensor of shape (B,); got {got}")
    if tuple(key_lengths.shape) != (batch,):
        raise ValueError(f"key_lengths must have shape (B,) = ({batch},); got {tuple(key_lengths.shape)}")
    if batch and (int(key_lengths.min()) < 0 or int(key_lengths.max()) > src_len):
        raise ValueError(
            f"key_lengths must lie in [0, S={src_len}]; got values from {int(key_lengths.min())} "
            f"to {int(key_lengths.max())}"
        )


class LuongAttention(nn.Module):
    """Luong (2015) global attention with the "dot" or "general" score.

    Args:
        query_dim: ``Dq``, the decoder state width.
        key_dim: ``Dk``, the encoder state width (default ``Dq``); ``score="dot"`` needs ``Dk == Dq``.
        score: ``"dot"`` (no parameters) or ``"general"``.

    Attributes:
        linear_in: for ``"general"``, ``nn.Linear(Dq, Dk, bias=False)``, so that
            ``W_a = linear_in.weight.T`` (``(Dq, Dk)``). It is applied to the query,
            ``score = (W_aᵀ h_t)·h_s``, which costs one ``Dq×Dk`` product per decoder step and leaves
            the keys unprojected (as OpenNMT's ``GlobalAttention``). ``None`` for ``"dot"``.
    """

    def __init__(self, query_dim: int, key_dim: int | None = None, score: str = "dot") -> None:
        super().__init__()
        int_at_least("query_dim", query_dim, expected="a positive int")
        if key_dim is not None:
            int_at_least("key_dim", key_dim, expected="a positive int")
        one_of("score", score, SCORES)
        key_dim = query_dim if key_dim is None else key_dim
        if score == "dot" and key_dim != query_dim:
            raise ValueError(
                f"score='dot' needs key_dim == query_dim; got query_dim={query_dim}, key_dim={key_dim} "
                "(use score='general' for different widths)"
            )
        self.query_dim = query_dim
        self.key_dim = key_dim
        self.score = score
        self.linear_in = nn.Linear(query_dim, key_dim, bias=False) if score == "general" else None

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score!r}"

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        key_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend from decoder states to encoder states.

        Args:
            query: ``(B, L, Dq)`` decoder states, or ``(B, Dq)`` for a single step.
            keys: ``(B, S, Dk)`` encoder states.
            values: ``(B, S, Dv)``; default ``keys``.
            mask: boolean (``True`` = may attend) or float (added to the scores; the query's dtype or
                float32), broadcastable to ``(B, L, S)``, or ``(B, S)`` for a 2-D query. For padding,
                prefer ``key_lengths`` (a ``(B, S)`` mask with a 3-D query would broadcast against
                ``(L, S)``; use ``mask[:, None, :]``).
            key_lengths: integer ``(B,)``: source positions ``>= key_lengths[b]`` are padding.

        Returns:
            ``(context, weights)``: ``(B, L, Dv)`` and ``(B, L, S)``, or ``(B, Dv)`` and ``(B, S)`` for a 2-D
            query. Rows with no allowed key give zeros.
        """
        inputs = check_seq2seq_inputs(
            query, keys, values, mask, key_lengths, query_dim=self.query_dim, key_dim=self.key_dim
        )
        q = inputs.query if self.linear_in is None else self.linear_in(inputs.query)
        # One head: (B, 1, L, Dk) against (B, 1, S, Dk).
        context, weights = attention(
            q.unsqueeze(1),
            inputs.keys.unsqueeze(1),
            inputs.values.unsqueeze(1),
            mask=None if inputs.mask is None else inputs.mask.unsqueeze(1),
            key_lengths=inputs.key_lengths,
            scale=1.0,
            return_weights=True,
        )
        return inputs.finish(context.squeeze(1), weights.squeeze(1))
