"""The task interface: what differs between training jobs (translation, language modelling, next: image
classification and text-to-image), behind one small class the trainer calls.

``qkv.train`` in a few lines::

    config = Config.from_dict(yaml)  # config.task picks the Task class and its data/model sections
    log = open_run_dir(config, ctx, resume=...)  # the output directory checked, train.log opened
    task = config.task_class(config, ctx, log.line)  # the class registered in qkv.train.tasks.TASKS
    task.prepare(resume=...)  # data and tokenizers into the model directory
    model = task.build_model()
    Trainer(config, ctx, task=task, model=model, log=log).run()  # optimizer, loop, checkpoints, export

A :class:`Task` owns its data (preparing it into the model directory, its batches), its model (building
it from ``config.model``), the loss of a batch and its validation metrics. The :class:`~qkv.train.trainer.
Trainer` owns only what every task shares: optimizer and schedule, accumulation, clipping, autocast, the
loop and its budget (steps, epochs, wall time), logging, validation cadence and early stopping, checkpoints
with exact resume, averaging and export, DDP. The inference side of a task (``translate``, ``generate``,
``predict``) reads the model directory it wrote and lives beside it (:mod:`qkv.train.translate`, ...).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from qkv.train.config import Config
    from qkv.train.ddp import DistContext


class Batches(Protocol):
    """The training batches of a task: an endless, resumable stream.

    ``state_dict()`` (JSON-able) and ``load_state_dict()`` make ``--resume`` continue with exactly the
    batches an uninterrupted run would have seen; ``epoch`` is the number of completed passes over the
    training data (a float for tasks that sample, e.g. tokens seen / training tokens), which
    ``training.max_epochs`` bounds.
    """

    def __iter__(self) -> Iterator[Any]: ...

    @property
    def epoch(self) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class BatchLoss:
    """The loss of one batch (or of this rank's share of it), *summed* over its ``tokens`` loss terms.

    Attributes:
        loss: the training loss summed over the batch's tokens (a tensor in the graph, e.g. label-smoothed).
        nll: the summed negative log-likelihood, for logging (a float).
        tokens: how many terms were summed (target tokens, predicted tokens, images).
    """

    loss: torch.Tensor
    nll: float
    tokens: int


@dataclass
class Validation:
    """What a task's validation measured.

    Attributes:
        metrics: numbers by name, ``metrics[training.early_stopping_metric]`` among them; written to
            ``metrics.jsonl`` and TensorBoard.
        lines: what the run log shows for it (already formatted), after the trainer's own summary line.
        extra: anything else worth keeping in ``metrics.jsonl`` (JSON-able: an example, signatures).
    """

    metrics: dict[str, float]
    lines: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """One kind of training job; the trainer calls these and nothing else task-specific.

    Class attributes:
        name: the value of ``task:`` in a config (``"translation"``, ``"lm"``).
        data_config, model_config: the config classes of this task's ``data:`` and ``model:`` sections
            (strict: an unknown key is an error naming the valid ones).
        training_config: the config class of the keys of the ``training:`` section that only this task
            reads (e.g. translation's ``valid_beam``), beside the trainer's own; ``None``: none. A key of
            another task is an error naming the task. The parsed sections are ``config.data``,
            ``config.model`` and ``config.task_training``; each class has ``from_dict(data, prefix)`` and
            ``to_dict()`` (:class:`qkv.train.config.Section` gives both).
        metrics: the validation metrics ``training.early_stopping_metric`` may name; the first is its
            default.
        lower_is_better: those of ``metrics`` for which smaller is better (``loss``, ``ppl``).
    """

    name: ClassVar[str]
    data_config: ClassVar[type]
    model_config: ClassVar[type]
    training_config: ClassVar[type | None] = None
    metrics: ClassVar[tuple[str, ...]]
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss", "ppl"})

    def __init__(self, config: Config, ctx: DistContext, log: Callable[[str], None]) -> None:
        self.config, self.ctx, self.log = config, ctx, log

    @abstractmethod
    def prepare(self, *, resume: bool) -> None:
        """Make the data ready: generate or read it, train the tokenizers (or, when ``resume``, reload the
        ones in the model directory), encode. Rank 0 writes files into ``config.output_dir``; the other
        ranks wait (``ddp.barrier``) and read them, so every rank has the same data."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model ``config.model`` describes, sized by the prepared data (e.g. vocabulary sizes), on CPU;
        the trainer seeds the RNG before calling and moves it to the device."""

    @abstractmethod
    def train_batches(self) -> Batches:
        """The training batches (see :class:`Batches`); called once, after :meth:`prepare`."""

    @abstractmethod
    def batch_tokens(self, batch: Any) -> int:
        """How many loss terms ``batch`` has in all ranks together (the trainer divides the summed loss of a
        step by the total over its accumulated batches, so that accumulation and DDP compute the update
        of one larger batch)."""

    @abstractmethod
    def shard(self, batch: Any) -> tuple[Any, float]:
        """This rank's part of ``batch`` and the weight of its loss (1, or 0 for a stand-in part when the
        batch has fewer rows than there are ranks: every rank must run forward and backward under DDP).
        Without DDP: ``(batch, 1.0)``."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> BatchLoss:
        """The summed training loss of ``batch`` (moved to ``device`` here) under ``model`` (in train mode;
        the trainer handles autocast, accumulation, scaling and backward)."""

    @abstractmethod
    def validate(self, model: nn.Module, device: torch.device, step: int) -> Validation:
        """Validation metrics of ``model`` (rank 0 only; eval mode, ``no_grad`` and autocast are the
        trainer's)."""

    def save_model(self, model: nn.Module, directory: Path) -> None:
        """Write the model files of the model directory (``model.safetensors`` and ``config.json`` by
        default, :func:`qkv.models.checkpoint.save_model`) into ``directory``, a temporary directory whose
        files the trainer then moves into the model directory (so a reader never sees half a file)."""
        from qkv.models.checkpoint import save_model

        save_model(model, directory)

    def score_test(self, model: nn.Module, device: torch.device) -> Validation | None:
        """The exported model's scores on a test split, when the config names one (``None``: none)."""
        return None

    def describe(self) -> str:
        """One line on the data for the start of the log, e.g. ``"4,800 training pairs, 600 valid pairs"``."""
        return ""
