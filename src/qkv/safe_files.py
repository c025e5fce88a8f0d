"""Reading files that someone else may have crafted: regular files only, and only up to a size.

A model directory or a config can be handed over by anyone. ``Path.read_bytes`` on a symlink to
``/dev/zero`` never ends (and exhausts memory), and on a FIFO it blocks until a writer appears.
:func:`read_regular_file` refuses anything that is not a regular file (after following symlinks, so a link
to a real file is fine) and anything larger than the caller's limit, before reading a byte.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MiB = 1 << 20


def _kind(mode: int) -> str:
    """A word for a non-regular file's type, for messages."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, max_bytes: int) -> int:
    """The size of ``path`` after checking it is a regular file of at most ``max_bytes`` bytes.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        OSError: it cannot be examined.
        ValueError: it is not a regular file (a device, FIFO, directory...) or is larger than ``max_bytes``.
    """
    info = os.stat(path)  # follows symlinks: what matters is what a read would reach
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is {_kind(info.st_mode)}; expected a regular file")
    if info.st_size > max_bytes:
        raise ValueError(f"{path} has {info.st_size:,} bytes; expected at most {max_bytes:,}")
    return info.st_size


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes`` bytes (see the module docstring).

    Raises:
        FileNotFoundError, OSError: ``path`` does not exist or cannot be read.
        ValueError: it is not a regular file, or it has (or grows to) more than ``max_bytes`` bytes.
    """
    check_regular_file(path, max_bytes)
    # O_NONBLOCK: should the file be swapped for a FIFO after the check, open() returns instead of waiting.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is {_kind(os.fstat(f.fileno()).st_mode)}; expected a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{Path(path)} has more than {max_bytes:,} bytes; expected at most {max_bytes:,}")
    return data


def read_json_file(path: str | os.PathLike, max_bytes: int) -> Any:
    """The JSON value in ``path``, a UTF-8 regular file of at most ``max_bytes`` bytes (:func:`read_regular_file`).

    Raises:
        FileNotFoundError, OSError: ``path`` does not exist or cannot be read.
        ValueError: not a regular file, too large, not UTF-8 (``UnicodeDecodeError``) or not JSON
            (``json.JSONDecodeError``).
    """
    return json.loads(read_regular_file(path, max_bytes).decode("utf-8"))
