"""The end of a run: averaging the last checkpoints and writing the chosen weights into the model directory.

``output.export`` picks the weights: ``best`` (``checkpoints/best.safetensors``), ``last`` (the model as
training left it) or ``averaged`` (the element-wise mean of the last ``output.average_last`` step
checkpoints, also kept as ``checkpoints/averaged.safetensors``). The task writes its model files
(:meth:`~qkv.train.task.Task.save_model`) into a temporary directory beside the target, and each file is
then ``os.replace``-d into place, so a reader never sees a half-written ``model.safetensors``; a kill
during the export leaves a ``.export-*`` directory, which the next run removes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

from qkv.train import checkpoint_io as ckpt
from qkv.train.errors import write_failure

EXPORT_TEMP_PREFIX = ".export-"


def export_files(save: Callable[[Path], None], directory: Path) -> None:
    """``save(tmp)`` into a temporary directory beside ``directory``, then each file ``os.replace``-d into
    ``directory`` (see the module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix=EXPORT_TEMP_PREFIX, dir=directory))
    try:
        save(tmp)
        for item in tmp.iterdir():
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_model(model: nn.Module, directory: Path) -> None:
    """A model that :func:`qkv.models.checkpoint.save_model` knows, exported into ``directory`` atomically."""
    from qkv.models.checkpoint import save_model

    def save(tmp: Path) -> None:
        save_model(model, tmp)

    export_files(save, directory)


def remove_unfinished_exports(directory: Path) -> int:
    """Delete the ``.export-*`` directories a killed export left in ``directory``; returns how many."""
    leftovers = [p for p in directory.glob(f"{EXPORT_TEMP_PREFIX}*") if p.is_dir()]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)


def average_last(checkpoint_dir: Path, count: int) -> list[int]:
    """Write ``averaged.safetensors``, the mean of the newest ``count`` step checkpoints; returns their steps."""
    steps = ckpt.step_checkpoints(checkpoint_dir)[-count:]
    averaged = ckpt.average_checkpoints([p for _, p in steps])
    path = checkpoint_dir / ckpt.AVERAGED_FILE
    try:
        ckpt.save_checkpoint(path, averaged, state={"steps": [s for s, _ in steps]})
    except OSError as e:
        raise write_failure("checkpoint", path, e) from None
    return [s for s, _ in steps]


def load_exported_weights(model: nn.Module, checkpoint_dir: Path, export: str) -> None:
    """Load the weights ``output.export`` names into ``model`` (``last``: leave it as it is)."""
    if export == "best":
        model.load_state_dict(ckpt.load_checkpoint(checkpoint_dir / ckpt.BEST_FILE).model)
    elif export == "averaged":
        model.load_state_dict(ckpt.load_checkpoint(checkpoint_dir / ckpt.AVERAGED_FILE).model)
