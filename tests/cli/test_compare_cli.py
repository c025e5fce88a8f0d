"""``qkv compare``: sizes checked (one error line, exit 2), any number of heads for the grouped case."""

from __future__ import annotations

import pytest

from qkv.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--length", "0"], "--length must be a positive integer; got 0"),
        (["--heads", "-1"], "--heads must be a positive integer; got -1"),
        (["--head-dim", "0"], "--head-dim must be a positive integer; got 0"),
        (["--batch", "0"], "--batch must be a positive integer; got 0"),
        (["--repeats", "0"], "--repeats must be a positive integer; got 0"),
    ],
)
def test_sizes_must_be_positive(capsys, argv, message):
    assert main(["compare", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"qkv compare: error: {message}\n"


@pytest.mark.parametrize("heads, kv_heads", [(1, 1), (2, 1), (8, 2), (12, 3), (13, 1), (20, 5)])
def test_grouped_case_divides_the_heads(heads, kv_heads):
    from qkv.cli.compare import grouped_kv_heads

    assert grouped_kv_heads(heads) == kv_heads


def test_fewer_than_four_heads_run(capsys):
    assert main(["compare", "--batch", "1", "--heads", "2", "--length", "4", "--head-dim", "2", "--repeats", "1"]) == 0
    assert "grouped heads (1 kv heads)" in capsys.readouterr().out
