"""``export_ctranslate2``: a qkv model directory → a CTranslate2 model directory, tokenizers beside it.

The output directory holds::

    model.bin, config.json        the CTranslate2 model (written by ctranslate2's spec API)
    shared_vocabulary.json        the token strings (or source_ + target_vocabulary.json; vocabulary.json
                                  for a language model)
    tokenizer.json                the model directory's tokenizers, as qkv saves them (or src_ and
                                  tgt_tokenizer.json; SentencePiece: a .model file beside each)
    qkv_export.json               what was exported (:class:`ExportInfo`)

It is written into a temporary directory beside ``out_dir`` and renamed into place at the end, so a failed
export leaves nothing half-written; ``out_dir`` must not exist yet or be an empty directory.

Vocabulary: CTranslate2 looks tokens up by string, qkv by id. :func:`vocabulary_tokens` gives one string
per id, all distinct, so the strings map 1:1 to qkv's ids: the vocabulary's own units (characters, words,
SentencePiece pieces) where they are distinct, ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` at the special ids,
and ``<qkv:ID>`` for an id whose text is taken (bytes above 127 of a byte tokenizer, a literal ``<unk>``
word). CTranslate2's ``bos_token`` and ``decoder_start_token`` are the string at ``bos_id`` (qkv starts
decoding there), ``eos_token`` the one at ``eos_id``, ``unk_token`` the one at ``unk_id``; no BOS or EOS is
added to the source (qkv's encoder sees the tokens alone).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qkv.checks import ConfigError, int_at_least, one_of
from qkv.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, SentencePieceTokenizer, Tokenizer
from qkv.deploy.ctranslate2_spec import check_exportable, lm_spec, require_ctranslate2, seq2seq_spec
from qkv.models.checkpoint import stored_model_type
from qkv.models.lm import TransformerLM
from qkv.models.transformer import TransformerSeq2Seq
from qkv.safe_files import MiB, read_json_file
from qkv.train.lm_inference import LanguageModel
from qkv.train.translate import Translator, save_tokenizers, token_texts

EXPORT_FILE = "qkv_export.json"
EXPORT_FORMAT = 1
QUANTIZATIONS = ("float32", "int16", "int8")
DEFAULT_SINUSOIDAL_POSITIONS = 2048
MODEL_TYPES = (TransformerSeq2Seq.model_type, TransformerLM.model_type)
MAX_INFO_BYTES = 1 * MiB


@dataclass
class ExportInfo:
    """What ``qkv_export.json`` records about an export.

    Attributes:
        format: :data:`EXPORT_FORMAT`.
        model_type: ``"transformer_seq2seq"`` or ``"transformer_lm"``.
        quantization: the weight type of ``model.bin`` (one of :data:`QUANTIZATIONS`).
        model_config: the qkv model config (``config.to_dict()``).
        source_positions, target_positions: the most source tokens and decoding steps the position tables
            hold (learned: ``max_positions``; sinusoidal: the rows written), ``None`` for rotary (any length).
            ``source_positions`` is ``None`` for a language model.
        tokens: CTranslate2's special token strings: ``{"unk", "bos", "eos", "decoder_start"}``.
        ctranslate2_version: the version that wrote the model.
        source: the model directory it came from.
    """

    format: int
    model_type: str
    quantization: str
    model_config: dict[str, Any]
    source_positions: int | None
    target_positions: int | None
    tokens: dict[str, str]
    ctranslate2_version: str
    source: str


def vocabulary_tokens(tokenizer: Tokenizer) -> list[str]:
    """One distinct string per id of ``tokenizer``: ``result[i]`` is what CTranslate2 calls id ``i`` (see the
    module docstring)."""
    if isinstance(tokenizer, SentencePieceTokenizer):
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_proto=tokenizer.model_proto)
        texts = [processor.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    else:
        tokens = getattr(tokenizer, "tokens", None)
        texts = list(tokens) if tokens is not None else token_texts(tokenizer, range(tokenizer.vocab_size))
    special_ids = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id)
    for i, name in zip(special_ids, SPECIAL_TOKENS, strict=True):
        texts[i] = name
    taken: set[str] = set()
    out = [""] * len(texts)
    for i in [*special_ids, *(i for i in range(len(texts)) if i not in special_ids)]:  # specials keep their names
        text = texts[i] or f"<qkv:{i}>"
        while text in taken:
            text = f"<qkv:{i}>" if not text.startswith("<qkv:") else text + "'"
        taken.add(text)
        out[i] = text
    return out


def check_output_directory(path: str | os.PathLike, name: str = "out_dir") -> Path:
    """``path`` as a ``Path`` if an export may go there: it does not exist, or is an empty directory.

    Raises:
        FileExistsError: it is a file, or a directory with something in it.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise FileExistsError(f"{name} {path} is a file; expected a new or empty directory")
        if any(path.iterdir()):
            raise FileExistsError(
                f"{name} {path} is a directory that is not empty; expected a new or empty directory "
                "(an export never overwrites files)"
            )
    return path


def _load(model_dir: Path) -> tuple[TransformerSeq2Seq | TransformerLM, Tokenizer, Tokenizer]:
    """The model of ``model_dir`` and its ``(source, target)`` tokenizers (the same one for a language model)."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model_dir {model_dir} is not a directory; expected a model directory of qkv train")
    model_type = stored_model_type(model_dir)
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ConfigError(
            f"cannot export a {model_type} model to CTranslate2; expected one of {', '.join(MODEL_TYPES)} "
            f"({model_dir}/config.json)"
        )
    if model_type == TransformerLM.model_type:
        lm = LanguageModel.load(model_dir)
        return lm.model, lm.tokenizer, lm.tokenizer
    translator = Translator.load(model_dir)
    assert isinstance(translator.model, TransformerSeq2Seq), "the model type was checked above"
    return translator.model, translator.src_tokenizer, translator.tgt_tokenizer


def _special_tokens(tokens: list[str], tokenizer: Tokenizer, bos_id: int, eos_id: int) -> dict[str, str]:
    return {
        "unk": tokens[tokenizer.unk_id],
        "bos": tokens[bos_id],
        "eos": tokens[eos_id],
        "decoder_start": tokens[bos_id],
    }


def _build(
    model: TransformerSeq2Seq | TransformerLM, src: Tokenizer, tgt: Tokenizer, positions: int
) -> tuple[Any, dict[str, str]]:
    """The spec with its vocabularies registered, and the special token strings."""
    if isinstance(model, TransformerLM):
        spec = lm_spec(model, positions)
        vocabulary = vocabulary_tokens(tgt)
        spec.register_vocabulary(vocabulary)
        eos_id = tgt.eos_id if model.config.eos_id is None else model.config.eos_id
        tokens = _special_tokens(vocabulary, tgt, tgt.bos_id, eos_id)
        del tokens["decoder_start"]  # a language model starts from its prompt
    else:
        spec = seq2seq_spec(model, positions)
        spec.register_source_vocabulary(vocabulary_tokens(src))
        vocabulary = vocabulary_tokens(tgt)
        spec.register_target_vocabulary(vocabulary)
        tokens = _special_tokens(vocabulary, tgt, model.config.bos_id, model.config.eos_id)
        spec.config.decoder_start_token = tokens["decoder_start"]
        spec.config.add_source_bos = spec.config.add_source_eos = False
    spec.config.unk_token, spec.config.bos_token, spec.config.eos_token = tokens["unk"], tokens["bos"], tokens["eos"]
    return spec, tokens


def _positions(model: TransformerSeq2Seq | TransformerLM, sinusoidal: int) -> int | None:
    """The positions the export holds: learned ones, the sinusoidal rows written, or ``None`` (rotary: any)."""
    return {"learned": model.config.max_positions, "sinusoidal": sinusoidal}.get(model.config.positional)


def export_ctranslate2(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quantization: str = "float32",
    sinusoidal_positions: int | None = None,
) -> Path:
    """Write the model of ``model_dir`` as a CTranslate2 model into ``out_dir`` (see the module docstring).

    Args:
        model_dir: a model directory of ``qkv train``: a ``TransformerSeq2Seq`` with its tokenizers, or a
            ``TransformerLM`` with its ``tokenizer.json``.
        out_dir: a directory that does not exist yet (created, parents too) or is empty.
        quantization: the weight type: ``"float32"``, ``"int16"`` or ``"int8"`` (per-row scales).
        sinusoidal_positions: for a model with sinusoidal positions, the rows of the position tables written
            (the longest source and the most decoding steps the export can take; default
            :data:`DEFAULT_SINUSOIDAL_POSITIONS`). Only for sinusoidal models.

    Returns:
        ``out_dir``.

    Raises:
        ImportError: ctranslate2 is not installed.
        ConfigError: a bad argument, a model type other than the two above, or a model option CTranslate2
            cannot express (named, with its value).
        FileExistsError: ``out_dir`` is a file or a non-empty directory.
        FileNotFoundError, ValueError: ``model_dir`` is not a usable model directory.
    """
    ct2 = require_ctranslate2()
    quantization = one_of("quantization", quantization, QUANTIZATIONS)
    rows = DEFAULT_SINUSOIDAL_POSITIONS
    if sinusoidal_positions is not None:
        rows = int_at_least("sinusoidal_positions", sinusoidal_positions, expected="an int >= 1 or None")
    out = check_output_directory(out_dir)
    model, src, tgt = _load(Path(model_dir))
    check_exportable(model.config)
    if sinusoidal_positions is not None and model.config.positional != "sinusoidal":
        raise ConfigError(
            f"sinusoidal_positions={sinusoidal_positions} is only for models with sinusoidal positions; this one "
            f"has positional={model.config.positional!r} (expected sinusoidal_positions=None)"
        )
    spec, tokens = _build(model, src, tgt, rows)
    spec.validate()
    spec.optimize(quantization=quantization)

    is_lm = isinstance(model, TransformerLM)
    positions = _positions(model, rows)
    info = ExportInfo(
        format=EXPORT_FORMAT,
        model_type=model.model_type,
        quantization=quantization,
        model_config=model.config.to_dict(),
        source_positions=None if is_lm else positions,
        target_positions=positions,
        tokens=tokens,
        ctranslate2_version=str(ct2.__version__),
        source=str(Path(model_dir).resolve()),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        spec.save(str(tmp))
        if is_lm:
            tgt.save(tmp / TOKENIZER_FILE)
        else:
            save_tokenizers(tmp, src, tgt, shared=(Path(model_dir) / TOKENIZER_FILE).is_file())
        (tmp / EXPORT_FILE).write_text(json.dumps(asdict(info), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, out)  # onto a missing or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_export_info(directory: str | os.PathLike) -> ExportInfo:
    """The :class:`ExportInfo` of an export directory.

    Raises:
        FileNotFoundError: ``directory`` has no ``qkv_export.json`` (it is not an export of ``qkv export``).
        ValueError: the file cannot be read or is not an export description of this qkv's format.
    """
    path = Path(directory) / EXPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a CTranslate2 export of qkv export: it has no {EXPORT_FILE} "
            "(qkv export --model DIR --format ctranslate2 --out DIR writes one)"
        )
    try:
        data = read_json_file(path, MAX_INFO_BYTES)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} has format {got!r}; this qkv reads export format {EXPORT_FORMAT}")
    try:
        return ExportInfo(**data)
    except TypeError as e:
        raise ValueError(f"{path} is not an export description: {e}") from None
