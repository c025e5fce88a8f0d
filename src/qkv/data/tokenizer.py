"""Tokenizers: text ↔ token ids, one interface for characters, words and SentencePiece subwords.

Every tokenizer has the same special ids, ``pad_id=0``, ``bos_id=1``, ``eos_id=2``, ``unk_id=3``, and

- ``encode(text) -> list[int]``: the ids of the text, without BOS or EOS (the batcher adds them);
  a unit outside the vocabulary becomes ``unk_id``.
- ``decode(ids) -> str``: the text; stops at the first ``eos_id``, skips ``pad_id`` and ``bos_id`` (so a
  model's padded output decodes as is), writes ``unk_id`` as ``⁇``. ``decode(encode(s)) == s`` for text
  within the vocabulary (for :class:`WordTokenizer`: text whose words are separated by single spaces).
- ``vocab_size``, ``save(path)`` and ``<class>.load(path)`` (or :func:`load_tokenizer` for any kind).

========================  =============================================================================
:class:`CharTokenizer`    one id per character; the vocabulary is the training text's characters. Fits
                          the built-in number and date corpora, whose German compounds are long "words".
:class:`WordTokenizer`    one id per whitespace-separated word.
:class:`ByteTokenizer`    one id per UTF-8 byte (256 ids after the special ones): needs no training and
                          has no unknown units; a language model's output may be invalid UTF-8, which
                          decodes with ``U+FFFD`` in place of each bad sequence.
:class:`SentencePieceTokenizer`  subwords learnt by the sentencepiece library (unigram or BPE) from the
                          training text (``data`` extra). Text is not normalised (SentencePiece's
                          ``identity`` rule), so the round trip is exact.
========================  =============================================================================

Saving writes JSON, never pickle: ``save("run/")`` writes ``run/tokenizer.json``; ``save("run/src.json")``
writes that file. A SentencePiece tokenizer also writes its model beside the JSON (``run/tokenizer.model``,
``run/src.model``), and the JSON records the model's SHA-256 so a mismatched pair is caught on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from qkv.checks import int_at_least
from qkv.data.parallel import DataError, Pair
from qkv.safe_files import MiB, read_regular_file

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
UNK_TEXT = "⁇"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
SENTENCEPIECE_MODEL_TYPES = ("unigram", "bpe")
# sentencepiece samples this many sentences when the text has more: enough for a good vocabulary, and it
# keeps training time and memory bounded on a large corpus.
SENTENCEPIECE_MAX_SENTENCES = 2_000_000
# Tokenizer files are read whole; a large word vocabulary is a few MiB, so more than this is not a tokenizer
# (or is /dev/zero behind a symlink).
MAX_TOKENIZER_BYTES = 256 * MiB

Example = tuple[list[int], list[int]]


def tokenizer_path(path: str | os.PathLike) -> Path:
    """The JSON file of a tokenizer saved at ``path``: ``path`` itself if it ends in ``.json``, else
    ``path/tokenizer.json``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / TOKENIZER_FILE


def _check_int(name: str, value: object, minimum: int, why: str = "") -> None:
    expected = f"an integer >= {minimum}" + (f" ({why})" if why else "")
    int_at_least(name, value, minimum, expected=expected, error=DataError)


def _read_config(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    json_path = tokenizer_path(path)
    try:
        raw = read_regular_file(json_path, MAX_TOKENIZER_BYTES)
    except OSError as e:
        raise DataError(f"cannot read tokenizer {json_path}: {e.strerror or e}") from None
    except ValueError as e:
        raise DataError(f"cannot read tokenizer: {e}") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"tokenizer {json_path} is not a JSON file: {e}") from None
    if not isinstance(config, dict) or config.get("type") not in TOKENIZERS:
        got = config.get("type") if isinstance(config, dict) else type(config).__name__
        raise DataError(f'tokenizer {json_path}: expected a "type" of {", ".join(TOKENIZERS)}; got {got!r}')
    if config.get("format") != FORMAT_VERSION:
        raise DataError(
            f"tokenizer {json_path} has format {config.get('format')!r}; this qkv reads format {FORMAT_VERSION}"
        )
    return config, json_path


class Tokenizer(ABC):
    """Text ↔ ids; the special ids are the same for every tokenizer (see the module docstring)."""

    kind: ClassVar[str]
    pad_id: ClassVar[int] = PAD_ID
    bos_id: ClassVar[int] = BOS_ID
    eos_id: ClassVar[int] = EOS_ID
    unk_id: ClassVar[int] = UNK_ID

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special ones included; ids are ``0 .. vocab_size - 1``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without BOS or EOS; units outside the vocabulary become ``unk_id``."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str:
        """The text of ids with no special id but ``unk_id``."""

    @abstractmethod
    def _config(self, json_path: Path) -> dict[str, Any]:
        """What ``save`` writes to the JSON beside ``type`` and ``format`` (writing any other file it needs)."""

    @classmethod
    @abstractmethod
    def _from_config(cls, config: dict[str, Any], json_path: Path) -> Tokenizer:
        """The tokenizer saved as ``config`` in ``json_path``; ``DataError`` naming the file if it is bad."""

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: stops at the first ``eos_id``, skips ``pad_id`` and ``bos_id``.

        Raises:
            DataError: an id outside ``0 .. vocab_size - 1``.
        """
        content: list[int] = []
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise DataError(f"id {i} is outside the vocabulary: expected 0 .. {self.vocab_size - 1}")
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                content.append(i)
        return self._decode(content)

    def save(self, path: str | os.PathLike) -> Path:
        """Save as JSON at ``path`` (a directory, or a file ending in ``.json``); returns the JSON path."""
        json_path = tokenizer_path(path)
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            config = {"type": self.kind, "format": FORMAT_VERSION, **self._config(json_path)}
            json_path.write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise DataError(f"cannot save tokenizer to {json_path}: {e.strerror or e}") from None
        return json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer saved at ``path`` by ``save``; ``DataError`` if it is missing, bad, or another kind."""
        config, json_path = _read_config(path)
        if cls is not Tokenizer and config["type"] != cls.kind:
            raise DataError(f"tokenizer {json_path} is a {config['type']} tokenizer, not {cls.kind}")
        return TOKENIZERS[config["type"]]._from_config(config, json_path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class _VocabTokenizer(Tokenizer):
    """A tokenizer with an explicit token list: ``tokens[i]`` is the text of id ``i``."""

    separator: ClassVar[str]

    def __init__(self, tokens: Sequence[str]) -> None:
        """``tokens``: the vocabulary, the four special tokens first (as :meth:`train` makes it)."""
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise DataError(f"the vocabulary must start with {list(SPECIAL_TOKENS)}; got {list(tokens[:4])}")
        self.tokens = list(tokens)
        # A literal "<unk>" in the text is an ordinary unit with its own id, not the special one.
        self._index = {token: i for i, token in enumerate(self.tokens[4:], start=4)}
        if len(self._index) != len(self.tokens) - 4:
            repeated = next(t for t, n in Counter(self.tokens[4:]).items() if n > 1)
            raise DataError(f"the vocabulary has {repeated!r} twice; expected each unit once")

    @staticmethod
    @abstractmethod
    def units(text: str) -> list[str]:
        """The units (characters or words) ``text`` is made of."""

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int | None = None, min_count: int = 1) -> _VocabTokenizer:
        """Build the vocabulary from ``texts``: units seen at least ``min_count`` times, most frequent first.

        Args:
            texts: the training text, e.g. the source (or target) sentences of the training split.
            vocab_size: the most ids, the four special ones included (``None``: every unit kept); the
                rarest units beyond it map to ``unk_id``.
            min_count: units seen fewer times map to ``unk_id``.
        """
        if vocab_size is not None:
            _check_int("vocab_size", vocab_size, 5, "4 special ids and 1 unit")
        _check_int("min_count", min_count, 1)
        counts = Counter(unit for text in texts for unit in cls.units(text))
        if not counts:
            raise DataError(f"no text to build the {cls.kind} vocabulary from; expected at least one non-empty text")
        ranked = sorted((unit for unit, n in counts.items() if n >= min_count), key=lambda u: (-counts[u], u))
        if vocab_size is not None:
            ranked = ranked[: vocab_size - len(SPECIAL_TOKENS)]
        return cls([*SPECIAL_TOKENS, *ranked])

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self._index.get(unit, UNK_ID) for unit in self.units(text)]

    def _decode(self, ids: list[int]) -> str:
        return self.separator.join(UNK_TEXT if i == UNK_ID else self.tokens[i] for i in ids)

    def _config(self, json_path: Path) -> dict[str, Any]:
        return {"tokens": self.tokens}

    @classmethod
    def _from_config(cls, config: dict[str, Any], json_path: Path) -> Tokenizer:
        tokens = config.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise DataError(f'tokenizer {json_path}: "tokens" must be a list of strings')
        bad = next((t for t in tokens[4:] if cls.units(t) != [t]), None)
        if bad is not None:
            raise DataError(f"tokenizer {json_path}: {bad!r} is not one {cls.kind} unit")
        try:
            return cls(tokens)
        except DataError as e:
            raise DataError(f"tokenizer {json_path}: {e}") from None

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.tokens == self.tokens

    __hash__ = None  # type: ignore[assignment]


class CharTokenizer(_VocabTokenizer):
    """One id per character (Unicode code point); ``decode`` joins them with nothing."""

    kind = "char"
    separator = ""

    @staticmethod
    def units(text: str) -> list[str]:
        return list(text)


class ByteTokenizer(Tokenizer):
    """One id per UTF-8 byte: byte ``b`` is id ``4 + b`` (``vocab_size`` 260); nothing to train.

    ``decode`` writes each invalid UTF-8 sequence (a model can sample any byte order) as ``U+FFFD``
    (``errors="replace"``) and ``unk_id`` as ``⁇``.
    """

    kind = "byte"
    offset: ClassVar[int] = len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return self.offset + 256

    def encode(self, text: str) -> list[int]:
        return [self.offset + b for b in text.encode("utf-8")]

    def _decode(self, ids: list[int]) -> str:
        pieces, run = [], bytearray()
        for i in ids:
            if i == UNK_ID:
                pieces += [run.decode("utf-8", errors="replace"), UNK_TEXT]
                run = bytearray()
            else:
                run.append(i - self.offset)
        return "".join(pieces) + run.decode("utf-8", errors="replace")

    def _config(self, json_path: Path) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_config(cls, config: dict[str, Any], json_path: Path) -> Tokenizer:
        return cls()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    __hash__ = None  # type: ignore[assignment]


class WordTokenizer(_VocabTokenizer):
    """One id per whitespace-separated word; ``decode`` joins them with single spaces."""

    kind = "word"
    separator = " "

    @staticmethod
    def units(text: str) -> list[str]:
        return text.split()


def _sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError:
        raise DataError("the sentencepiece tokenizer needs sentencepiece; pip install 'qkv[data]'") from None
    return sentencepiece


class SentencePieceTokenizer(Tokenizer):
    """Subwords learnt by SentencePiece; the model itself is the serialized ``.model`` protobuf."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes) -> None:
        """``model_proto``: a serialized SentencePiece model whose special ids are qkv's (as :meth:`train` makes)."""
        spm = _sentencepiece()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise DataError(f"not a SentencePiece model: {e}") from None
        got = (processor.pad_id(), processor.bos_id(), processor.eos_id(), processor.unk_id())
        if got != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise DataError(
                f"the SentencePiece model has pad, bos, eos, unk ids {got}; expected {(PAD_ID, BOS_ID, EOS_ID, UNK_ID)}"
            )
        self.model_proto = bytes(model_proto)
        self._sp = processor

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int = 8000,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        user_defined_symbols: Sequence[str] = (),
    ) -> SentencePieceTokenizer:
        """Learn a SentencePiece model from ``texts`` (in memory; no file is written).

        Args:
            texts: the training text, one sentence each.
            vocab_size: ids wanted, the four special ones included. If the text supports fewer (a small
                corpus), the model gets as many as it supports and a ``UserWarning`` says so.
            model_type: ``"unigram"`` or ``"bpe"``.
            character_coverage: the share of characters the vocabulary must cover (rarer characters map to
                ``unk_id``); 1.0 keeps all, 0.9995 suits scripts with many rare characters.
            user_defined_symbols: strings that are always one piece, even where ``texts`` never has them;
                ``("\\n",)`` lets running text (a language model's) keep its line breaks, which the
                one-line training sentences cannot teach.

        Raises:
            DataError: no text, a bad argument, or ``vocab_size`` below what the text's characters need.
        """
        if model_type not in SENTENCEPIECE_MODEL_TYPES:
            raise DataError(f"model_type must be one of {', '.join(SENTENCEPIECE_MODEL_TYPES)}; got {model_type!r}")
        _check_int("vocab_size", vocab_size, 5, "4 special ids and 1 piece")
        if not 0 < character_coverage <= 1:
            raise DataError(f"character_coverage must be in (0, 1]; got {character_coverage}")
        sentences = [text for text in texts if text.strip()]
        if not sentences:
            raise DataError("no text to train the SentencePiece model on; expected at least one non-empty text")
        spm = _sentencepiece()
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                unk_surface=UNK_TEXT,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                hard_vocab_limit=False,  # a soft limit: a small text gets a smaller vocabulary, not an error
                input_sentence_size=SENTENCEPIECE_MAX_SENTENCES,
                user_defined_symbols=list(user_defined_symbols),
                shuffle_input_sentence=True,
                num_threads=1,  # for a deterministic model
                minloglevel=2,
            )
        except RuntimeError as e:
            need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
            if need:
                raise DataError(
                    f"vocab_size {vocab_size} is too small for the training text's characters and the 4 special "
                    f"ids; expected at least {need.group(1)} (or a lower character_coverage)"
                ) from None
            raise DataError(f"SentencePiece training failed: {e}") from None
        tokenizer = cls(model.getvalue())
        if tokenizer.vocab_size < vocab_size:
            warnings.warn(
                f"vocab_size {vocab_size} is more than the training text supports; the SentencePiece "
                f"{model_type} model has {tokenizer.vocab_size} ids",
                UserWarning,
                stacklevel=2,
            )
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _config(self, json_path: Path) -> dict[str, Any]:
        model_path = json_path.with_suffix(".model")
        model_path.write_bytes(self.model_proto)
        return {
            "model_file": model_path.name,
            "sha256": hashlib.sha256(self.model_proto).hexdigest(),
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def _from_config(cls, config: dict[str, Any], json_path: Path) -> Tokenizer:
        name = config.get("model_file")
        if not isinstance(name, str) or Path(name).name != name:
            raise DataError(f'tokenizer {json_path}: "model_file" must be a file name beside it; got {name!r}')
        model_path = json_path.parent / name
        try:
            proto = read_regular_file(model_path, MAX_TOKENIZER_BYTES)
        except OSError as e:
            raise DataError(f"cannot read the SentencePiece model {model_path}: {e.strerror or e}") from None
        except ValueError as e:
            raise DataError(f"cannot read the SentencePiece model: {e}") from None
        digest = hashlib.sha256(proto).hexdigest()
        if digest != config.get("sha256"):
            raise DataError(
                f"{model_path} has SHA-256 {digest[:12]}… but {json_path} expects {str(config.get('sha256'))[:12]}…; "
                f"the model file was replaced after saving"
            )
        try:
            return cls(proto)
        except DataError as e:
            raise DataError(f"{model_path}: {e}") from None

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.model_proto == self.model_proto

    __hash__ = None  # type: ignore[assignment]


TOKENIZERS: dict[str, type[Tokenizer]] = {
    CharTokenizer.kind: CharTokenizer,
    WordTokenizer.kind: WordTokenizer,
    ByteTokenizer.kind: ByteTokenizer,
    SentencePieceTokenizer.kind: SentencePieceTokenizer,
}


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Any tokenizer saved at ``path`` (a directory holding ``tokenizer.json``, or a ``.json`` file)."""
    return Tokenizer.load(path)


def train_tokenizer(
    kind: str, texts: Iterable[str], *, vocab_size: int | None = None, model_type: str | None = None
) -> Tokenizer:
    """A tokenizer of ``kind`` (``"char"``, ``"word"``, ``"byte"`` or ``"sentencepiece"``) trained on ``texts``.

    ``vocab_size``: the most ids (``None``: every unit for char and word, 8000 for sentencepiece; the byte
    tokenizer has 260 and takes none);
    ``model_type``: the sentencepiece model, ``"unigram"`` (the default) or ``"bpe"``.
    """
    if kind not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {kind!r}; expected one of {', '.join(TOKENIZERS)}")
    if kind == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer.train(
            texts, vocab_size=vocab_size or 8000, model_type=model_type or SENTENCEPIECE_MODEL_TYPES[0]
        )
    if model_type is not None:
        raise DataError(f"model_type is for the sentencepiece tokenizer; the {kind} tokenizer has none")
    if kind == ByteTokenizer.kind:
        if vocab_size is not None:
            raise DataError(f"the byte tokenizer has a fixed vocabulary of 260 ids; got vocab_size {vocab_size}")
        return ByteTokenizer()
    vocab_tokenizer = TOKENIZERS[kind]
    assert issubclass(vocab_tokenizer, _VocabTokenizer), kind
    return vocab_tokenizer.train(texts, vocab_size=vocab_size)


def encode_pairs(pairs: Iterable[Pair], src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer) -> list[Example]:
    """``[(source ids, target ids), ...]`` of ``(source, target)`` text pairs, ready for the batchers."""
    return [(src_tokenizer.encode(src), tgt_tokenizer.encode(tgt)) for src, tgt in pairs]
