"""The training batches of the text-to-image task: images, their prompts, and the flow's draws.

Batch ``k`` is a function of ``k`` alone: its rows are batch ``k % per_epoch`` of a permutation drawn for its
epoch, and its noise, times, dropped prompts and flips come from a generator seeded by ``(seed, k)``, so a
resumed run sees the batches an uninterrupted one would (:meth:`FlowBatches.state_dict` is just ``k``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from qkv.data.parallel import DataError
from qkv.models.diffusion import logit_normal_times

if TYPE_CHECKING:
    from qkv.train.tasks.text_to_image import CaptionedSplit


class FlowBatch(NamedTuple):
    """One training batch: ``images, noise (B, C, H, W)``, ``tokens (B, S)``, ``lengths, times, drop (B,)``."""

    images: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    noise: torch.Tensor
    times: torch.Tensor
    drop: torch.Tensor

    def to(self, device: torch.device | str) -> FlowBatch:
        return FlowBatch(*(t.to(device) for t in self))

    def rows(self, rows: list[int]) -> FlowBatch:
        return FlowBatch(*(t[rows] for t in self))


def flow_draws(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise (B, C, H, W), times (B,))``: Gaussian noise and logit-normal times
    (:func:`~qkv.models.diffusion.logit_normal_times`) drawn from ``rng``."""
    noise = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    times = logit_normal_times(torch.from_numpy(rng.standard_normal(shape[0], dtype=np.float32)))
    return noise, times


class FlowBatches:
    """Endless training batches: each epoch a fresh shuffle of the images; batch ``k`` depends only on ``k``
    (its rows, noise, times and dropped prompts come from generators seeded by ``(seed, ...)``), so
    :meth:`state_dict` is just ``k``.

    Args:
        split: the training split. tokens, lengths: its captions encoded (``(N, S)``, ``(N,)``).
        batch_size: images per batch. seed: the seed of everything drawn. prompt_dropout: the chance that an
            image's prompt is dropped (classifier-free guidance).
        mirror: the token ids of ``left`` and ``right``: half the images are flipped horizontally and these
            two words swapped in their captions (``None``: no flips).
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
    ) -> None:
        if len(split) == 0:
            raise DataError("there are no training images")
        self.split, self.tokens, self.lengths = split, tokens, lengths
        self.batch_size, self.seed, self.prompt_dropout = batch_size, seed, prompt_dropout
        self.mirror = mirror
        self.per_epoch = -(-len(split) // batch_size)
        self.batches = 0

    def batch(self, k: int) -> FlowBatch:
        """Batch number ``k``."""
        epoch, index = divmod(k, self.per_epoch)
        order = np.random.default_rng((self.seed, epoch)).permutation(len(self.split))
        rows = torch.from_numpy(order[index * self.batch_size : (index + 1) * self.batch_size])
        images = self.split.images[rows]
        rng = np.random.default_rng((self.seed, k, 1))
        noise, times = flow_draws(rng, tuple(images.shape))
        drop = torch.from_numpy(rng.random(len(rows)) < self.prompt_dropout)
        tokens = self.tokens[rows]
        if self.mirror is not None:
            flip = torch.from_numpy(rng.random(len(rows)) < 0.5)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            left, right = self.mirror
            swapped = torch.where(tokens == left, right, torch.where(tokens == right, left, tokens))
            tokens = torch.where(flip[:, None], swapped, tokens)
        return FlowBatch(images, tokens, self.lengths[rows], noise, times, drop)

    def __iter__(self) -> Iterator[FlowBatch]:
        while True:
            k = self.batches
            self.batches += 1  # counted when handed out: a checkpoint after it resumes with the next one
            yield self.batch(k)

    @property
    def epoch(self) -> float:
        return self.batches / self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed, "images": len(self.split), "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after ``state["batches"]`` batches; ``DataError`` if it comes from another stream."""
        batches = state.get("batches")
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise DataError(f"the saved batch position must be an integer >= 0; got {batches!r}")
        saved = (state.get("seed"), state.get("images"), state.get("batch_size"))
        if saved != (self.seed, len(self.split), self.batch_size):
            raise DataError(
                f"the saved batch position belongs to a stream of {saved[1]} images, seed {saved[0]}, batch size "
                f"{saved[2]}, not this one ({len(self.split)} images, seed {self.seed}, batch size "
                f"{self.batch_size}); the data changed since the checkpoint"
            )
        self.batches = batches
