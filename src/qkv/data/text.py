"""Running text for language modelling: reading it, splitting it, and cutting it into blocks.

A language model trains on one long token stream. This module gives:

- :func:`read_texts` the user's UTF-8 text files (one or more, joined by a line break), with errors naming
  the file: missing, not UTF-8 (with the line), empty;
- :func:`builtin_text` the built-in corpus ``python_docs``: the English reference text that CPython ships
  in ``pydoc_data.topics`` (what ``help("if")`` prints), about 465 kB in 79 topics joined in sorted order.
  It is real prose mixed with code and grammar, present in every Python installation (no download, no
  extra package), and large enough for a character-level model to learn spelling and layout in minutes.
  Its exact text follows the Python version (a model's ``train.yaml`` records the data settings, not the
  text); ``max_chars`` keeps its first characters only;
- :func:`split_text` the held-out split by position: the last ``valid_fraction`` of the characters (as
  nanoGPT splits tiny Shakespeare), not shuffled lines, so no validation sentence has a neighbour in the
  training text;
- :func:`token_stream` a split's ids as a 1-D tensor, ``bos_id`` first: every text token is then a
  prediction target, so a score over the stream covers the whole text;
- :class:`RandomBlocks` the training batches: ``B`` blocks of ``block_size + 1`` consecutive tokens at
  uniformly random offsets (nanoGPT's ``get_batch``), the inputs ``block[:-1]`` and targets ``block[1:]``,
  seeded per batch so that ``--resume`` continues with the very batches an uninterrupted run would draw;
- :func:`score_windows` deterministic scoring blocks: consecutive windows of ``block_size + 1`` tokens that
  share their boundary token, so every token after the first is predicted exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qkv.data.parallel import DataError
from qkv.safe_files import MiB, read_regular_file

BUILTIN_TEXTS = ("python_docs",)
# The token stream lives in memory as int64 (8 bytes a token); beyond this a file is a mistake, not a corpus.
MAX_TEXT_BYTES = 1024 * MiB


def builtin_text(name: str, *, max_chars: int | None = None) -> str:
    """The built-in corpus ``name`` (see the module docstring), cut to its first ``max_chars`` characters."""
    if name not in BUILTIN_TEXTS:
        raise DataError(f"unknown built-in text {name!r}; expected one of {', '.join(BUILTIN_TEXTS)}")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key].strip("\n") for key in sorted(topics)) + "\n"
    return text if max_chars is None else text[:max_chars]


def decode_text(data: bytes, source: str) -> str:
    """UTF-8 ``data`` as text (a leading byte-order mark dropped; line endings kept as they are).

    Raises:
        DataError: ``data`` is not UTF-8; the message names ``source``, the line and the offending byte.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{source} line {line} is not valid UTF-8 (0x{data[e.start]:02x} at byte {e.start - line_start + 1} "
            "of the line); expected UTF-8 text"
        ) from None


def read_text(path: str | os.PathLike) -> str:
    """The text of one UTF-8 file.

    Raises:
        DataError: missing or unreadable, not a regular file, larger than :data:`MAX_TEXT_BYTES`, empty (or
            only whitespace), or not UTF-8 (naming the line).
    """
    try:
        data = read_regular_file(path, MAX_TEXT_BYTES)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(f"cannot read the text file: {e}") from None
    text = decode_text(data, str(path))
    if not text.strip():
        raise DataError(f"{path} is empty; expected text to train or score a language model on")
    return text


def read_texts(paths: Sequence[str | os.PathLike]) -> str:
    """The texts of ``paths`` in order, joined by a line break where a file does not end with one."""
    if not paths:
        raise DataError("no text files given; expected at least one")
    texts = [read_text(path) for path in paths]
    return "".join(t if t.endswith("\n") or i == len(texts) - 1 else t + "\n" for i, t in enumerate(texts))


def split_text(text: str, valid_fraction: float) -> tuple[str, str]:
    """``(train, valid)``: ``valid`` is the last ``valid_fraction`` of ``text``'s characters (see the module
    docstring); ``valid_fraction`` in ``(0, 1)``."""
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) or not 0 < valid_fraction < 1:
        raise DataError(f"valid_fraction must be a number in (0, 1); got {valid_fraction!r}")
    cut = len(text) - round(len(text) * valid_fraction)
    if cut <= 0 or cut >= len(text):
        raise DataError(
            f"a text of {len(text)} characters leaves no {'training' if cut <= 0 else 'validation'} text with "
            f"valid_fraction {valid_fraction}; expected a longer text"
        )
    return text[:cut], text[cut:]


def token_stream(ids: Sequence[int], bos_id: int) -> torch.Tensor:
    """``(N + 1,)`` int64: ``bos_id`` then ``ids``."""
    return torch.tensor([bos_id, *ids], dtype=torch.long)


def check_blocks(tokens: torch.Tensor, block_size: int, what: str) -> None:
    """``DataError`` unless ``tokens (N,)`` holds at least one block of ``block_size + 1`` tokens."""
    if tokens.numel() < block_size + 1:
        raise DataError(
            f"the {what} has {tokens.numel() - 1} tokens after tokenizing, shorter than one block: expected at "
            f"least block_size={block_size} (use more text or a smaller data.block_size)"
        )


class RandomBlocks:
    """Endless training batches ``(B, block_size + 1)`` of blocks at random offsets of ``tokens``.

    Batch ``k`` draws its ``B`` offsets uniformly from ``0 .. N - block_size - 1`` with a generator seeded by
    ``(seed, k)``, so it depends only on ``k``: :meth:`state_dict` is just ``k``, and a resumed run sees the
    batches an uninterrupted one would.

    Args:
        tokens: ``(N,)`` the training token stream.
        block_size: ``T``, the tokens a model sees at once; each block has ``T + 1`` (inputs and targets).
        batch_size: ``B``, blocks per batch.
        seed: the seed of the offsets.

    Attributes:
        batches: batches drawn so far.
    """

    def __init__(self, tokens: torch.Tensor, *, block_size: int, batch_size: int, seed: int = 0) -> None:
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be an integer >= 1; got {value!r}")
        if tokens.ndim != 1:
            raise DataError(f"tokens must be a 1-D stream; got shape {tuple(tokens.shape)}")
        check_blocks(tokens, block_size, "training text")
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.batches = 0
        self._index = torch.arange(block_size + 1)

    def batch(self, k: int) -> torch.Tensor:
        """Batch number ``k``: ``(B, T + 1)`` int64."""
        high = self.tokens.numel() - self.block_size  # offsets 0 .. high - 1
        offsets = np.random.default_rng((self.seed, k)).integers(0, high, size=self.batch_size)
        return self.tokens[torch.from_numpy(offsets)[:, None] + self._index]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            k = self.batches
            self.batches += 1  # counted when handed out: a checkpoint after it resumes with the next one
            yield self.batch(k)

    @property
    def epoch(self) -> float:
        """Target tokens drawn so far / training tokens (passes over the training text, on average)."""
        return self.batches * self.batch_size * self.block_size / max(self.tokens.numel() - 1, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed, "tokens": int(self.tokens.numel())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after ``state["batches"]`` batches; ``DataError`` if it comes from another stream."""
        batches = state.get("batches")
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise DataError(f"the saved batch position must be an integer >= 0; got {batches!r}")
        if state.get("seed") != self.seed or state.get("tokens") != self.tokens.numel():
            raise DataError(
                f"the saved batch position belongs to a stream of {state.get('tokens')} tokens with seed "
                f"{state.get('seed')}, not this one ({self.tokens.numel()} tokens, seed {self.seed}); "
                "the data changed since the checkpoint"
            )
        self.batches = batches


def score_windows(tokens: torch.Tensor, block_size: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Consecutive windows of ``tokens (N,)`` for scoring: ``tokens[i*T : i*T + T + 1]``, the last one shorter
    when ``N - 1`` is not a multiple of ``T``; each window's targets are its tokens after the first, so the
    windows predict ``tokens[1:]`` exactly once. ``max_windows``: only the first that many.

    Returns:
        A list of ``(T + 1,)`` tensors (the last possibly shorter, at least 2 tokens).
    """
    if tokens.numel() < 2:
        raise DataError(f"nothing to score: expected at least one token of text; got {tokens.numel() - 1}")
    starts = range(0, tokens.numel() - 1, block_size)
    if max_windows is not None:
        starts = starts[:max_windows]
    return [tokens[s : s + block_size + 1] for s in starts]
