"""Checking output paths before a command does its work.

A command that translates a test set or runs a benchmark for minutes and only then finds that it cannot
write its result loses that work. The commands call these checks first, so a missing or read-only
directory is one error line before anything runs. They raise ``ValueError`` naming the option, the path and
what is wrong; the commands print it as their usual ``qkv <cmd>: error: ...`` line.
"""

from __future__ import annotations

import os
from pathlib import Path


def check_output_file(path: Path, option: str) -> None:
    """Check that file ``path`` (given as ``option``, e.g. ``"--output"``) can be created or overwritten.

    Raises:
        ValueError: ``path`` is a directory, its parent directory does not exist or is not a directory, or
            the parent (or an existing ``path``) is not writable.
    """
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; expected a file name")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ValueError(f"{option} {path}: the directory {parent} {what}; create it first")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {path} is not writable")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the directory {parent} is not writable")


def check_output_dir(path: Path, option: str) -> None:
    """Check that directory ``path`` (given as ``option``, e.g. ``"--out"``) exists and is writable, or can
    be created: its nearest existing ancestor is a writable directory.

    Raises:
        ValueError: ``path`` or its nearest existing ancestor is not a directory, or is not writable.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is not a directory; expected a directory to write into")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == path:
            raise ValueError(f"{option} {path} is not writable")
        raise ValueError(f"{option} {path}: {existing} is not writable, so {path} cannot be created")
