"""Running text for language models: reading files, the built-in text, the split, training and scoring blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qkv.data import DataError, RandomBlocks, builtin_text, read_texts, score_windows, split_text, token_stream
from qkv.data.text import check_blocks


def test_builtin_text_is_pythons_documentation_and_can_be_capped() -> None:
    text = builtin_text("python_docs")
    assert len(text) > 300_000 and 'The "if" statement' in text
    assert builtin_text("python_docs", max_chars=1000) == text[:1000]
    with pytest.raises(DataError, match="unknown built-in text 'shakespeare'; expected one of python_docs"):
        builtin_text("shakespeare")


def test_files_are_joined_in_order_with_a_line_break(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first\nline", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfsecond\n")  # a byte-order mark is dropped
    assert read_texts([tmp_path / "a.txt", tmp_path / "b.txt"]) == "first\nline\nsecond\n"


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read .*missing.txt: No such file"):
        read_texts([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.txt is empty; expected text"):
        read_texts([tmp_path / "empty.txt"])
    (tmp_path / "latin1.txt").write_bytes(b"ok\nstill ok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin1.txt line 3 is not valid UTF-8 \(0xe9 at byte 4 of the line\)"):
        read_texts([tmp_path / "latin1.txt"])
    with pytest.raises(DataError, match="is a directory; expected a regular file"):
        read_texts([tmp_path])
    with pytest.raises(DataError, match="no text files given"):
        read_texts([])


def test_the_split_is_by_position() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, valid = split_text(text, 0.1)
    assert (train, valid) == (text[:900], text[900:])
    with pytest.raises(DataError, match="a text of 3 characters leaves no validation text with valid_fraction 0.1"):
        split_text("abc", 0.1)
    with pytest.raises(DataError, match=r"valid_fraction must be a number in \(0, 1\); got 0"):
        split_text(text, 0)


def test_random_blocks_are_contiguous_seeded_and_cover_every_offset() -> None:
    tokens = torch.arange(20)  # token i at position i: a block is a run of consecutive numbers
    blocks = RandomBlocks(tokens, block_size=4, batch_size=50, seed=3)
    stream = iter(blocks)
    batch = next(stream)
    assert batch.shape == (50, 5)
    assert torch.equal(batch - batch[:, :1], torch.arange(5).expand(50, 5))
    starts = {int(s) for _ in range(20) for s in next(stream)[:, 0]}
    assert starts == set(range(16))  # offsets 0 .. N - block_size - 1, the last block ends at the last token
    assert blocks.batches == 21 and blocks.epoch == pytest.approx(21 * 50 * 4 / 19)
    again = next(iter(RandomBlocks(tokens, block_size=4, batch_size=50, seed=3)))
    other = next(iter(RandomBlocks(tokens, block_size=4, batch_size=50, seed=4)))
    assert torch.equal(again, batch) and not torch.equal(other, batch)


def test_random_blocks_resume_with_the_next_batch() -> None:
    tokens = torch.arange(100)
    run = iter(RandomBlocks(tokens, block_size=8, batch_size=3, seed=0))
    uninterrupted = [next(run) for _ in range(6)]

    first = RandomBlocks(tokens, block_size=8, batch_size=3, seed=0)
    first_stream = iter(first)
    for _ in range(4):
        next(first_stream)
    resumed = RandomBlocks(tokens, block_size=8, batch_size=3, seed=0)
    resumed.load_state_dict(first.state_dict())
    resumed_stream = iter(resumed)
    assert torch.equal(next(resumed_stream), uninterrupted[4])
    assert torch.equal(next(resumed_stream), uninterrupted[5])

    changed = RandomBlocks(torch.arange(99), block_size=8, batch_size=3, seed=0)
    with pytest.raises(DataError, match="belongs to a stream of 100 tokens with seed 0, not this one"):
        changed.load_state_dict(first.state_dict())


def test_text_shorter_than_one_block_is_refused() -> None:
    stream = token_stream([5, 6, 7], bos_id=1)
    assert stream.tolist() == [1, 5, 6, 7]
    check_blocks(stream, 3, "training text")
    with pytest.raises(DataError, match=r"training text has 3 tokens after tokenizing, shorter than one block"):
        RandomBlocks(stream, block_size=4, batch_size=2)


def test_score_windows_predict_every_token_once() -> None:
    tokens = torch.arange(11)
    windows = score_windows(tokens, 4)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10]]
    assert torch.equal(torch.cat([w[1:] for w in windows]), tokens[1:])
    assert len(score_windows(tokens, 4, max_windows=2)) == 2
    with pytest.raises(DataError, match="nothing to score"):
        score_windows(torch.tensor([1]), 4)
