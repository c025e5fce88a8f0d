"""Built-in parallel corpora, generated offline from a seed: no download, same seed → same files.

========  ===================================================  ==========================================
name      source → target                                      example
========  ===================================================  ==========================================
numbers   an integer in English words → in German (num2words)  three hundred and twenty-one →
                                                               dreihunderteinundzwanzig
dates     a date written in US English → in German (babel),    Tuesday, March 9, 1993 →
          formats full, long or short, years 1900–2099         Dienstag, 9. März 1993
copy      letters a–j separated by spaces → the same           c a f → c a f
reverse   letters a–j separated by spaces → reversed           c a f → f a c
========  ===================================================  ==========================================

The German number is one compound "word" and its order flips inside it (three hundred and *twenty-one* →
dreihundert*einundzwanzig*): a character-level or subword tokenizer, not a word tokenizer, fits it.
Numbers run from 0 to 999,999, biased to small ones: the number of digits is drawn uniformly from 1 to 6,
then the number uniformly among those with that many digits.

Each item is drawn at random, converted, and kept if it is new; the items are then shuffled and cut into
test, valid and train, so no item (a number, a date, a letter sequence) and no source sentence is in two
splits. A date is one item whatever its format. The converters are third-party code: a conversion that
raises, returns something that is not one line of text, or runs over ``time_limit`` seconds is skipped and
counted in :class:`CorpusStats`, so one bad input cannot stop or hang the generation.

The numbers and dates corpora need the ``data`` extra (``pip install 'qkv[data]'``: num2words, babel).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qkv.checks import fraction, int_at_least, positive_number
from qkv.data.parallel import DataError, Pair

SPLITS = ("train", "valid", "test")
DEFAULT_SIZE = 25_000
DEFAULT_VALID_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.1
DEFAULT_TIME_LIMIT = 2.0

MAX_NUMBER_DIGITS = 6
DATE_FIRST = datetime.date(1900, 1, 1)
DATE_LAST = datetime.date(2099, 12, 31)
# Not babel's "medium": in en_US it equals "long" for May ("May 2, 2009"), whose German forms differ
# ("2. Mai 2009", "02.05.2009"), so one source would have two targets.
DATE_FORMATS = ("full", "long", "short")
DATE_SOURCE_LOCALE = "en_US"
DATE_TARGET_LOCALE = "de_DE"
LETTERS = "abcdefghij"
LETTER_LENGTHS = (2, 10)
# How many draws per requested item before giving up: generous for the biased number draw, whose small
# numbers are soon all taken and then only redrawn.
ATTEMPTS_PER_ITEM = 20
ERRORS_KEPT = 5


@dataclass(frozen=True)
class CorpusStats:
    """How a corpus was generated.

    Attributes:
        requested: the ``size`` asked for; ``kept`` equals it.
        kept: items in the corpus (all splits).
        attempts: items drawn.
        duplicates: draws of an item (or a source sentence) already kept, redrawn.
        skipped_errors: conversions that raised or returned something that is not one line of text.
        skipped_timeouts: conversions stopped after ``time_limit`` seconds.
        errors: the first few skip reasons, ``"<item>: <error>"``.
        seconds: wall time of the generation.
    """

    requested: int
    kept: int
    attempts: int
    duplicates: int
    skipped_errors: int
    skipped_timeouts: int
    errors: tuple[str, ...] = ()
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        """Conversions skipped, for errors and timeouts together."""
        return self.skipped_errors + self.skipped_timeouts


@dataclass(frozen=True)
class Corpus:
    """A generated corpus: ``train``, ``valid`` and ``test`` lists of ``(source, target)`` pairs."""

    name: str
    seed: int
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    stats: CorpusStats

    def split(self, name: str) -> list[Pair]:
        """The pairs of split ``name`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if name not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}; got {name!r}")
        return getattr(self, name)


@dataclass(frozen=True)
class CorpusTask:
    """How to draw and convert the items of one corpus.

    Attributes:
        name, summary: for the command line and messages.
        sample: one random item from a ``random.Random``.
        convert: ``(source, target)`` of an item.
        identity: what must not repeat across the corpus (default: the item itself).
        requires: modules the conversion imports (checked before generating).
    """

    name: str
    summary: str
    sample: Callable[[random.Random], Hashable]
    convert: Callable[[Any], Pair]
    identity: Callable[[Any], Hashable] = field(default=lambda item: item)
    requires: tuple[str, ...] = ()


def spell_number(number: int, lang: str) -> str:
    """``number`` in words in language ``lang`` (num2words), e.g. ``spell_number(21, "de") == "einundzwanzig"``."""
    from num2words import num2words

    return num2words(number, lang=lang)


def format_date_in(date: datetime.date, fmt: str, locale: str) -> str:
    """``date`` in babel's format ``fmt`` (``"full"``, ``"long"``, ``"medium"``, ``"short"``) for ``locale``."""
    from babel.dates import format_date

    return format_date(date, format=fmt, locale=locale)


def _sample_number(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_NUMBER_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _number_pair(number: int) -> Pair:
    # Looked up at call time (not bound at import) so tests can replace the converter.
    return spell_number(number, "en"), spell_number(number, "de")


def _sample_date(rng: random.Random) -> tuple[datetime.date, str]:
    day = datetime.date.fromordinal(rng.randint(DATE_FIRST.toordinal(), DATE_LAST.toordinal()))
    return day, rng.choice(DATE_FORMATS)


def _date_pair(item: tuple[datetime.date, str]) -> Pair:
    day, fmt = item
    return format_date_in(day, fmt, DATE_SOURCE_LOCALE), format_date_in(day, fmt, DATE_TARGET_LOCALE)


def _sample_letters(rng: random.Random) -> tuple[str, ...]:
    return tuple(rng.choice(LETTERS) for _ in range(rng.randint(*LETTER_LENGTHS)))


CORPORA: dict[str, CorpusTask] = {
    task.name: task
    for task in (
        CorpusTask(
            "numbers",
            "integers 0–999,999 in English words → German words (num2words)",
            _sample_number,
            _number_pair,
            requires=("num2words",),
        ),
        CorpusTask(
            "dates",
            f"dates {DATE_FIRST.year}–{DATE_LAST.year} in US English → German (babel; {'/'.join(DATE_FORMATS)})",
            _sample_date,
            _date_pair,
            identity=lambda item: item[0],
            requires=("babel",),
        ),
        CorpusTask(
            "copy",
            f"{LETTER_LENGTHS[0]}–{LETTER_LENGTHS[1]} letters {LETTERS[0]}–{LETTERS[-1]} → the same letters",
            _sample_letters,
            lambda item: (" ".join(item), " ".join(item)),
        ),
        CorpusTask(
            "reverse",
            f"{LETTER_LENGTHS[0]}–{LETTER_LENGTHS[1]} letters {LETTERS[0]}–{LETTERS[-1]} → the letters reversed",
            _sample_letters,
            lambda item: (" ".join(item), " ".join(reversed(item))),
        ),
    )
}


class ConversionTimeout(BaseException):
    """A conversion ran over its time limit.

    A ``BaseException``, as ``KeyboardInterrupt`` is, so a converter's own ``except Exception`` cannot swallow it.
    """


class _TimeLimit:
    """Runs calls with a per-call time limit (SIGALRM; in the main thread of a POSIX process only).

    Elsewhere (another thread, Windows) calls run without a limit: exceptions are still caught by the caller,
    only a hang is not.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._armed = False
        self.enabled = (
            seconds is not None
            and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread()
        )

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self._armed:
            raise ConversionTimeout(f"over {self.seconds} s")

    @contextmanager
    def installed(self) -> Iterator[_TimeLimit]:
        """Install the alarm handler for the duration of the block, then restore the previous one."""
        if not self.enabled:
            yield self
            return
        previous = signal.signal(signal.SIGALRM, self._on_alarm)
        try:
            yield self
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def call(self, fn: Callable[[Any], Pair], item: Any) -> Pair:
        """``fn(item)``, raising :class:`ConversionTimeout` if it runs over the limit."""
        if not self.enabled or self.seconds is None:  # enabled implies a limit; the check tells mypy so
            return fn(item)
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            return fn(item)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False


def _check_pair(pair: object) -> Pair:
    """``pair`` if it is two non-empty one-line strings; ``ValueError`` saying what it is otherwise."""
    if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
        raise ValueError(f"expected a (source, target) pair of strings; got {pair!r}")
    for side, text in zip(("source", "target"), pair, strict=True):
        if not text.strip():
            raise ValueError(f"the {side} is empty")
        if any(c in text for c in "\n\r\t"):
            raise ValueError(f"the {side} {text!r} has a line break or tab; a corpus line must be one line")
    return pair


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules without a spec (a stub): importable
        return True


def _check_arguments(name: str, size: int, valid_fraction: float, test_fraction: float) -> CorpusTask:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; expected one of {', '.join(CORPORA)}")
    int_at_least("size", size, expected="a positive integer (pairs in all splits together)", error=DataError)
    for arg, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        fraction(arg, value, expected="in [0, 1)", error=DataError)
    if valid_fraction + test_fraction >= 1:
        raise DataError(
            f"valid_fraction + test_fraction must be below 1 to leave pairs for training; "
            f"got {valid_fraction} + {test_fraction}"
        )
    task = CORPORA[name]
    missing = [module for module in task.requires if not _installed(module)]
    if missing:
        raise DataError(
            f"the {name} corpus needs {', '.join(missing)}, which is not installed; pip install 'qkv[data]'"
        )
    return task


def generate_corpus(
    name: str,
    size: int = DEFAULT_SIZE,
    *,
    seed: int = 0,
    valid_fraction: float = DEFAULT_VALID_FRACTION,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
) -> Corpus:
    """Generate the built-in corpus ``name`` with ``size`` distinct pairs in all, split without overlap.

    Args:
        name: ``"numbers"``, ``"dates"``, ``"copy"`` or ``"reverse"`` (see :data:`CORPORA`).
        size: pairs in train, valid and test together.
        seed: the random seed; the same seed gives the same corpus.
        valid_fraction, test_fraction: the shares of ``size`` (rounded) held out for validation and test.
        time_limit: seconds one conversion may take before it is skipped (``None``: no limit). It is kept
            with ``SIGALRM``, so only in the main thread of a POSIX process; elsewhere a conversion that
            raises is still skipped, but one that hangs is not stopped.

    Returns:
        A :class:`Corpus`; its ``stats`` count the draws, duplicates and skipped conversions.

    Raises:
        DataError: an unknown name, a bad argument, a missing dependency, or too few distinct items found
            (the task has fewer than ``size``, or nearly every conversion failed).
    """
    task = _check_arguments(name, size, valid_fraction, test_fraction)
    if time_limit is not None:
        positive_number("time_limit", time_limit, expected="a positive number of seconds or None", error=DataError)
    rng = random.Random(f"qkv-corpus:{name}:{seed}")
    started = time.perf_counter()
    seen_items: set[Hashable] = set()
    seen_sources: set[str] = set()
    pairs: list[Pair] = []
    attempts = duplicates = failed = timed_out = 0
    errors: list[str] = []
    limit = _TimeLimit(time_limit)
    with limit.installed():
        while len(pairs) < size:
            if attempts >= ATTEMPTS_PER_ITEM * size + 1000:
                raise DataError(
                    f"the {name} corpus gave only {len(pairs)} distinct pairs of the {size} asked for after "
                    f"{attempts} draws ({duplicates} duplicates, {failed} errors, {timed_out} timeouts"
                    + (f"; first error: {errors[0]}" if errors else "")
                    + "); ask for fewer"
                )
            attempts += 1
            item = task.sample(rng)
            ident = task.identity(item)
            if ident in seen_items:
                duplicates += 1
                continue
            seen_items.add(ident)
            try:
                pair = _check_pair(limit.call(task.convert, item))
            except ConversionTimeout as e:
                timed_out += 1
                reason = f"{item!r}: {e}"
            except Exception as e:  # third-party converters may raise anything; skip the item, count it
                failed += 1
                reason = f"{item!r}: {type(e).__name__}: {e}"
            else:
                if pair[0] in seen_sources:
                    duplicates += 1
                    continue
                seen_sources.add(pair[0])
                pairs.append(pair)
                continue
            if len(errors) < ERRORS_KEPT:
                errors.append(reason)
    rng.shuffle(pairs)
    n_test, n_valid = round(size * test_fraction), round(size * valid_fraction)
    stats = CorpusStats(
        requested=size,
        kept=len(pairs),
        attempts=attempts,
        duplicates=duplicates,
        skipped_errors=failed,
        skipped_timeouts=timed_out,
        errors=tuple(errors),
        seconds=time.perf_counter() - started,
    )
    return Corpus(
        name=name,
        seed=seed,
        test=pairs[:n_test],
        valid=pairs[n_test : n_test + n_valid],
        train=pairs[n_test + n_valid :],
        stats=stats,
    )


def split_paths(directory: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """``(directory/<split>.src, directory/<split>.tgt)``, the files :func:`write_corpus` writes."""
    return Path(directory) / f"{split}.src", Path(directory) / f"{split}.tgt"


def write_corpus(corpus: Corpus, directory: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """Write ``<split>.src`` / ``<split>.tgt`` (UTF-8, one sentence a line) and ``corpus.json`` to ``directory``.

    ``corpus.json`` records the name, seed, split sizes and :class:`CorpusStats` (less its wall time). The
    directory is created if missing; existing files of the same names are replaced. Returns
    ``{split: (src_path, tgt_path)}``.
    """
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
        written: dict[str, tuple[Path, Path]] = {}
        for split in SPLITS:
            pairs = corpus.split(split)
            src_path, tgt_path = split_paths(out, split)
            src_path.write_text("".join(f"{src}\n" for src, _ in pairs), encoding="utf-8")
            tgt_path.write_text("".join(f"{tgt}\n" for _, tgt in pairs), encoding="utf-8")
            written[split] = (src_path, tgt_path)
        meta = {
            "name": corpus.name,
            "seed": corpus.seed,
            "sizes": {split: len(corpus.split(split)) for split in SPLITS},
            # Without the wall time, so the same seed writes identical files.
            "stats": {k: v for k, v in asdict(corpus.stats).items() if k != "seconds"},
        }
        (out / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot write the corpus to {out}: {e.strerror or e}") from None
    return written
