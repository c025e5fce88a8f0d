"""The config sections of the translation task: ``data:``, ``model:`` and its own ``training:`` keys.

``model.type`` is ``transformer`` (:class:`~qkv.models.TransformerConfig`) or ``rnn``
(:class:`~qkv.models.RNNConfig`); the other ``model:`` keys are that config's fields, except the
vocabulary sizes and special ids, which come from the tokenizers. The ``training:`` keys that only
translation reads (:class:`TranslationTrainingConfig`) sit beside the trainer's own in the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from qkv.checks import (
    MESSAGE_CHARS,
    ConfigError,
    StrictConfig,
    boolean,
    fraction,
    int_at_least,
    non_negative_number,
    one_of,
    option,
    optional,
    section,
    short_repr,
    text,
)
from qkv.data.batching import DEFAULT_BUCKET_SIZE
from qkv.data.corpus import CORPORA
from qkv.data.tokenizer import SENTENCEPIECE_MODEL_TYPES, TOKENIZERS

MODEL_TYPES = ("transformer", "rnn")
# Keys of the model configs that training sets from the tokenizers, not from the config file.
MODEL_DERIVED = {
    "transformer": ("src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id", "eos_id", "shared_vocab"),
    "rnn": ("src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id", "eos_id"),
}


@dataclass
class SplitFiles(StrictConfig):
    """One split of the user's parallel text: ``src`` + ``tgt`` files (one sentence a line) or one ``tsv``."""

    src: str | None = option(None, optional(text))
    tgt: str | None = option(None, optional(text))
    tsv: str | None = option(None, optional(text))

    def check(self, prefix: str) -> None:
        if self.tsv is not None and (self.src is not None or self.tgt is not None):
            raise ConfigError(f"{prefix}: give either tsv or src and tgt, not both")
        if self.tsv is None and (self.src is None or self.tgt is None):
            missing = "tgt" if self.src is not None else "src"
            raise ConfigError(f"{prefix}.{missing} is required (or give {prefix}.tsv instead of src and tgt)")


@dataclass
class TranslationDataConfig(StrictConfig):
    """``data:`` of a translation run: a built-in corpus or your parallel files, and the tokenizers."""

    corpus: str | None = option(None, optional(one_of), CORPORA)
    size: int = option(25_000, int_at_least, 10)
    seed: int = option(0, int_at_least, 0)
    valid_fraction: float = option(0.1, fraction)
    test_fraction: float = option(0.1, fraction)
    train: SplitFiles | None = section(SplitFiles, nullable=True)
    valid: SplitFiles | None = section(SplitFiles, nullable=True)
    test: SplitFiles | None = section(SplitFiles, nullable=True)
    max_chars: int | None = option(None, optional(int_at_least), 1)
    max_length: int | None = option(None, optional(int_at_least), 1)
    tokenizer: str = option("char", one_of, TOKENIZERS)
    vocab_size: int | None = option(None, optional(int_at_least), 5)
    sentencepiece_type: str = option("unigram", one_of, SENTENCEPIECE_MODEL_TYPES)
    shared_vocab: bool = option(False, boolean)

    def check(self, prefix: str) -> None:
        files = [name for name in ("train", "valid", "test") if getattr(self, name) is not None]
        if self.corpus is not None and files:
            raise ConfigError(
                f"{prefix}: give either {prefix}.corpus (a built-in corpus) or files ({prefix}.train, .valid, "
                f".test), not both; got corpus {self.corpus!r} and {', '.join(files)}"
            )
        if self.corpus is None:
            for name in ("train", "valid"):
                if getattr(self, name) is None:
                    raise ConfigError(
                        f"{prefix}.{name} is required when {prefix}.corpus is not set "
                        f"(or set {prefix}.corpus to one of {', '.join(CORPORA)})"
                    )
        elif self.valid_fraction == 0:
            raise ConfigError(f"{prefix}.valid_fraction must be > 0: training validates on the valid split")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"{prefix}.valid_fraction + {prefix}.test_fraction must be below 1; "
                f"got {self.valid_fraction} + {self.test_fraction}"
            )
        if self.tokenizer == "sentencepiece" and self.vocab_size is None:
            self.vocab_size = 8000


@dataclass
class TranslationModelConfig:
    """``type`` and the keyword arguments of its config class (vocabulary sizes and special ids excluded)."""

    type: str = "transformer"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, prefix: str = "model") -> TranslationModelConfig:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix} must be a mapping of keys to values; got {short_repr(data)}")
        kind = one_of(f"{prefix}.type", data.get("type", "transformer"), MODEL_TYPES)
        params = {key: value for key, value in data.items() if key != "type"}
        config = cls(kind, params)
        config.build(src_vocab_size=16, tgt_vocab_size=16, prefix=prefix)  # validates the values
        return config

    def valid_keys(self) -> list[str]:
        config_cls = _model_config_class(self.type)
        return [f.name for f in fields(config_cls) if f.name not in MODEL_DERIVED[self.type]]

    def build(
        self, *, src_vocab_size: int, tgt_vocab_size: int, shared_vocab: bool = False, prefix: str = "model"
    ) -> Any:
        """The model config (``TransformerConfig`` or ``RNNConfig``) for these vocabularies."""
        from qkv.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

        valid = self.valid_keys()
        for key in self.params:
            if key not in valid:
                raise ConfigError(
                    f"unknown key {prefix}.{key}; valid keys of {prefix} (type {self.type}): type, {', '.join(valid)}"
                )
        params = dict(self.params)
        if self.type == "transformer":
            derived = {
                "src_vocab_size": src_vocab_size,
                "tgt_vocab_size": tgt_vocab_size,
                "shared_vocab": shared_vocab,
            }
        else:
            derived = {"src_vocab_size": src_vocab_size, "tgt_vocab_size": tgt_vocab_size}
        derived.update(pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID)
        try:
            return _model_config_class(self.type)(**params, **derived)
        except (ValueError, TypeError) as e:
            # The model configs repr the bad value in full; keep the message to a readable line.
            full = str(e).removeprefix("RNNConfig.")
            message = full if len(full) <= 2 * MESSAGE_CHARS else full[: 2 * MESSAGE_CHARS - 1] + "…"
            named = any(message.startswith(k) for k in params)
            raise ConfigError(f"{prefix}.{message}" if named else f"{prefix}: {message}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.params}


def _model_config_class(kind: str) -> type:
    from qkv.models import RNNConfig, TransformerConfig

    return TransformerConfig if kind == "transformer" else RNNConfig


@dataclass
class TranslationTrainingConfig(StrictConfig):
    """The ``training:`` keys only translation reads: its batches, its loss and its validation search."""

    max_tokens: int = option(4096, int_at_least, 2)
    bucket_size: int = option(DEFAULT_BUCKET_SIZE, int_at_least, 1)
    label_smoothing: float = option(0.1, fraction)
    valid_beam: int = option(1, int_at_least, 1)
    valid_max_sentences: int | None = option(None, optional(int_at_least), 1)
    length_penalty: float = option(1.0, non_negative_number)
