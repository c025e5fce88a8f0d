"""The user's parallel text: a source file and a target file with one sentence a line, or one TSV file.

``load_parallel("train.en", "train.de")`` and ``load_tsv("train.tsv")`` (``source<TAB>target`` a line) both
return ``(pairs, report)``: the kept ``(source, target)`` pairs, stripped of surrounding whitespace, and a
:class:`LoadReport` counting what was dropped: pairs with an empty side, and pairs with a side over
``max_chars`` characters or ``max_tokens`` whitespace-separated tokens (the subword tokenizer is not known
yet when the text is read). Files that cannot be used raise :class:`DataError`, naming the file, the line
and what was expected: a missing or empty file, a line that is not UTF-8, two files with different line
counts, a TSV line without exactly one tab.

Lines are split on ``\\n`` only (``\\r\\n`` is accepted; a final newline does not add a line), so line
numbers in messages match those of an editor or ``sed -n 17p``. A UTF-8 byte-order mark is ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qkv.checks import ConfigError, int_at_least

Pair = tuple[str, str]
PathLike = str | os.PathLike


class DataError(ConfigError):
    """Data that cannot be used as given; the message names the file (or argument), what was got and expected.

    A :class:`~qkv.checks.ConfigError`, so one ``except ConfigError`` catches every bad input."""


@dataclass(frozen=True)
class LoadReport:
    """What loading kept and dropped.

    Attributes:
        source: the file(s) read, for messages (``"train.en + train.de"`` or ``"train.tsv"``).
        total: pairs read (lines of each file).
        kept: pairs returned.
        dropped_empty: pairs dropped because a side was empty (or only whitespace).
        dropped_long: pairs dropped because a side had more than ``max_chars`` characters or ``max_tokens``
            whitespace-separated tokens.
        max_chars, max_tokens: the limits applied (``None``: none).
    """

    source: str
    total: int
    kept: int
    dropped_empty: int
    dropped_long: int
    max_chars: int | None = None
    max_tokens: int | None = None

    def summary(self) -> str:
        """One line, e.g. ``train.tsv: 1000 pairs read, 990 kept, 6 dropped empty, 4 dropped long (> 200 tokens)``."""
        limits = [f"> {self.max_chars} chars"] if self.max_chars is not None else []
        limits += [f"> {self.max_tokens} tokens"] if self.max_tokens is not None else []
        long = f"{self.dropped_long} dropped long" + (f" ({' or '.join(limits)})" if limits else "")
        return f"{self.source}: {self.total} pairs read, {self.kept} kept, {self.dropped_empty} dropped empty, {long}"


@dataclass(frozen=True)
class LengthStats:
    """Summary of a list of lengths: ``count``, ``min``, ``mean``, ``median``, ``p95`` and ``max``."""

    count: int
    min: int
    mean: float
    median: float
    p95: int
    max: int


def decode_lines(data: bytes, source: str) -> list[str]:
    """The lines of UTF-8 ``data`` split at ``\\n`` only, without line endings: a ``\\r`` before the
    ``\\n`` is dropped, a leading byte-order mark ignored, and a final newline adds no line. Form feeds,
    U+2028 and the other characters ``str.splitlines`` also splits at stay inside their line, so line ``n``
    of a file is always sentence ``n``.

    Raises:
        DataError: ``data`` is not UTF-8; the message names ``source``, the line and the offending byte.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{source} line {line} is not valid UTF-8 (0x{data[e.start]:02x} at byte {e.start - line_start + 1} "
            f"of the line); expected UTF-8 text"
        ) from None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_lines(path: PathLike) -> list[str]:
    """The lines of a UTF-8 text file, as :func:`decode_lines` splits them.

    Raises:
        DataError: the file cannot be read, is empty, or has a line that is not valid UTF-8 (the message
            gives the line number and the offending byte).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not data.removeprefix(b"\xef\xbb\xbf"):
        raise DataError(f"{path} is empty; expected one sentence per line")
    return decode_lines(data, str(path))


def load_parallel(
    src_path: PathLike, tgt_path: PathLike, *, max_chars: int | None = None, max_tokens: int | None = None
) -> tuple[list[Pair], LoadReport]:
    """``(pairs, report)`` from a source file and a target file with one sentence a line.

    Args:
        src_path, tgt_path: UTF-8 text files with the same number of lines; line ``i`` of one translates
            line ``i`` of the other.
        max_chars, max_tokens: drop pairs with a side longer than this (``None``: no limit); see
            :func:`filter_pairs`.

    Raises:
        DataError: a file is missing, empty or not UTF-8 (with the line), or the line counts differ.
    """
    src_lines = read_lines(src_path)
    tgt_lines = read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(
            f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; "
            f"expected the same number, line i of one translating line i of the other"
        )
    pairs = zip(src_lines, tgt_lines, strict=True)
    return filter_pairs(pairs, source=f"{src_path} + {tgt_path}", max_chars=max_chars, max_tokens=max_tokens)


def load_tsv(
    path: PathLike, *, max_chars: int | None = None, max_tokens: int | None = None
) -> tuple[list[Pair], LoadReport]:
    """``(pairs, report)`` from a UTF-8 file with ``source<TAB>target`` on each line.

    A line that is empty or only whitespace counts as an empty pair (dropped); any other line must have
    exactly one tab.

    Raises:
        DataError: the file is missing, empty or not UTF-8, or a line has no tab or more than one (with the
            line number).
    """
    pairs: list[Pair] = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            pairs.append(("", ""))
            continue
        tabs = line.count("\t")
        if tabs != 1:
            raise DataError(
                f"{path} line {number} has {tabs} tabs; expected exactly one, between source and target "
                f"(got {line[:60]!r}{'…' if len(line) > 60 else ''})"
            )
        src, tgt = line.split("\t")
        pairs.append((src, tgt))
    return filter_pairs(pairs, source=str(path), max_chars=max_chars, max_tokens=max_tokens)


def filter_pairs(
    pairs: Iterable[Pair], *, source: str = "pairs", max_chars: int | None = None, max_tokens: int | None = None
) -> tuple[list[Pair], LoadReport]:
    """Strip each side, drop pairs with an empty side or a side over the limits; ``(kept, report)``.

    Args:
        pairs: ``(source, target)`` strings.
        source: what the pairs were read from, for the report.
        max_chars: the most characters a side may have (``None``: no limit).
        max_tokens: the most whitespace-separated tokens a side may have (``None``: no limit).
    """
    for name, value in (("max_chars", max_chars), ("max_tokens", max_tokens)):
        if value is not None:
            int_at_least(name, value, expected="a positive integer or None", error=DataError)
    kept: list[Pair] = []
    total = empty = long = 0
    for src, tgt in pairs:
        total += 1
        src, tgt = src.strip(), tgt.strip()
        if not src or not tgt:
            empty += 1
        elif (max_chars is not None and max(len(src), len(tgt)) > max_chars) or (
            max_tokens is not None and max(len(src.split()), len(tgt.split())) > max_tokens
        ):
            long += 1
        else:
            kept.append((src, tgt))
    report = LoadReport(source, total, len(kept), empty, long, max_chars, max_tokens)
    return kept, report


def length_stats(lengths: Sequence[int]) -> LengthStats:
    """:class:`LengthStats` of a non-empty list of lengths (``p95``: the nearest-rank 95th percentile)."""
    if not lengths:
        raise DataError("length_stats needs at least one length; got none")
    ordered = sorted(lengths)
    n = len(ordered)
    middle = n // 2
    median = ordered[middle] if n % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return LengthStats(
        count=n,
        min=ordered[0],
        mean=sum(ordered) / n,
        median=median,
        p95=ordered[max(0, math.ceil(0.95 * n) - 1)],
        max=ordered[-1],
    )
