"""``ShuffledBatches``: endless, resumable batches of a fixed set of examples, reshuffled every epoch.

Batch ``k`` is batch ``k % per_epoch`` of epoch ``k // per_epoch``, whose order is a permutation drawn with a
generator seeded by ``(seed, epoch)``; a subclass draws whatever else a batch needs (augmentation, noise)
from a generator seeded by ``(seed, k, 1)`` (:meth:`ShuffledBatches.draws`). So a batch depends only on
``k``, :meth:`~ShuffledBatches.state_dict` is just ``k``, and a resumed run sees the batches an
uninterrupted one would. The image classifier's and the text-to-image task's batches are built on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from qkv.data.parallel import DataError

BatchT = TypeVar("BatchT")


class ShuffledBatches(ABC, Generic[BatchT]):
    """Batches of ``size`` examples, ``batch_size`` at a time (the last of an epoch may have fewer).

    Args:
        size: the number of examples (at least 1).
        batch_size: examples per batch (an int >= 1).
        seed: the seed of the shuffles and of every draw.
    """

    def __init__(self, size: int, *, batch_size: int, seed: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if size == 0:
            raise DataError("there are no training images")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.per_epoch = -(-size // batch_size)
        self.batches = 0
        self._order: tuple[int, np.ndarray] | None = None

    def rows(self, k: int) -> torch.Tensor:
        """The example indices of batch ``k``: ``(B,)`` int64."""
        epoch, index = divmod(k, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.size))
        return torch.from_numpy(self._order[1][index * self.batch_size : (index + 1) * self.batch_size])

    def draws(self, k: int) -> np.random.Generator:
        """The generator of batch ``k``'s random draws beyond its rows."""
        return np.random.default_rng((self.seed, k, 1))

    @abstractmethod
    def batch(self, k: int) -> BatchT:
        """Batch number ``k``."""

    def __iter__(self) -> Iterator[BatchT]:
        while True:
            k = self.batches
            self.batches += 1  # counted when handed out: a checkpoint after it resumes with the next one
            yield self.batch(k)

    @property
    def epoch(self) -> float:
        """Passes over the examples so far (batches / batches per epoch)."""
        return self.batches / self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed, "images": self.size, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after ``state["batches"]`` batches; ``DataError`` if it comes from another stream."""
        batches = state.get("batches")
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise DataError(f"the saved batch position must be an integer >= 0; got {batches!r}")
        saved = (state.get("seed"), state.get("images"), state.get("batch_size"))
        if saved != (self.seed, self.size, self.batch_size):
            raise DataError(
                f"the saved batch position belongs to a stream of {saved[1]} images, seed {saved[0]}, batch size "
                f"{saved[2]}, not this one ({self.size} images, seed {self.seed}, batch size "
                f"{self.batch_size}); the data changed since the checkpoint"
            )
        self.batches = batches
