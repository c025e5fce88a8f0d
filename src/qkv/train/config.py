"""The training configuration: a YAML file with four sections, parsed into validated dataclasses.

::

    data:      what to train on (a built-in corpus generated into the output directory, or your files)
               and how to tokenize it
    model:     the architecture (``type``) and its hyper-parameters (the fields of TransformerConfig)
    training:  optimisation, schedule, validation and early stopping
    output:    where the model directory goes, checkpoints, logs

``qkv/configs/reference.yaml`` (``qkv train reference``) lists every option with a comment. Every key is
checked when the file is read: an unknown key is an error naming it and listing the valid keys of its section,
and a bad value is an error naming the key, e.g. ``training.lr must be a positive number; got -1``. ``--set
training.lr=1e-3`` on the command line overrides a key before validation; the value is parsed as YAML
(``null``, ``true``, ``[0.9, 0.98]``, numbers), so it has the type it would have in the file.

Numbers written ``5e-4`` are read as numbers: YAML 1.1 (PyYAML) reads an exponent without a dot as a
string, which would otherwise make ``lr: 5e-4`` an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qkv.data.batching import DEFAULT_BUCKET_SIZE
from qkv.data.safe_files import MiB, read_regular_file
from qkv.train.safe_yaml import MESSAGE_CHARS, YAMLTooLargeError, load_yaml, short_repr

CORPUS_NAMES = ("numbers", "dates", "copy", "reverse")
TOKENIZER_KINDS = ("char", "word", "sentencepiece")
SENTENCEPIECE_TYPES = ("unigram", "bpe")
MODEL_TYPES = ("transformer", "rnn")
SCHEDULES = ("inverse_sqrt", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
METRICS = ("bleu", "chrf", "exact_match", "loss")
EXPORTS = ("best", "last", "averaged")
# Keys of the model configs that training sets from the tokenizers, not from the config file.
MODEL_DERIVED = {
    "transformer": ("src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id", "eos_id", "shared_vocab"),
    "rnn": ("src_vocab_size", "tgt_vocab_size", "pad_id", "bos_id", "eos_id"),
}
# A config is a few KiB; a bigger file is a mistake (or /dev/zero), not something to read into memory.
MAX_CONFIG_BYTES = 4 * MiB
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key (``section.key``)."""


Check = Callable[[str, Any], Any]


def _number(value: Any) -> Any:
    """``value``, or the float a numeric string such as ``"5e-4"`` spells (see the module docstring)."""
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def int_at_least(minimum: int) -> Check:
    def check(name: str, value: Any) -> int:
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{name} must be an integer >= {minimum}; got {short_repr(value)}")
        return value

    return check


def positive_number(name: str, value: Any) -> float:
    value = _number(value)
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number; got {short_repr(value)}")
    return float(value)


def non_negative_number(name: str, value: Any) -> float:
    value = _number(value)
    if not _is_number(value) or value < 0:
        raise ConfigError(f"{name} must be a number >= 0; got {short_repr(value)}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    value = _number(value)
    if not _is_number(value) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a number in [0, 1); got {short_repr(value)}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false; got {short_repr(value)}")
    return value


def text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string; got {short_repr(value)}")
    return value


def one_of(*choices: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {short_repr(value)}")
        return value

    return check


def optional(inner: Check) -> Check:
    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


def betas(name: str, value: Any) -> list[float]:
    value = [_number(v) for v in value] if isinstance(value, (list, tuple)) else value
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(b) and 0 <= b < 1 for b in value)):
        raise ConfigError(f"{name} must be a list of two numbers in [0, 1), e.g. [0.9, 0.98]; got {short_repr(value)}")
    return [float(b) for b in value]


def _opt(default: Any, check: Check) -> Any:
    """A dataclass field with a default and a checker (in its metadata)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def _req(check: Check) -> Any:
    return field(metadata={"check": check})


class Section:
    """``from_dict``/``to_dict`` for a section dataclass whose fields carry checkers or are sections."""

    @classmethod
    def from_dict(cls, data: Any, prefix: str) -> Section:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix} must be a mapping of keys to values; got {short_repr(data)}")
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown key {prefix}.{key}; valid keys of {prefix}: {', '.join(names)}")
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            name = f"{prefix}.{f.name}"
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ConfigError(f"{name} is required")
                continue
            section = f.metadata.get("section")
            if section is not None:
                value = data[f.name]
                nullable = value is None and f.metadata.get("nullable")
                values[f.name] = None if nullable else section.from_dict(value, name)
            else:
                values[f.name] = f.metadata["check"](name, data[f.name])
        obj = cls(**values)
        obj.check(prefix)
        return obj

    def check(self, prefix: str) -> None:
        """Checks across fields (the single fields are checked by ``from_dict``)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Section) else value
        return out


@dataclass
class SplitFiles(Section):
    """One split of the user's parallel text: ``src`` + ``tgt`` files (one sentence a line) or one ``tsv``."""

    src: str | None = _opt(None, optional(text))
    tgt: str | None = _opt(None, optional(text))
    tsv: str | None = _opt(None, optional(text))

    def check(self, prefix: str) -> None:
        if self.tsv is not None and (self.src is not None or self.tgt is not None):
            raise ConfigError(f"{prefix}: give either tsv or src and tgt, not both")
        if self.tsv is None and (self.src is None or self.tgt is None):
            missing = "tgt" if self.src is not None else "src"
            raise ConfigError(f"{prefix}.{missing} is required (or give {prefix}.tsv instead of src and tgt)")


def _split(nullable: bool = True) -> Any:
    return field(default=None, metadata={"section": SplitFiles, "nullable": nullable})


@dataclass
class DataConfig(Section):
    corpus: str | None = _opt(None, optional(one_of(*CORPUS_NAMES)))
    size: int = _opt(25_000, int_at_least(10))
    seed: int = _opt(0, int_at_least(0))
    valid_fraction: float = _opt(0.1, fraction)
    test_fraction: float = _opt(0.1, fraction)
    train: SplitFiles | None = _split()
    valid: SplitFiles | None = _split()
    test: SplitFiles | None = _split()
    max_chars: int | None = _opt(None, optional(int_at_least(1)))
    max_length: int | None = _opt(None, optional(int_at_least(1)))
    tokenizer: str = _opt("char", one_of(*TOKENIZER_KINDS))
    vocab_size: int | None = _opt(None, optional(int_at_least(5)))
    sentencepiece_type: str = _opt("unigram", one_of(*SENTENCEPIECE_TYPES))
    shared_vocab: bool = _opt(False, boolean)

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
                        f"(or set {prefix}.corpus to one of {', '.join(CORPUS_NAMES)})"
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
class ModelConfig:
    """``type`` and the keyword arguments of its config class (vocabulary sizes and special ids excluded)."""

    type: str = "transformer"
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, prefix: str) -> ModelConfig:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{prefix} must be a mapping of keys to values; got {short_repr(data)}")
        kind = one_of(*MODEL_TYPES)(f"{prefix}.type", data.get("type", "transformer"))
        params = {key: value for key, value in data.items() if key != "type"}
        config = cls(kind, params)
        config.build(src_vocab_size=16, tgt_vocab_size=16, prefix=prefix)  # validates the values
        return config

    def valid_keys(self) -> list[str]:
        config_cls = _model_config_class(self.type)
        return [f.name for f in fields(config_cls) if f.name not in MODEL_DERIVED[self.type]]

    def build(self, *, src_vocab_size: int, tgt_vocab_size: int, shared_vocab: bool = False, prefix: str = "model"):
        """The model config (``TransformerConfig`` or ``RNNConfig``) for these vocabularies."""
        from qkv.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

        valid = self.valid_keys()
        for key in self.params:
            if key not in valid:
                raise ConfigError(
                    f"unknown key {prefix}.{key}; valid keys of {prefix} (type {self.type}): type, {', '.join(valid)}"
                )
        params = {key: _number(value) if isinstance(value, str) else value for key, value in self.params.items()}
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
class TrainingConfig(Section):
    seed: int = _opt(0, int_at_least(0))
    max_steps: int = _opt(10_000, int_at_least(1))
    max_tokens: int = _opt(4096, int_at_least(2))
    accumulate: int = _opt(1, int_at_least(1))
    bucket_size: int = _opt(DEFAULT_BUCKET_SIZE, int_at_least(1))
    lr: float = _opt(5e-4, positive_number)
    betas: list[float] = _opt([0.9, 0.98], betas)
    adam_eps: float = _opt(1e-9, positive_number)
    weight_decay: float = _opt(0.0, non_negative_number)
    schedule: str = _opt("inverse_sqrt", one_of(*SCHEDULES))
    warmup_steps: int = _opt(4000, int_at_least(0))
    min_lr: float = _opt(0.0, non_negative_number)
    clip_norm: float | None = _opt(1.0, optional(positive_number))
    label_smoothing: float = _opt(0.1, fraction)
    precision: str = _opt("fp32", one_of(*PRECISIONS))
    device: str = _opt("auto", one_of(*DEVICES))
    valid_every: int = _opt(1000, int_at_least(1))
    valid_beam: int = _opt(1, int_at_least(1))
    valid_max_sentences: int | None = _opt(None, optional(int_at_least(1)))
    length_penalty: float = _opt(1.0, non_negative_number)
    early_stopping_metric: str = _opt("bleu", one_of(*METRICS))
    patience: int | None = _opt(None, optional(int_at_least(1)))

    def check(self, prefix: str) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}.min_lr must be <= {prefix}.lr; got {self.min_lr} > {self.lr}")


@dataclass
class OutputConfig(Section):
    dir: str = _req(text)
    checkpoint_every: int = _opt(1000, int_at_least(1))
    keep_last: int = _opt(3, int_at_least(1))
    average_last: int = _opt(0, int_at_least(0))
    export: str = _opt("best", one_of(*EXPORTS))
    log_every: int = _opt(100, int_at_least(1))
    progress_bar: bool = _opt(True, boolean)
    tensorboard: bool = _opt(False, boolean)

    def check(self, prefix: str) -> None:
        if self.average_last > self.keep_last:
            raise ConfigError(
                f"{prefix}.average_last ({self.average_last}) must be <= {prefix}.keep_last ({self.keep_last}): "
                "only kept checkpoints can be averaged"
            )
        if self.average_last == 1:
            raise ConfigError(f"{prefix}.average_last must be 0 (off) or >= 2; got 1")
        if self.export == "averaged" and self.average_last < 2:
            raise ConfigError(f"{prefix}.export: averaged needs {prefix}.average_last >= 2; got {self.average_last}")


SECTIONS = ("data", "model", "training", "output")


@dataclass
class Config:
    """The whole training configuration (see the module docstring)."""

    data: DataConfig
    model: ModelConfig
    training: TrainingConfig
    output: OutputConfig

    @classmethod
    def from_dict(cls, data: Any) -> Config:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config is a mapping with sections {', '.join(SECTIONS)}; got {short_repr(data)}")
        for key in data:
            if key not in SECTIONS:
                raise ConfigError(f"unknown section {key}; valid sections: {', '.join(SECTIONS)}")
        if "output" not in data:
            raise ConfigError("output.dir is required (the model directory training writes)")
        return cls(
            data=DataConfig.from_dict(data.get("data"), "data"),  # type: ignore[arg-type]
            model=ModelConfig.from_dict(data.get("model"), "model"),
            training=TrainingConfig.from_dict(data.get("training"), "training"),  # type: ignore[arg-type]
            output=OutputConfig.from_dict(data.get("output"), "output"),  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    @property
    def output_dir(self) -> Path:
        return Path(self.output.dir)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"training.lr=1e-3"`` → ``(["training", "lr"], 0.001)``; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    path = key.strip().split(".")
    if not sep or not key.strip() or any(not part for part in path):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted key, e.g. training.lr=0.001; got {short_repr(item)}")
    if path[0] not in SECTIONS:
        raise ConfigError(f"--set {item}: unknown section {path[0]}; valid sections: {', '.join(SECTIONS)}")
    if len(path) < 2:
        raise ConfigError(f"--set {item}: name a key inside the {path[0]} section, e.g. {path[0]}.KEY=VALUE")
    try:
        value = load_yaml(raw)
    except YAMLTooLargeError as e:
        raise ConfigError(f"--set {short_repr(item)}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}: the value is not valid YAML: {e}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``KEY=VALUE`` of ``overrides`` set (creating sections as needed), in place."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {'.'.join(path[: depth + 1])} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


BUILTIN_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself, or, for a name like ``demo`` with no such file, qkv's built-in ``demo.yaml``."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and (BUILTIN_CONFIGS / f"{path}.yaml").is_file():
        return BUILTIN_CONFIGS / f"{path}.yaml"
    return path


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in the YAML file ``path`` (an empty file is ``{}``); a bare name such as ``demo`` or
    ``reference`` names one of qkv's built-in configs."""
    path = resolve_config_path(path)
    try:
        data_bytes = read_regular_file(path, MAX_CONFIG_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"cannot read config: {e}") from None
    try:
        raw = data_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data_bytes.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"config {path} is not UTF-8 text: byte 0x{data_bytes[e.start]:02x} on line {line}; save it as UTF-8"
        ) from None
    try:
        data = load_yaml(raw)
    except YAMLTooLargeError as e:
        raise ConfigError(f"config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping with sections {', '.join(SECTIONS)}")
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a YAML config; :class:`ConfigError` names the key at fault."""
    return Config.from_dict(apply_overrides(read_yaml(path), overrides))
