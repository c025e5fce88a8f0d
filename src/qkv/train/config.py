"""The training configuration: a YAML file with a task and four sections, parsed into validated dataclasses.

::

    task:      what to train: translation (the default, so a config without it is one) or lm; the names
               are those of the registry :data:`qkv.train.tasks.TASKS`
    data:      what to train on and how to tokenize it     (the task's ``data_config``)
    model:     the architecture and its hyper-parameters     (the task's ``model_config``)
    training:  the trainer's keys (:class:`TrainingConfig`: optimisation, schedule, budget, validation,
               early stopping) and the task's own (its ``training_config``, e.g. translation's
               ``valid_beam``), side by side
    output:    where the model directory goes, checkpoints, logs

``qkv/configs/reference.yaml`` (``qkv train reference``) lists every option with a comment. Every key is
checked when the file is read: an unknown key is an error naming it and listing the valid keys of its section
(a key of another task's ``training:`` keys names that task), and a bad value is an error naming the key,
e.g. ``training.lr must be a positive number; got -1``. ``--set training.lr=1e-3`` on the command line
overrides a key before validation; the value is parsed as YAML (``null``, ``true``, ``[0.9, 0.98]``,
numbers), so it has the type it would have in the file.

Numbers written ``5e-4`` are read as numbers (:mod:`qkv.train.safe_yaml` resolves them): YAML 1.1 (PyYAML)
reads an exponent without a dot as a string, which would otherwise make ``lr: 5e-4`` an error.

The budget: ``training.max_steps``, ``max_epochs`` and ``max_time`` (:mod:`qkv.train.budget`), whichever
comes first. With none of them set a run takes :data:`DEFAULT_MAX_STEPS` steps; ``max_steps: null`` with no
other budget is an error (a run must end). The cosine schedule needs ``max_steps``: it is where the curve
ends (an epoch or time budget may still end the run earlier).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

# One error type for every bad argument or config value, whichever layer checks it, and one strict config
# base class (qkv.checks): the sections here and the tasks' sections are all StrictConfig dataclasses.
from qkv.checks import (
    ConfigError,
    StrictConfig,
    boolean,
    int_at_least,
    non_negative_number,
    one_of,
    option,
    optional,
    positive_number,
    required,
    short_repr,
    text,
)
from qkv.safe_files import MiB, read_regular_file
from qkv.train.budget import parse_duration
from qkv.train.safe_yaml import YAMLTooLargeError, load_yaml
from qkv.train.schedule import SCHEDULE_KINDS

if TYPE_CHECKING:
    from qkv.train.task import Task

DEFAULT_TASK = "translation"
DEFAULT_MAX_STEPS = 10_000
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
EXPORTS = ("best", "last", "averaged")
# A config is a few KiB; a bigger file is a mistake (or /dev/zero), not something to read into memory.
MAX_CONFIG_BYTES = 4 * MiB


def betas(name: str, value: Any) -> list[float]:
    """Adam's ``[beta1, beta2]``: two numbers in ``[0, 1)``."""
    if not (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in value)
    ):
        raise ConfigError(f"{name} must be a list of two numbers in [0, 1), e.g. [0.9, 0.98]; got {short_repr(value)}")
    return [float(b) for b in value]


def duration(name: str, value: Any) -> float:
    """Seconds of a duration such as ``90``, ``"30m"`` or ``"2h"`` (:func:`qkv.train.budget.parse_duration`)."""
    try:
        return parse_duration(value)
    except ValueError:
        from qkv.train.budget import DURATION_HELP

        raise ConfigError(f"{name} must be {DURATION_HELP}; got {short_repr(value)}") from None


@dataclass
class TrainingConfig(StrictConfig):
    """The ``training:`` keys every task shares (the trainer reads them); a task adds its own beside them."""

    seed: int = option(0, int_at_least, 0)
    max_steps: int | None = option(None, optional(int_at_least), 1)
    max_epochs: float | None = option(None, optional(positive_number))
    max_time: float | None = option(None, optional(duration))
    accumulate: int = option(1, int_at_least, 1)
    lr: float = option(5e-4, positive_number)
    betas: list[float] = option([0.9, 0.98], betas)
    adam_eps: float = option(1e-9, positive_number)
    weight_decay: float = option(0.0, non_negative_number)
    schedule: str = option("inverse_sqrt", one_of, SCHEDULE_KINDS)
    warmup_steps: int = option(4000, int_at_least, 0)
    min_lr: float = option(0.0, non_negative_number)
    clip_norm: float | None = option(1.0, optional(positive_number))
    precision: str = option("fp32", one_of, PRECISIONS)
    device: str = option("auto", one_of, DEVICES)
    valid_every: int = option(1000, int_at_least, 1)
    early_stopping_metric: str | None = option(None, optional(text))
    patience: int | None = option(None, optional(int_at_least), 1)

    @classmethod
    def from_dict(cls, data: Any, prefix: str = "training") -> TrainingConfig:
        config = super().from_dict(data, prefix)
        if config.max_steps is None and config.max_epochs is None and config.max_time is None:
            if isinstance(data, Mapping) and "max_steps" in data:
                raise ConfigError(
                    f"{prefix}.max_steps is null and no other budget is set: give {prefix}.max_steps, "
                    f"{prefix}.max_epochs or {prefix}.max_time (a run must end)"
                )
            config.max_steps = DEFAULT_MAX_STEPS
        if config.schedule == "cosine" and config.max_steps is None:
            raise ConfigError(
                f"{prefix}.schedule cosine needs {prefix}.max_steps (where the curve ends); an epoch or time "
                "budget may still end the run before it"
            )
        return config

    def check(self, prefix: str) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr must be <= {prefix}.lr; got {self.min_lr} > {self.lr}")


@dataclass
class OutputConfig(StrictConfig):
    dir: str = required(text)
    checkpoint_every: int = option(1000, int_at_least, 1)
    keep_last: int = option(3, int_at_least, 1)
    average_last: int = option(0, int_at_least, 0)
    export: str = option("best", one_of, EXPORTS)
    log_every: int = option(100, int_at_least, 1)
    progress_bar: bool = option(True, boolean)
    tensorboard: bool = option(False, boolean)

    def check(self, prefix: str) -> None:
        if self.average_last > self.keep_last:
            raise ConfigError(
                f"{prefix}.average_last ({self.average_last}) must be <= {prefix}.keep_last ({self.keep_last}): "
                "only kept checkpoints can be averaged"
            )
        if self.average_last == 1:
            raise ConfigError(f"{prefix}.average_last must be 0 (off) or >= 2; got 1")
        if self.export == "averaged" and self.average_last < 2:
            raise ConfigError(f"{prefix}.export: averaged needs {prefix}.average_last >= 2; got {self.average_last}")


SECTIONS = ("data", "model", "training", "output")
TOP_LEVEL = ("task", *SECTIONS)


def _task_class(name: Any) -> type[Task]:
    from qkv.train.tasks import task_class

    return task_class(name)


def _split_training(data: Any, task: type[Task]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``training:`` mapping cut into the trainer's keys and the task's; a key of neither is an error
    naming the task it belongs to, if another task has it."""
    if data is None:
        return {}, {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"training must be a mapping of keys to values; got {short_repr(data)}")
    shared = [f.name for f in fields(TrainingConfig)]
    own = [f.name for f in fields(task.training_config)] if task.training_config is not None else []  # type: ignore[arg-type]
    for key in data:
        if key in shared or key in own:
            continue
        owners = _other_tasks_with_training_key(key, task.name)
        if owners:
            raise ConfigError(
                f"training.{key} is a key of task {' and '.join(owners)}, not of task {task.name} "
                f"(the config's task); valid keys of training for {task.name}: {', '.join(shared + own)}"
            )
        raise ConfigError(f"unknown key training.{key}; valid keys of training: {', '.join(shared + own)}")
    return {k: v for k, v in data.items() if k in shared}, {k: v for k, v in data.items() if k in own}


def _other_tasks_with_training_key(key: str, current: str) -> list[str]:
    from qkv.train.tasks import TASKS, task_class

    owners = []
    for name in TASKS:
        if name == current:
            continue
        try:
            other = task_class(name)
        except ConfigError:  # a task that cannot be imported here owns nothing we can name
            continue
        if other.training_config is not None and key in {f.name for f in fields(other.training_config)}:  # type: ignore[arg-type]
            owners.append(name)
    return owners


@dataclass
class Config:
    """The whole training configuration (see the module docstring).

    Attributes:
        task: the task's name (a key of :data:`qkv.train.tasks.TASKS`).
        data, model: the ``data:`` and ``model:`` sections, parsed by the task's ``data_config`` and
            ``model_config``.
        training: the trainer's ``training:`` keys.
        task_training: the task's ``training:`` keys (an instance of its ``training_config``; ``None`` when
            it has none).
        output: the ``output:`` section.
    """

    task: str
    data: Any
    model: Any
    training: TrainingConfig
    task_training: Any
    output: OutputConfig

    @classmethod
    def from_dict(cls, data: Any) -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a config is a mapping with the key task and the sections {', '.join(SECTIONS)}; got "
                f"{short_repr(data)}"
            )
        for key in data:
            if key not in TOP_LEVEL:
                raise ConfigError(f"unknown section {key}; valid top-level keys: {', '.join(TOP_LEVEL)}")
        if "output" not in data:
            raise ConfigError("output.dir is required (the model directory training writes)")
        task = _task_class(data.get("task", DEFAULT_TASK))
        shared, own = _split_training(data.get("training"), task)
        training = TrainingConfig.from_dict(shared, "training")
        task_training = task.training_config.from_dict(own, "training") if task.training_config else None  # type: ignore[attr-defined]
        metric = training.early_stopping_metric
        if metric is None:
            training.early_stopping_metric = task.metrics[0]
        elif metric not in task.metrics:
            raise ConfigError(
                f"training.early_stopping_metric must be one of {', '.join(task.metrics)} (the metrics of task "
                f"{task.name}); got {short_repr(metric)}"
            )
        return cls(
            task=task.name,
            data=task.data_config.from_dict(data.get("data"), "data"),  # type: ignore[attr-defined]
            model=task.model_config.from_dict(data.get("model"), "model"),  # type: ignore[attr-defined]
            training=training,
            task_training=task_training,
            output=OutputConfig.from_dict(data.get("output"), "output"),
        )

    @property
    def task_class(self) -> type[Task]:
        """The :class:`~qkv.train.task.Task` subclass of :attr:`task`."""
        return _task_class(self.task)

    @property
    def metric(self) -> str:
        """``training.early_stopping_metric``, resolved (never ``None`` after :meth:`from_dict`)."""
        metric = self.training.early_stopping_metric
        assert metric is not None, "Config.from_dict sets the task's default metric"
        return metric

    def to_dict(self) -> dict[str, Any]:
        training = self.training.to_dict()
        if self.task_training is not None:
            training.update(self.task_training.to_dict())
        return {
            "task": self.task,
            "data": self.data.to_dict(),
            "model": self.model.to_dict(),
            "training": training,
            "output": self.output.to_dict(),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.lr=1e-3"`` → ``(["training", "lr"], 0.001)``; the value is parsed as YAML. ``task=lm``
    sets the top-level ``task``."""
    key, sep, raw = item.partition("=")
    path = key.strip().split(".")
    if not sep or not key.strip() or any(not part for part in path):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key, e.g. training.lr=0.001; got {short_repr(item)}")
    if path[0] not in TOP_LEVEL:
        raise ConfigError(f"--set {item}: unknown section {path[0]}; valid top-level keys: {', '.join(TOP_LEVEL)}")
    if path[0] == "task" and len(path) > 1:
        raise ConfigError(f"--set {item}: task is a value, not a section; e.g. task=lm")
    if path[0] != "task" and len(path) < 2:
        raise ConfigError(f"--set {item}: name a key inside the {path[0]} section, e.g. {path[0]}.KEY=VALUE")
    try:
        value = load_yaml(raw)
    except YAMLTooLargeError as e:
        raise ConfigError(f"--set {short_repr(item)}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML: {e}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``KEY=VALUE`` of ``overrides`` set (creating sections as needed), in place."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {'.'.join(path[: depth + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


BUILTIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself, or, for a name like ``demo`` with no such file, qkv's built-in ``demo.yaml``."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (BUILTIN_CONFIGS / f"{path}.yaml").is_file():
        return BUILTIN_CONFIGS / f"{path}.yaml"
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (an empty file is ``{}``); a bare name such as ``demo`` or
    ``reference`` names one of qkv's built-in configs."""
    path = resolve_config_path(path)
    try:
        data_bytes = read_regular_file(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"cannot read config: {e}") from None
    try:
        raw = data_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data_bytes.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"config {path} is not UTF-8 text: byte 0x{data_bytes[e.start]:02x} on line {line}; save it as UTF-8"
        ) from None
    try:
        data = load_yaml(raw)
    except YAMLTooLargeError as e:
        raise ConfigError(f"config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping with the key task and the sections {', '.join(SECTIONS)}")
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a YAML config; :class:`ConfigError` names the key at fault."""
    return Config.from_dict(apply_overrides(read_yaml(path), overrides))
