"""The errors a training run stops with: one message saying what went wrong and what to do."""

from __future__ import annotations

import errno
from pathlib import Path


class TrainError(RuntimeError):
    """Training cannot start or continue as asked; the message says why and what to do."""


class TrainInterrupted(TrainError):
    """Training was interrupted (Ctrl-C); the message says at which step and where ``--resume`` continues."""


def write_failure(what: str, path: Path, error: OSError) -> TrainError:
    """A :class:`TrainError` for a failed write: the file, the system's reason and what is left intact."""
    reason = error.strerror or str(error)
    code = f" ({errno.errorcode.get(error.errno, error.errno)})" if error.errno else ""
    return TrainError(f"cannot write {what} {path}: {reason}{code}; the files written before it are intact")
