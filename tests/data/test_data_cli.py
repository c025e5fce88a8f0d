"""``qkv data``: generate writes the corpus files, stats prints counts and lengths, errors are one line."""

from __future__ import annotations

import json

import pytest

from qkv.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["data", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def line_count(path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize("name", ["copy", "numbers"])
def test_generate_writes_the_splits(capsys, tmp_path, name):
    out_dir = tmp_path / name
    status, out, err = run(capsys, "generate", "--corpus", name, "--size", "200", "--seed", "3", "--out", str(out_dir))
    assert status == 0 and err == ""
    for split, n in (("train", 160), ("valid", 20), ("test", 20)):
        assert line_count(out_dir / f"{split}.src") == n == line_count(out_dir / f"{split}.tgt")
        assert f"{split}" in out and f"{n} pairs" in out
    assert "skipped 0 inputs (0 errors, 0 timeouts)" in out
    assert "example: " in out and " → " in out
    meta = json.loads((out_dir / "corpus.json").read_text(encoding="utf-8"))
    assert meta["name"] == name and meta["seed"] == 3 and meta["sizes"] == {"train": 160, "valid": 20, "test": 20}


def test_generate_with_other_fractions_and_the_same_seed(capsys, tmp_path):
    argv = ["generate", "--corpus", "reverse", "--size", "100", "--valid-fraction", "0.2", "--test-fraction", "0"]
    assert run(capsys, *argv, "--out", str(tmp_path / "a"))[0] == 0
    assert run(capsys, *argv, "--out", str(tmp_path / "b"))[0] == 0
    assert line_count(tmp_path / "a" / "valid.src") == 20 and line_count(tmp_path / "a" / "test.src") == 0
    assert (tmp_path / "a" / "train.tgt").read_bytes() == (tmp_path / "b" / "train.tgt").read_bytes()


def test_stats_of_parallel_files(capsys, tmp_path):
    (tmp_path / "s.txt").write_text("a b c\n\nd e\nf g h i j k\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("x y\nz\nw\nv\n", encoding="utf-8")
    status, out, err = run(
        capsys, "stats", "--src", str(tmp_path / "s.txt"), "--tgt", str(tmp_path / "t.txt"), "--max-tokens", "5"
    )
    assert status == 0 and err == ""
    assert "4 pairs read, 2 kept, 1 dropped empty, 1 dropped long (> 5 tokens)" in out
    rows = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in out.splitlines()[2:]}
    assert rows["src tokens"] == ["2", "2.5", "2.5", "3", "3"]
    assert rows["src chars"] == ["3", "4.0", "4.0", "5", "5"]
    assert rows["tgt tokens"] == ["1", "1.5", "1.5", "2", "2"]


def test_stats_of_a_tsv_file(capsys, tmp_path):
    (tmp_path / "d.tsv").write_text("one\teins\ntwo\tzwei\n", encoding="utf-8")
    status, out, _ = run(capsys, "stats", "--tsv", str(tmp_path / "d.tsv"))
    assert status == 0 and "2 pairs read, 2 kept, 0 dropped empty, 0 dropped long" in out
    assert "tgt chars" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--corpus", "copy", "--size", "0", "--out", "{tmp}/x"], "size must be a positive integer"),
        (
            ["generate", "--corpus", "copy", "--valid-fraction", "0.6", "--test-fraction", "0.6", "--out", "{tmp}/x"],
            "valid_fraction + test_fraction must be below 1",
        ),
        (["stats", "--src", "{tmp}/s.txt"], "give --src and --tgt (or --tsv); missing --tgt"),
        (["stats", "--tsv", "{tmp}/s.txt", "--src", "{tmp}/s.txt"], "give either --tsv or --src and --tgt, not both"),
        (["stats", "--src", "{tmp}/s.txt", "--tgt", "{tmp}/t.txt"], "s.txt has 2 lines but {tmp}/t.txt has 1"),
        (["stats", "--tsv", "{tmp}/s.txt"], "s.txt line 1 has 0 tabs; expected exactly one"),
        (["stats", "--tsv", "{tmp}/bad.tsv"], "bad.tsv line 2 is not valid UTF-8"),
    ],
)
def test_errors_are_one_line_with_status_2(capsys, tmp_path, argv, message):
    (tmp_path / "s.txt").write_text("a\nb\n", encoding="utf-8")
    (tmp_path / "t.txt").write_text("c\n", encoding="utf-8")
    (tmp_path / "bad.tsv").write_bytes(b"a\tb\n\xc3\x28\tc\n")
    status, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert status == 2 and out == ""
    assert err.startswith("qkv data: error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err
