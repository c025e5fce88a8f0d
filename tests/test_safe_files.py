"""read_regular_file: regular files only, bounded in size, and never blocking on a FIFO."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qkv.safe_files import read_json_file, read_regular_file


def test_reads_a_regular_file_and_a_symlink_to_one(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello")
    link = tmp_path / "link.txt"
    link.symlink_to(path)
    assert read_regular_file(path, 5) == b"hello"
    assert read_regular_file(link, 5) == b"hello"


def test_refuses_a_file_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 11)
    with pytest.raises(ValueError, match=r"big\.bin has 11 bytes; expected at most 10"):
        read_regular_file(path, 10)


def test_refuses_a_symlink_to_dev_zero(tmp_path: Path) -> None:
    link = tmp_path / "sp.model"
    link.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"sp\.model is a character device; expected a regular file"):
        read_regular_file(link, 1 << 20)


def test_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "sp.model"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"sp\.model is a FIFO; expected a regular file"):
        read_regular_file(fifo, 1 << 20)


def test_reads_json_and_names_what_is_wrong(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, "é"]}', encoding="utf-8")
    assert read_json_file(good, 100) == {"a": [1, "é"]}
    (tmp_path / "bad.json").write_text("{nope", encoding="utf-8")
    with pytest.raises(ValueError, match="Expecting property name"):
        read_json_file(tmp_path / "bad.json", 100)
    (tmp_path / "latin.json").write_bytes(b'"\xe9"')
    with pytest.raises(UnicodeDecodeError):
        read_json_file(tmp_path / "latin.json", 100)
    with pytest.raises(ValueError, match="expected at most 5"):
        read_json_file(good, 5)
