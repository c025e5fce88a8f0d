"""The tasks qkv trains: the one registry of ``task:`` names.

Each entry names its :class:`~qkv.train.task.Task` class as ``"module:Class"``, imported only when a config
asks for it (:func:`task_class`), so reading a translation config does not import the language-modelling
code, and a task's module can be written without touching the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qkv.train.config import ConfigError
from qkv.train.safe_yaml import short_repr

if TYPE_CHECKING:
    from qkv.train.task import Task

TASKS: dict[str, str] = {
    "translation": "qkv.train.tasks.translation:TranslationTask",
    "lm": "qkv.train.tasks.lm:LanguageModelingTask",
    "image_classification": "qkv.train.tasks.image:ImageClassificationTask",
    "text_to_image": "qkv.train.tasks.text_to_image:TextToImageTask",
}


def task_class(name: Any) -> type[Task]:
    """The :class:`~qkv.train.task.Task` subclass registered as ``name``.

    Raises:
        ConfigError: ``name`` is not a registered task (the message lists them), or its module cannot be
            imported.
    """
    from qkv.train.task import Task

    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"unknown task {short_repr(name)}; known tasks: {', '.join(TASKS)}")
    module_name, _, class_name = TASKS[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"task {name} cannot be loaded ({TASKS[name]}): {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)) or cls.name != name:
        raise ConfigError(f"{TASKS[name]} is not a qkv.train.task.Task subclass named {name!r}")
    return cls


__all__ = ["TASKS", "task_class"]
