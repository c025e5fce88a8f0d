"""The record of a run: ``train.log``, ``metrics.jsonl``, the console and, optionally, TensorBoard.

Only rank 0 writes (``enabled``); the other ranks get a :class:`RunLog` that does nothing, so code that
logs needs no rank checks. ``train.log`` has one time-stamped line per event, each also echoed to the
console (through tqdm, so it does not break the progress bar); ``metrics.jsonl`` has one JSON object per
validation (and one for the test split).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def echo_line(text: str) -> None:
    """Print ``text`` on stdout without breaking a tqdm progress bar on stderr."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)


class RunLog:
    """The plain log file, metrics.jsonl, console echo and optional TensorBoard of ``directory``."""

    def __init__(
        self, directory: Path, *, enabled: bool, tensorboard: bool = False, echo: Callable[[str], None] = echo_line
    ) -> None:
        self.enabled = enabled
        self.echo = echo
        self.log_path = directory / LOG_FILE
        self.metrics_path = directory / METRICS_FILE
        self.writer: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.line("output.tensorboard is on but tensorboard is not installed; logging to train.log only")
            else:
                self.writer = SummaryWriter(str(directory / TENSORBOARD_DIR))

    def line(self, text: str) -> None:
        """Append ``text`` to train.log with a time stamp and echo it."""
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {text}\n")
        self.echo(text)

    def metrics(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (JSON-able) to metrics.jsonl."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        """TensorBoard scalars ``prefix/name`` at ``step`` (nothing without TensorBoard)."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
