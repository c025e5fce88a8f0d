"""``qkv.cli.paths``: output files and directories checked before a command works, one clear message each."""

from __future__ import annotations

import pytest

import qkv.cli.paths as paths
from qkv.cli.paths import check_output_dir, check_output_file


def test_output_file_in_an_existing_directory_passes(tmp_path):
    check_output_file(tmp_path / "new.txt", "--output")
    (tmp_path / "old.txt").write_text("x")
    check_output_file(tmp_path / "old.txt", "--output")


def test_output_file_problems_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    for path, message in (
        (tmp_path, f"--output {tmp_path} is a directory; expected a file name"),
        (tmp_path / "no" / "x.txt", f"the directory {tmp_path / 'no'} does not exist; create it first"),
        (tmp_path / "file" / "x.txt", f"the directory {tmp_path / 'file'} is not a directory"),
    ):
        with pytest.raises(ValueError) as caught:
            check_output_file(path, "--output")
        assert message in str(caught.value)


def test_unwritable_places_are_named(tmp_path, monkeypatch):
    # Tests may run as root, which may write anywhere: stand in for a read-only directory.
    monkeypatch.setattr(paths.os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match="the directory .* is not writable"):
        check_output_file(tmp_path / "new.txt", "--output")
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="old.txt is not writable"):
        check_output_file(tmp_path / "old.txt", "--output")
    with pytest.raises(ValueError, match=f"--out {tmp_path} is not writable"):
        check_output_dir(tmp_path, "--out")
    with pytest.raises(ValueError, match="is not writable, so .* cannot be created"):
        check_output_dir(tmp_path / "a" / "b", "--out")


def test_output_dir_may_be_created_under_an_existing_directory(tmp_path):
    check_output_dir(tmp_path / "a" / "b", "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="file is not a directory; expected a directory to write into"):
        check_output_dir(tmp_path / "file" / "out", "--out")
