"""Tiny task configs for the task tests: a base config with some of its sections overridden, and the task it
prepares (data read, nothing trained)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from qkv.train.config import Config
from qkv.train.ddp import DistContext
from qkv.train.task import Task

T = TypeVar("T", bound=Task)


def tiny_config(base: dict[str, Any], out: Path, *, output: dict[str, Any] | None = None, **sections: Any) -> Config:
    """``base`` (a raw config without ``output``) with each of ``sections`` updated by the values given, writing
    to ``out`` (plus the ``output`` keys given)."""
    raw: dict[str, Any] = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for name, values in sections.items():
        raw[name].update(values)
    raw["output"] = {"dir": str(out), **(output or {})}
    return Config.from_dict(raw)


def prepared_task(config: Config, kind: type[T]) -> T:
    """The task ``config`` names, checked to be a ``kind``, with its output directory made and its data prepared."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    task = config.task_class(config, DistContext(), lambda line: None)
    assert isinstance(task, kind)
    task.prepare(resume=False)
    return task
