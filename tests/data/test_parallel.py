"""Loading the user's parallel text: what is kept, what is dropped, and every bad input's message."""

from __future__ import annotations

import re

import pytest

from qkv.data import DataError, filter_pairs, length_stats, load_parallel, load_tsv, read_lines


def write(path, data: bytes | str):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_parallel_files_load_pairs_in_order(tmp_path):
    src = write(tmp_path / "train.en", "one\ntwo\n  three  \n")
    tgt = write(tmp_path / "train.de", "eins\nzwei\ndrei")  # no final newline
    pairs, report = load_parallel(src, tgt)
    assert pairs == [("one", "eins"), ("two", "zwei"), ("three", "drei")]
    assert (report.total, report.kept, report.dropped_empty, report.dropped_long) == (3, 3, 0, 0)


def test_crlf_and_a_byte_order_mark_are_accepted(tmp_path):
    src = write(tmp_path / "a.en", b"\xef\xbb\xbfgood morning\r\nthank you\r\n")
    tgt = write(tmp_path / "a.de", "guten Morgen\ndanke\n")
    pairs, _ = load_parallel(src, tgt)
    assert pairs == [("good morning", "guten Morgen"), ("thank you", "danke")]


def test_lines_split_on_newline_only(tmp_path):
    # A form feed or U+2028 inside a sentence is not a line break, so line numbers match an editor's.
    path = write(tmp_path / "odd.txt", "a\x0cb\nc\u2028d\n")
    assert read_lines(path) == ["a\x0cb", "c\u2028d"]


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    src = write(tmp_path / "train.en", "a\nb\nc\n")
    tgt = write(tmp_path / "train.de", "a\nb\n")
    with pytest.raises(DataError) as e:
        load_parallel(src, tgt)
    message = str(e.value)
    assert f"{src} has 3 lines but {tgt} has 2" in message
    assert "expected the same number" in message


def test_an_empty_file_is_named(tmp_path):
    src = write(tmp_path / "train.en", "a\n")
    tgt = write(tmp_path / "train.de", b"")
    with pytest.raises(DataError, match=f"^{re.escape(str(tgt))} is empty; expected one sentence per line$"):
        load_parallel(src, tgt)
    with pytest.raises(DataError, match="empty.tsv is empty"):
        load_tsv(write(tmp_path / "empty.tsv", b"\xef\xbb\xbf"))


def test_a_missing_file_is_named(tmp_path):
    src = write(tmp_path / "train.en", "a\n")
    with pytest.raises(DataError, match=f"cannot read {re.escape(str(tmp_path / 'nope.de'))}: No such file"):
        load_parallel(src, tmp_path / "nope.de")


def test_bad_utf8_names_the_file_and_the_line(tmp_path):
    src = write(tmp_path / "train.en", "a\nb\nc\nd\n")
    tgt = write(tmp_path / "train.de", "eins\nzwei\ndr\xe9i\nvier\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_parallel(src, tgt)
    assert str(e.value) == f"{tgt} line 3 is not valid UTF-8 (0xe9 at byte 3 of the line); expected UTF-8 text"
    # On the first line and in a TSV file too.
    with pytest.raises(DataError, match=r"bad.tsv line 1 is not valid UTF-8 \(0xff at byte 1"):
        load_tsv(write(tmp_path / "bad.tsv", b"\xff\tx\n"))


def test_tsv_loads_pairs(tmp_path):
    path = write(tmp_path / "train.tsv", "hello\thallo\nthree hundred\tdreihundert\n")
    pairs, report = load_tsv(path)
    assert pairs == [("hello", "hallo"), ("three hundred", "dreihundert")]
    assert report.source == str(path) and report.kept == 2


@pytest.mark.parametrize(("line", "tabs"), [("no tab here", 0), ("a\tb\tc", 2)])
def test_a_tsv_line_without_exactly_one_tab_is_named(tmp_path, line, tabs):
    path = write(tmp_path / "train.tsv", f"a\tb\nc\td\n{line}\ne\tf\n")
    with pytest.raises(DataError) as e:
        load_tsv(path)
    assert str(e.value).startswith(f"{path} line 3 has {tabs} tabs; expected exactly one")
    assert repr(line) in str(e.value)


def test_empty_and_long_pairs_are_dropped_and_counted(tmp_path):
    src_lines = ["ok", "", "a b c d e", "x" * 30, "   ", "fine too", "short"]
    tgt_lines = ["gut", "leer", "f", "y", "z", "auch gut", ""]
    src = write(tmp_path / "s", "\n".join(src_lines) + "\n")
    tgt = write(tmp_path / "t", "\n".join(tgt_lines) + "\n")
    pairs, report = load_parallel(src, tgt, max_chars=20, max_tokens=4)
    assert pairs == [("ok", "gut"), ("fine too", "auch gut")]
    assert (report.total, report.kept, report.dropped_empty, report.dropped_long) == (7, 2, 3, 2)
    assert report.summary() == (
        f"{src} + {tgt}: 7 pairs read, 2 kept, 3 dropped empty, 2 dropped long (> 20 chars or > 4 tokens)"
    )
    # Without limits only the empty ones go.
    pairs, report = load_parallel(src, tgt)
    assert report.kept == 4 and report.dropped_long == 0


def test_blank_tsv_lines_count_as_empty_pairs(tmp_path):
    path = write(tmp_path / "t.tsv", "a\tb\n\n  \nc\t\n\td\n")
    pairs, report = load_tsv(path)
    assert pairs == [("a", "b")]
    assert (report.total, report.dropped_empty) == (5, 4)


def test_the_limits_are_checked():
    with pytest.raises(DataError, match="max_chars must be a positive integer or None; got 0"):
        filter_pairs([("a", "b")], max_chars=0)
    with pytest.raises(DataError, match="max_tokens must be a positive integer or None; got 2.5"):
        filter_pairs([("a", "b")], max_tokens=2.5)


def test_length_stats():
    stats = length_stats([5, 1, 3, 2, 4, 100, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    assert (stats.count, stats.min, stats.max) == (20, 1, 100)
    assert stats.mean == pytest.approx((sum(range(1, 20)) + 100) / 20)
    assert stats.median == 10.5
    assert stats.p95 == 19
    assert length_stats([4]).median == 4
    with pytest.raises(DataError, match="at least one length"):
        length_stats([])
