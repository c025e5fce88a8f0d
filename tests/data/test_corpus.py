"""Built-in corpora: seeded, split without overlap, correct against num2words and babel, guarded converters."""

from __future__ import annotations

import datetime
import re
import threading
import time

import pytest
from babel.dates import format_date
from num2words import num2words

from qkv.data import DataError, generate_corpus, load_parallel, split_paths, write_corpus
from qkv.data import corpus as corpus_module
from qkv.data.corpus import CORPORA, DATE_FIRST, DATE_LAST, LETTERS, SPLITS

UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
WORD_VALUES = {word: i for i, word in enumerate(UNITS)} | {word: 20 + 10 * i for i, word in enumerate(TENS)}


def parse_english_number(text: str) -> int:
    """The integer of an English number below a million ("three hundred and twenty-one" → 321)."""
    total = current = 0
    for word in re.split(r"[\s,-]+", text):
        if word == "and" or not word:
            continue
        if word == "hundred":
            current *= 100
        elif word == "thousand":
            total, current = total + current * 1000, 0
        else:
            current += WORD_VALUES[word]
    return total + current


US_FORMATS = {"full": "%A, %B %d, %Y", "long": "%B %d, %Y", "short": "%m/%d/%y"}


def parse_us_date(text: str) -> tuple[datetime.date, str]:
    """The date and babel format name of an en_US date (a short date's century is a guess)."""
    for fmt, pattern in US_FORMATS.items():
        try:
            return datetime.datetime.strptime(text, pattern).date(), fmt
        except ValueError:
            continue
    raise AssertionError(f"not an en_US date: {text!r}")


def sources(pairs):
    return [src for src, _ in pairs]


def test_the_examples_of_the_spec():
    assert CORPORA["numbers"].convert(321) == ("three hundred and twenty-one", "dreihunderteinundzwanzig")
    assert CORPORA["dates"].convert((datetime.date(1993, 3, 9), "full")) == (
        "Tuesday, March 9, 1993",
        "Dienstag, 9. März 1993",
    )
    assert CORPORA["reverse"].convert(("c", "a", "f")) == ("c a f", "f a c")
    assert CORPORA["copy"].convert(("c", "a", "f")) == ("c a f", "c a f")


def test_same_seed_same_corpus_other_seed_other_corpus():
    a = generate_corpus("numbers", 300, seed=3)
    b = generate_corpus("numbers", 300, seed=3)
    c = generate_corpus("numbers", 300, seed=4)
    assert (a.train, a.valid, a.test) == (b.train, b.valid, b.test)
    assert a.train != c.train
    assert a.stats.attempts == b.stats.attempts


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_splits_have_the_asked_sizes_and_share_no_source(name):
    corpus = generate_corpus(name, 500, seed=1, valid_fraction=0.1, test_fraction=0.2)
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (350, 50, 100)
    assert corpus.stats.kept == corpus.stats.requested == 500
    all_sources = sources(corpus.train) + sources(corpus.valid) + sources(corpus.test)
    assert len(set(all_sources)) == 500
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not set(sources(corpus.split(a))) & set(sources(corpus.split(b)))
    for src, tgt in corpus.train + corpus.valid + corpus.test:
        assert src.strip() and tgt.strip() and "\n" not in src + tgt


def test_numbers_agree_with_num2words_and_favour_small_numbers():
    corpus = generate_corpus("numbers", 600, seed=2)
    numbers = []
    for src, tgt in corpus.train + corpus.valid + corpus.test:
        n = parse_english_number(src)
        assert src == num2words(n, lang="en")
        assert tgt == num2words(n, lang="de")
        assert " " not in tgt  # the German compound is one word
        numbers.append(n)
    assert 0 <= min(numbers) and max(numbers) <= 999_999
    # Digits drawn uniformly: about a third of the numbers have at most 4 digits, far more than uniform draws.
    assert sum(n < 10_000 for n in numbers) > 0.2 * len(numbers)
    assert max(numbers) >= 100_000


def test_dates_agree_with_babel_and_hold_out_whole_dates():
    corpus = generate_corpus("dates", 600, seed=5)
    seen_formats = set()
    held_out_days = set()
    for split in SPLITS:
        for src, tgt in corpus.split(split):
            day, fmt = parse_us_date(src)
            seen_formats.add(fmt)
            assert src == format_date(day, fmt, locale="en_US")
            assert tgt == format_date(day, fmt, locale="de_DE")
            if fmt != "short":
                assert DATE_FIRST <= day <= DATE_LAST
                if split == "train":
                    assert day not in held_out_days
                else:
                    held_out_days.add(day)
    assert seen_formats == {"full", "long", "short"}


def test_every_date_source_has_one_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # Distinct dates can share a source (a short date's two-digit year: 5/2/09 is 1909 and 2009); the
    # generator keeps the first and redraws, so no source is paired with two targets. Here every day of a
    # month shares one source and every pair has its own target, so all but one per source must go.
    def month_only(date: datetime.date, fmt: str, locale: str) -> str:
        return f"month {date.month}" if locale == "en_US" else date.isoformat()

    monkeypatch.setattr(corpus_module, "format_date_in", month_only)
    corpus = generate_corpus("dates", 12, seed=0, valid_fraction=0.0, test_fraction=0.0)
    assert sorted(sources(corpus.train)) == sorted(f"month {m}" for m in range(1, 13))
    assert corpus.stats.duplicates > 0


def test_copy_and_reverse_use_the_letters():
    for name in ("copy", "reverse"):
        for src, tgt in generate_corpus(name, 100, seed=0).train:
            assert set(src.split()) <= set(LETTERS)
            assert tgt.split() == (src.split() if name == "copy" else src.split()[::-1])


def test_a_converter_that_raises_or_hangs_is_skipped_and_counted(monkeypatch):
    real = corpus_module.spell_number

    def flaky(number: int, lang: str) -> str:
        if number % 7 == 3:
            raise ArithmeticError(f"cannot spell {number}")
        if number % 11 == 5:
            while True:  # hangs; only the time limit ends it
                time.sleep(0.005)
        if number % 13 == 4:
            return "two\nlines"
        return real(number, lang)

    monkeypatch.setattr(corpus_module, "spell_number", flaky)
    corpus = generate_corpus("numbers", 150, seed=0, time_limit=0.05)
    stats = corpus.stats
    assert stats.kept == 150
    assert stats.skipped_timeouts > 0
    assert stats.skipped_errors > 0
    assert stats.skipped == stats.skipped_errors + stats.skipped_timeouts
    assert stats.attempts == stats.kept + stats.duplicates + stats.skipped
    assert any("ArithmeticError" in e for e in stats.errors)
    for src, _ in corpus.train + corpus.valid + corpus.test:
        n = parse_english_number(src)
        assert n % 7 != 3 and n % 11 != 5 and n % 13 != 4


def test_a_converter_that_swallows_exceptions_still_times_out(monkeypatch):
    def stubborn(number: int, lang: str) -> str:
        for _ in range(100 if number % 3 == 0 else 0):  # 0.5 s: the limit must stop it long before
            try:
                time.sleep(0.005)
            except Exception:  # a careless converter; the timeout is not an Exception
                pass
        return str(number)

    monkeypatch.setattr(corpus_module, "spell_number", stubborn)
    corpus = generate_corpus("numbers", 30, seed=0, time_limit=0.02)
    assert corpus.stats.skipped_timeouts > 0
    assert all(int(src) % 3 for src, _ in corpus.train + corpus.valid + corpus.test)


def test_guard_without_a_time_limit_off_the_main_thread(monkeypatch):
    def sometimes(number: int, lang: str) -> str:
        if number % 2:
            raise ValueError("odd")
        return str(number)

    monkeypatch.setattr(corpus_module, "spell_number", sometimes)
    result = {}
    thread = threading.Thread(target=lambda: result.update(corpus=generate_corpus("numbers", 40, seed=0)))
    thread.start()
    thread.join(30)
    stats = result["corpus"].stats
    assert stats.skipped_errors > 0 and stats.skipped_timeouts == 0
    assert all(int(src) % 2 == 0 for src, _ in result["corpus"].train)


def test_a_converter_that_always_fails_ends_with_an_error(monkeypatch):
    monkeypatch.setattr(corpus_module, "spell_number", lambda n, lang: 1 / 0)
    with pytest.raises(DataError, match=r"only 0 distinct pairs of the 5.*ZeroDivisionError"):
        generate_corpus("numbers", 5, seed=0)


def test_bad_arguments_are_named():
    with pytest.raises(DataError, match="unknown corpus 'roman'; expected one of numbers, dates, copy, reverse"):
        generate_corpus("roman", 10)
    with pytest.raises(DataError, match="size must be a positive integer.*got 0"):
        generate_corpus("copy", 0)
    with pytest.raises(DataError, match="valid_fraction must be in"):
        generate_corpus("copy", 10, valid_fraction=1.5)
    with pytest.raises(DataError, match=r"valid_fraction \+ test_fraction must be below 1.*0.5 \+ 0.5"):
        generate_corpus("copy", 10, valid_fraction=0.5, test_fraction=0.5)
    with pytest.raises(DataError, match="time_limit must be a positive number of seconds or None; got -1"):
        generate_corpus("copy", 10, time_limit=-1)


def test_a_missing_dependency_says_what_to_install(monkeypatch):
    monkeypatch.setattr(corpus_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"the numbers corpus needs num2words.*pip install 'qkv\[data\]'"):
        generate_corpus("numbers", 10)


def test_write_corpus_writes_one_sentence_a_line(tmp_path):
    corpus = generate_corpus("dates", 200, seed=0)
    written = write_corpus(corpus, tmp_path / "out")
    for split in SPLITS:
        src_path, tgt_path = split_paths(tmp_path / "out", split)
        assert written[split] == (src_path, tgt_path)
        n = len(corpus.split(split))
        assert len(src_path.read_text(encoding="utf-8").splitlines()) == n
        pairs, report = load_parallel(src_path, tgt_path)
        assert pairs == corpus.split(split) and report.kept == report.total == n
    assert (tmp_path / "out" / "corpus.json").is_file()
    # Same seed, same bytes.
    write_corpus(generate_corpus("dates", 200, seed=0), tmp_path / "again")
    for name in ("train.src", "test.tgt", "corpus.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
