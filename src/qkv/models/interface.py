"""The one interface every sequence-to-sequence model implements, so search and training need no
knowledge of the architecture (Transformer or RNN).

Token ids: ``src (B, S)`` and ``tgt (B, T)`` are ``long``; padding is ``pad_id`` and a target sequence
starts with ``bos_id`` and ends with ``eos_id`` (ids chosen by the vocabulary, stored in the config).

Attention capture: every cross-attention tensor has the shape ``(B, layers, heads, T, S)`` (an RNN
reports ``layers = heads = 1``), every decoder self-attention ``(B, layers, heads, T, T')`` and encoder
self-attention ``(B, layers, heads, S, S)``, so one plotting routine serves every model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class EncoderOutput:
    """What the decoder reads from the source.

    Attributes:
        memory: ``(B, S, E)`` encoder states.
        src_lengths: ``(B,)`` number of real (non-pad) source tokens.
        self_attention: ``(B, layers, heads, S, S)`` encoder self-attention, when asked for.
        extras: model-specific tensors with a leading batch dimension (e.g. an RNN's final state).
    """

    memory: torch.Tensor
    src_lengths: torch.Tensor
    self_attention: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def reorder(self, indices: torch.Tensor) -> EncoderOutput:
        """A copy whose batch rows are ``indices`` (beam expansion / reordering)."""
        return EncoderOutput(
            memory=self.memory.index_select(0, indices),
            src_lengths=self.src_lengths.index_select(0, indices),
            self_attention=None if self.self_attention is None else self.self_attention.index_select(0, indices),
            extras={name: t.index_select(0, indices) for name, t in self.extras.items()},
        )


@runtime_checkable
class DecoderState(Protocol):
    """Incremental decoding state (KV caches, RNN hidden state, input feeding...)."""

    def reorder(self, indices: torch.Tensor) -> None:
        """Keep batch rows ``indices`` (in that order), in place."""


@dataclass
class DecoderOutput:
    """Logits and, when asked for, the attention of the decoded positions.

    Attributes:
        logits: ``(B, T, V)``.
        cross_attention: ``(B, layers, heads, T, S)`` or ``None``.
        self_attention: ``(B, layers, heads, T, T_total)`` or ``None``.
    """

    logits: torch.Tensor
    cross_attention: torch.Tensor | None = None
    self_attention: torch.Tensor | None = None


@runtime_checkable
class Seq2SeqModel(Protocol):
    """An encoder-decoder with teacher-forced ``forward`` and cached, incremental ``decode_step``."""

    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, *, need_attention: bool = False) -> EncoderOutput:
        """``src (B, S)``, ``src_lengths (B,)`` → :class:`EncoderOutput`."""
        ...

    def start_state(self, encoder_out: EncoderOutput) -> DecoderState:
        """A fresh decoding state for ``encoder_out``'s batch."""
        ...

    def decode_step(
        self, tokens: torch.Tensor, encoder_out: EncoderOutput, state: DecoderState, *, need_attention: bool = False
    ) -> DecoderOutput:
        """Decode the next ``tokens (B, T)`` (usually ``T = 1``) given everything already in ``state``,
        which is updated in place; cost O(current length) per step for a Transformer."""
        ...

    def forward(
        self, src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, *, need_attention: bool = False
    ) -> DecoderOutput:
        """Teacher-forced: ``tgt (B, T)`` decoder input (starting with ``bos_id``) → logits ``(B, T, V)``."""
        ...
