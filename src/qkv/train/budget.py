"""The training budget: ``training.max_steps``, ``max_epochs`` and ``max_time``, whichever comes first.

``max_time`` is wall-clock time spent training (validation and checkpoints included; a resumed run
continues the count saved in its checkpoint), given in seconds or as a string of numbers with units::

    90        90 seconds          "90s"     90 seconds
    "30m"     30 minutes          "2h"      2 hours          "1h30m"   an hour and a half       "1.5d"

A run that reaches any of its budgets ends like one that reached ``max_steps``: a last validation, a
checkpoint and the export.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)\s*[smhd]\s*)+")
DURATION_HELP = 'seconds (a number > 0) or a string such as "90s", "30m", "2h" or "1h30m"'


def parse_duration(value: object) -> float:
    """Seconds of a ``max_time`` value (see the module docstring).

    Raises:
        ValueError: anything else, or a duration that is not > 0; the message shows the accepted forms.
    """
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        seconds = sum(float(number) * UNIT_SECONDS[unit] for number, unit in _PART.findall(value))
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be {DURATION_HELP}; got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``5400.0`` → ``"1h30m"``, ``90.5`` → ``"1m30.5s"``: for log lines."""
    parts = []
    rest = seconds
    for unit in ("d", "h", "m"):
        whole = int(rest // UNIT_SECONDS[unit])
        if whole:
            parts.append(f"{whole}{unit}")
            rest -= whole * UNIT_SECONDS[unit]
    if rest or not parts:
        parts.append(f"{rest:.3g}s")
    return "".join(parts)


@dataclass(frozen=True)
class Budget:
    """The limits of a run (``None``: no limit of that kind; at least one is set)."""

    max_steps: int | None = None
    max_epochs: float | None = None
    max_time: float | None = None

    def reached(self, step: int, epoch: float, seconds: float) -> str | None:
        """Which budget ``step`` updates, ``epoch`` passes over the data and ``seconds`` of training have
        used up (``"max_steps"``, ``"max_epochs"``, ``"max_time"``), or ``None`` while none is."""
        if self.max_steps is not None and step >= self.max_steps:
            return "max_steps"
        if self.max_epochs is not None and epoch >= self.max_epochs:
            return "max_epochs"
        if self.max_time is not None and seconds >= self.max_time:
            return "max_time"
        return None

    def describe(self) -> str:
        """``"40 steps"``, ``"3 epochs or 30m"``: the limits set, for the log."""
        parts = []
        if self.max_steps is not None:
            parts.append(f"{self.max_steps} steps")
        if self.max_epochs is not None:
            parts.append(f"{self.max_epochs:g} epochs")
        if self.max_time is not None:
            parts.append(format_duration(self.max_time))
        return " or ".join(parts)
