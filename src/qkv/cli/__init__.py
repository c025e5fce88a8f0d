"""The ``qkv`` command line. Each subcommand lives in its own module with a ``register(subparsers)``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from qkv.cli import (
    bench,
    compare,
    data,
    demo,
    evaluate,
    explain,
    export,
    generate,
    predict,
    serve,
    show,
    train,
    translate,
)

SUBCOMMANDS = (explain, compare, demo, bench, data, train, translate, export, serve, generate, predict, evaluate, show)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="qkv", description="The attention mechanism, exact and visible.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qkv`` console script; returns the exit status.

    When the reader of stdout goes away (``qkv show ... | head -3``), the command stops quietly with
    status 0, as Unix tools do, instead of a ``BrokenPipeError`` traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = int(args.run(args) or 0)
        sys.stdout.flush()  # a pipe closed after the last write shows up here, not in Python's exit flush
    except BrokenPipeError:
        _silence_stdout()
        return 0
    return status


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's final flush at exit does not raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (e.g. a StringIO under test)
        pass


if __name__ == "__main__":
    sys.exit(main())
