"""The output directory of a run, checked and tidied before any work is done.

``output.dir`` becomes the model directory::

    train_config.yaml   the configuration as run (overrides applied); ``--resume`` compares against it
    train.log, metrics.jsonl, tensorboard/   the run's record (:mod:`qkv.train.run_log`)
    checkpoints/        step, best and averaged checkpoints (:mod:`qkv.train.checkpoint_io`)
    ...                 the task's files: data, tokenizers, the exported model

:func:`open_run_dir` refuses a directory that cannot be written, and one that already holds checkpoints
unless the run resumes; a resumed run must have the task, data and model settings it started with. It
removes what a killed run left (unfinished checkpoint and export files) and writes ``train_config.yaml``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qkv.train import checkpoint_io as ckpt
from qkv.train.config import DEFAULT_TASK, Config, ConfigError, read_yaml
from qkv.train.ddp import DistContext, barrier
from qkv.train.errors import TrainError
from qkv.train.export import remove_unfinished_exports
from qkv.train.run_log import RunLog, echo_line
from qkv.train.safe_yaml import short_repr

CHECKPOINT_DIR = "checkpoints"
TRAIN_CONFIG_FILE = "train_config.yaml"


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and check a file can be created in it (before any work is done)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise TrainError(
            f"output.dir {directory} cannot be written: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename and str(e.filename) != str(directory) else "")
            + "; choose a directory you can write (--set output.dir=...)"
        ) from None


def _normalised(section_class: Any, raw: Any, prefix: str) -> Any:
    """``raw`` parsed by ``section_class`` and written back (defaults filled in), so that a key added to a
    section since the run started does not count as a change; ``raw`` itself if it does not parse."""
    try:
        return section_class.from_dict(raw, prefix).to_dict()
    except ConfigError:
        return raw or {}


def check_resumable(config: Config) -> None:
    """Raise :class:`TrainError` unless ``config`` has the task, data and model settings of the run saved in
    its output directory (nothing to compare when there is no ``train_config.yaml``)."""
    saved_path = config.output_dir / TRAIN_CONFIG_FILE
    if not saved_path.is_file():
        return
    saved = read_yaml(saved_path)
    saved_task = saved.get("task", DEFAULT_TASK)  # written before tasks existed: translation
    if saved_task != config.task:
        raise TrainError(
            f"cannot resume: {saved_path} is a run of task {short_repr(saved_task)} but the config's task is "
            f"{config.task!r}; set output.dir to a new directory"
        )
    now = config.to_dict()
    task = config.task_class
    for section, section_class in (("data", task.data_config), ("model", task.model_config)):
        before: Mapping[str, Any] = _normalised(section_class, saved.get(section), section)
        after: Mapping[str, Any] = now[section]
        changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
        if changed:
            k = changed[0]
            raise TrainError(
                f"cannot resume: {section}.{k} was {short_repr(before.get(k))} in {saved_path} but is "
                f"{short_repr(after.get(k))} now; a resumed run needs the same data and model settings"
            )


def open_run_dir(config: Config, ctx: DistContext, *, resume: bool, echo: Callable[[str], None] = echo_line) -> RunLog:
    """Check and tidy ``config.output_dir`` (see the module docstring) and open its log (rank 0 writes)."""
    out = config.output_dir
    if ctx.is_main:
        check_writable(out)
    barrier(ctx)
    existing = ckpt.step_checkpoints(out / CHECKPOINT_DIR)
    if existing and not resume:
        raise TrainError(
            f"{out} already has training checkpoints (up to step {existing[-1][0]}); pass --resume to "
            "continue that run, or set output.dir to a new directory"
        )
    if resume:
        check_resumable(config)
    barrier(ctx)  # every rank has read the saved config before rank 0 replaces it
    log = RunLog(out, enabled=ctx.is_main, tensorboard=config.output.tensorboard, echo=echo)
    if ctx.is_main:
        removed = ckpt.clean_temp_files(out / CHECKPOINT_DIR)
        if removed:
            log.line(f"removed {len(removed)} unfinished checkpoint file(s) of an interrupted run")
        exports = remove_unfinished_exports(out)
        if exports:
            log.line(f"removed {exports} unfinished export director(ies) of an interrupted run")
        ckpt.atomic_write(out / TRAIN_CONFIG_FILE, config.to_yaml().encode("utf-8"))
    return log
