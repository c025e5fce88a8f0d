"""The training batches of the text-to-image task: images, their prompts, and the flow's draws.

Batch ``k`` is a function of ``k`` alone: its rows are batch ``k % per_epoch`` of a permutation drawn for its
epoch, and its noise, times, dropped prompts and flips come from a generator seeded by ``(seed, k)``, so a
resumed run sees the batches an uninterrupted one would (:meth:`FlowBatches.state_dict` is just ``k``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from qkv.data.shuffled_batches import ShuffledBatches
from qkv.models.diffusion import logit_normal_times

if TYPE_CHECKING:
    from qkv.train.tasks.text_to_image import CaptionedSplit


class FlowBatch(NamedTuple):
    """One training batch: ``images, noise (B, C, H, W)``, ``tokens (B, S)``, ``lengths, times, drop (B,)``, and
    ``targets``: the patches each word names, ``(B, S, h, w)`` (:mod:`.text_to_image_grounding`), or ``(B, 0)``
    when training does not ground the words."""

    images: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    noise: torch.Tensor
    times: torch.Tensor
    drop: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device | str) -> FlowBatch:
        return FlowBatch(*(t.to(device) for t in self))

    def rows(self, rows: list[int]) -> FlowBatch:
        return FlowBatch(*(t[rows] for t in self))


def flow_draws(
    rng: np.random.Generator, shape: tuple[int, ...], shift: float = 1.0, shifted: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise (B, C, H, W), times (B,))``: Gaussian noise and logit-normal times
    (:func:`~qkv.models.diffusion.logit_normal_times`) drawn from ``rng``, a share ``shifted`` of them (the first
    rows) shifted by ``shift``."""
    noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    normal = torch.from_numpy(rng.standard_normal(shape[0], dtype=np.float32))
    count = round(shifted * shape[0])
    times = torch.cat([logit_normal_times(normal[:count], shift), logit_normal_times(normal[count:])])
    return noise, times


class FlowBatches(ShuffledBatches[FlowBatch]):
    """Endless training batches: each epoch a fresh shuffle of the images; batch ``k`` depends only on ``k``
    (its rows, noise, times and dropped prompts come from generators seeded by ``(seed, ...)``), so
    :meth:`state_dict` is just ``k``.

    Args:
        split: the training split. tokens, lengths: its captions encoded (``(N, S)``, ``(N,)``).
        batch_size: images per batch. seed: the seed of everything drawn. prompt_dropout: the chance that an
            image's prompt is dropped (classifier-free guidance).
        mirror: the token ids of ``left`` and ``right``: half the images are flipped horizontally and these
            two words swapped in their captions (``None``: no flips).
        time_shift, shifted_times: see :func:`flow_draws`.
        targets: ``(N, S, h, w)``, the patches each word of each caption names (flipped with their image), or
            ``None``.
    """

    def __init__(
        self,
        split: CaptionedSplit,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        *,
        batch_size: int,
        seed: int,
        prompt_dropout: float,
        mirror: tuple[int, int] | None = None,
        time_shift: float = 1.0,
        shifted_times: float = 1.0,
        targets: torch.Tensor | None = None,
    ) -> None:
        super().__init__(len(split), batch_size=batch_size, seed=seed)
        self.split, self.tokens, self.lengths = split, tokens, lengths
        self.prompt_dropout, self.mirror = prompt_dropout, mirror
        self.time_shift, self.shifted_times = time_shift, shifted_times
        self.targets = torch.zeros(len(split), 0) if targets is None else targets

    def batch(self, k: int) -> FlowBatch:
        """Batch number ``k``."""
        rows = self.rows(k)
        images = self.split.images[rows]
        rng = self.draws(k)
        noise, times = flow_draws(rng, tuple(images.shape), self.time_shift, self.shifted_times)
        drop = torch.from_numpy(rng.random(len(rows)) < self.prompt_dropout)
        tokens, targets = self.tokens[rows], self.targets[rows]
        if self.mirror is not None:
            flip = torch.from_numpy(rng.random(len(rows)) < 0.5)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            left, right = self.mirror
            swapped = torch.where(tokens == left, right, torch.where(tokens == right, left, tokens))
            tokens = torch.where(flip[:, None], swapped, tokens)
            if targets.ndim == 4:
                targets = torch.where(flip[:, None, None, None], targets.flip(-1), targets)
        return FlowBatch(images, tokens, self.lengths[rows], noise, times, drop, targets)
