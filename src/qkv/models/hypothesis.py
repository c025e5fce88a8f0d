"""What a search returns (:class:`Hypothesis`) and the bookkeeping greedy and beam search share.

Lengths: a hypothesis' *length* is its number of decoding steps, ``len(tokens) + 1`` when it ended with
EOS and ``len(tokens)`` when the length limit stopped it. Scores divide the summed log-probability by the
GNMT length penalty ``((5 + length) / 6) ** alpha`` (Wu et al., 2016).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qkv.checks import int_at_least
from qkv.models.interface import DecoderOutput, Seq2SeqModel
from qkv.ops.spec import is_integer_tensor


@dataclass
class Hypothesis:
    """One decoded output.

    Attributes:
        tokens: the output ids, without BOS and EOS.
        score: ``log_prob / ((5 + length) / 6) ** length_penalty``; the search's ranking key.
        log_prob: the summed log-probability of the tokens (and of EOS when ``finished``).
        finished: ``True`` when the model produced EOS, ``False`` when the length limit stopped it.
        cross_attention: ``(layers, heads, length, S)`` with ``S`` the sentence's source length, when asked
            for: row ``i`` is the attention of the step that produced output ``i`` (EOS included).
        self_attention: ``(layers, heads, length, length)`` decoder self-attention over the decoder inputs
            (BOS then the tokens), zero above the diagonal, when asked for and the model has any.
    """

    tokens: list[int]
    score: float
    log_prob: float
    finished: bool = True
    cross_attention: torch.Tensor | None = None
    self_attention: torch.Tensor | None = None


def gnmt_length_penalty(length: int, alpha: float) -> float:
    """``((5 + length) / 6) ** alpha``; ``alpha = 0`` ranks by log-probability alone."""
    return ((5 + length) / 6) ** alpha


@contextlib.contextmanager
def eval_no_grad(model: Seq2SeqModel) -> Iterator[None]:
    """Run the block under ``torch.no_grad()`` with ``model`` in eval mode (dropout off), then restore its mode.

    ``no_grad``, not ``torch.inference_mode``: the tensors a search returns (attention in a
    :class:`Hypothesis`) stay ordinary tensors that callers may modify in place or use in autograd.
    """
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if module is not None and was_training:
            module.train()


def length_limits(
    src: torch.Tensor, src_lengths: torch.Tensor, max_len: int | None, ratio: float, extra: int
) -> list[int]:
    """The most decoding steps (EOS included) for each sentence: ``max_len``, or ``int(ratio·len + extra)``."""
    if not isinstance(src, torch.Tensor) or src.ndim != 2 or src.shape[0] == 0:
        got = tuple(src.shape) if isinstance(src, torch.Tensor) else type(src).__name__
        raise ValueError(f"src must be a (B, S) tensor of token ids with B >= 1; got {got}")
    if not is_integer_tensor(src_lengths) or tuple(src_lengths.shape) != (src.shape[0],):
        got_lengths = (
            f"{src_lengths.dtype} {tuple(src_lengths.shape)}"
            if isinstance(src_lengths, torch.Tensor)
            else type(src_lengths).__name__
        )
        raise ValueError(f"src_lengths must be an integer tensor of shape (B,) = ({src.shape[0]},); got {got_lengths}")
    lengths = src_lengths.tolist()
    if min(lengths) < 1 or max(lengths) > src.shape[1]:
        raise ValueError(
            f"src_lengths must lie in [1, S={src.shape[1]}]; got values from {min(lengths)} to {max(lengths)}"
        )
    if max_len is not None:
        int_at_least("max_len", max_len, expected="a positive int or None")
        return [max_len] * len(lengths)
    if ratio < 0 or extra < 0 or (ratio == 0 and extra == 0):
        raise ValueError(f"max_len_ratio and max_len_extra must be >= 0, not both 0; got {ratio}, {extra}")
    return [max(1, int(ratio * n + extra)) for n in lengths]


def last_log_probs(out: DecoderOutput) -> torch.Tensor:
    """Log-softmax of the last position's logits, ``(B, V)``, in float32 (float64 for float64 models)."""
    logits = out.logits[:, -1]
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


class AttentionTrace:
    """Attention rows of every decoding step and each row's parent, to rebuild a hypothesis' attention.

    Search keeps or reorders rows at each step; rather than gathering the whole attention history at every
    step, it records each step's rows (``(R_t, layers, heads, S)``, ``(R_t, layers, heads, t + 1)``) and
    ``parents[t]`` (row of step ``t`` each row of step ``t + 1`` continues), and follows a hypothesis'
    ancestry back when it ends.
    """

    def __init__(self, cross: bool, self_attention: bool) -> None:
        self.want_cross = cross
        self.want_self = self_attention
        self.cross: list[torch.Tensor] = []
        self.self_attention: list[torch.Tensor | None] = []
        self.parents: list[list[int]] = []

    @property
    def wanted(self) -> bool:
        """Whether to ask the model for attention."""
        return self.want_cross or self.want_self

    def add_step(self, out: DecoderOutput) -> None:
        if self.want_cross:
            if out.cross_attention is None:
                raise ValueError("need_attention=True but the model's decode_step returned no cross_attention")
            self.cross.append(out.cross_attention[:, :, :, -1])
        if self.want_self:
            self.self_attention.append(None if out.self_attention is None else out.self_attention[:, :, :, -1])

    def add_parents(self, parents: list[int]) -> None:
        self.parents.append(parents)

    def build(self, row: int, src_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Attention ``(layers, heads, T, S)`` and ``(layers, heads, T, T)`` of the hypothesis ending at ``row``
        of the latest step, ``T`` the number of steps so far."""
        steps = len(self.cross) if self.want_cross else len(self.self_attention)
        rows = [row]
        for t in range(steps - 1, 0, -1):
            rows.append(self.parents[t - 1][rows[-1]])
        rows.reverse()
        cross = None
        if self.want_cross:
            cross = torch.stack([self.cross[t][r, ..., :src_len] for t, r in enumerate(rows)], dim=-2)
        self_attention = None
        recorded = [a for a in self.self_attention if a is not None]
        if self.want_self and len(recorded) == len(self.self_attention):
            padded = [F.pad(a[r], (0, steps - a.shape[-1])) for a, r in zip(recorded, rows, strict=True)]
            self_attention = torch.stack(padded, dim=-2)
        return cross, self_attention

    def hypothesis(
        self, row: int, tokens: list[int], log_prob: float, finished: bool, alpha: float, src_len: int
    ) -> Hypothesis:
        """A :class:`Hypothesis` ending at ``row`` of the latest step."""
        length = len(tokens) + int(finished)
        cross, self_attention = self.build(row, src_len) if self.wanted else (None, None)
        return Hypothesis(
            tokens=list(tokens),
            score=log_prob / gnmt_length_penalty(length, alpha),
            log_prob=log_prob,
            finished=finished,
            cross_attention=cross,
            self_attention=self_attention,
        )
