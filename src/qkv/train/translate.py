"""Translating with a trained model directory.

A model directory (what ``qkv train`` writes to ``output.dir``) holds::

    model.safetensors, config.json     the model (qkv.models.checkpoint.save_model)
    tokenizer.json                     the shared tokenizer, or
    src_tokenizer.json, tgt_tokenizer.json   one per side (SentencePiece: a .model file beside each)
    train_config.yaml                  the training configuration, overrides applied
    checkpoints/                       training checkpoints (see qkv.train.checkpoint_io)

:class:`Translator` loads one and translates batches of sentences with greedy (``beam=1``) or beam search
(:mod:`qkv.models.search`). Sentences are batched longest first by a token budget and the results put back
in input order; an empty input line gives an empty translation. With ``need_attention`` every result keeps
its hypothesis' cross-attention ``(layers, heads, T, S)`` and the token strings for plotting an alignment.

Output length: a translation gets at most ``1.5 · source tokens + 10`` tokens (as in
:mod:`qkv.models.search`), and never more than ``max_output_length`` (default
:data:`DEFAULT_MAX_OUTPUT_LENGTH`), nor more than the positions of a model with learned positions: a weak
model that never says EOS on a 10,000-character line would otherwise decode 15,000 steps, each slower
than the last. :func:`chunks` cuts a long input into pieces that a caller can translate and write out one
after the other, so results reach the output while the rest is still being translated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qkv.checks import int_at_least
from qkv.data.batching import SequentialBatcher, restore_order
from qkv.data.tokenizer import Tokenizer, load_tokenizer
from qkv.models.checkpoint import load_model, stored_model_type
from qkv.models.interface import Seq2SeqModel
from qkv.models.lm import TransformerLM
from qkv.models.search import Hypothesis, beam_search, check_length_penalty, greedy_search
from qkv.train.model_dir import check_model_directory

SHARED_TOKENIZER_FILE = "tokenizer.json"
SRC_TOKENIZER_FILE = "src_tokenizer.json"
TGT_TOKENIZER_FILE = "tgt_tokenizer.json"
EOS_LABEL = "</s>"
DEFAULT_MAX_OUTPUT_LENGTH = 1024
DEFAULT_CHUNK_SIZE = 1000  # sentences translated (sorted by length, batched) before their results are written


def save_tokenizers(directory: str | os.PathLike, src: Tokenizer, tgt: Tokenizer, *, shared: bool) -> None:
    """Write the tokenizers into a model directory (one file when ``shared``)."""
    directory = Path(directory)
    if shared:
        src.save(directory / SHARED_TOKENIZER_FILE)
    else:
        src.save(directory / SRC_TOKENIZER_FILE)
        tgt.save(directory / TGT_TOKENIZER_FILE)


def has_tokenizers(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / SHARED_TOKENIZER_FILE).is_file() or (
        (directory / SRC_TOKENIZER_FILE).is_file() and (directory / TGT_TOKENIZER_FILE).is_file()
    )


def load_tokenizers(directory: str | os.PathLike) -> tuple[Tokenizer, Tokenizer]:
    """``(source, target)`` tokenizers of a model directory (the same object when shared)."""
    directory = Path(directory)
    if (directory / SHARED_TOKENIZER_FILE).is_file():
        shared = load_tokenizer(directory / SHARED_TOKENIZER_FILE)
        return shared, shared
    if not has_tokenizers(directory):
        raise FileNotFoundError(
            f"{directory} has no tokenizers: expected {SHARED_TOKENIZER_FILE}, or {SRC_TOKENIZER_FILE} and "
            f"{TGT_TOKENIZER_FILE} (a model directory written by qkv train)"
        )
    return load_tokenizer(directory / SRC_TOKENIZER_FILE), load_tokenizer(directory / TGT_TOKENIZER_FILE)


def token_texts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Display strings of ``ids``, one each (the vocabulary entry, or the id's decoded text)."""
    vocabulary = getattr(tokenizer, "tokens", None)
    out = []
    for i in ids:
        i = int(i)
        if i == tokenizer.eos_id:
            out.append(EOS_LABEL)
            continue
        piece = vocabulary[i] if vocabulary is not None else tokenizer.decode([i])
        out.append(piece.replace(" ", "▁") or f"#{i}")  # a visible label for a space or an empty piece
    return out


def _option(name: str, flags: bool) -> str:
    """``name`` as the messages show it: the Python argument, or the command-line option (``--max-tokens``)."""
    return "--" + name.replace("_", "-") if flags else name


def check_decoding_options(
    *,
    beam: int,
    length_penalty: float,
    max_tokens: int,
    max_output_length: int | None = None,
    flags: bool = False,
) -> None:
    """``ValueError`` unless the options are usable: ``beam``, ``max_tokens`` and ``max_output_length`` (when
    given) positive ints, ``length_penalty`` a number in ``[0, MAX_LENGTH_PENALTY]``. With ``flags`` the
    messages name the command-line options (``--length-penalty``) instead of the arguments."""
    int_at_least(_option("beam", flags), beam, 1, expected="an int >= 1 (1: greedy)")
    check_length_penalty(length_penalty, _option("length_penalty", flags))
    int_at_least(_option("max_tokens", flags), max_tokens)
    if max_output_length is not None:
        int_at_least(_option("max_output_length", flags), max_output_length)


def output_length_cap(model: Seq2SeqModel, max_output_length: int | None = None, *, flags: bool = False) -> int:
    """The most tokens (EOS included) any translation may have: ``max_output_length``, by default
    :data:`DEFAULT_MAX_OUTPUT_LENGTH` or, when smaller, the positions of a model with learned positions.

    Raises:
        ValueError: ``max_output_length`` is not a positive int, or exceeds the model's learned positions.
    """
    config = getattr(model, "config", None)
    positions = getattr(config, "max_positions", None) if getattr(config, "positional", None) == "learned" else None
    if max_output_length is None:
        return DEFAULT_MAX_OUTPUT_LENGTH if positions is None else min(DEFAULT_MAX_OUTPUT_LENGTH, positions)
    name = _option("max_output_length", flags)
    int_at_least(name, max_output_length)
    if positions is not None and max_output_length > positions:
        raise ValueError(
            f"{name} {max_output_length} exceeds the model's {positions} learned positions; "
            f"expected at most {positions}"
        )
    return max_output_length


def chunks(items: Sequence[str], size: int | None = None) -> Iterator[Sequence[str]]:
    """``items`` in consecutive pieces of ``size`` (default :data:`DEFAULT_CHUNK_SIZE`; the last one shorter)."""
    size = DEFAULT_CHUNK_SIZE if size is None else size
    int_at_least("size", size)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def decode_sources(
    model: Seq2SeqModel,
    sources: Sequence[Sequence[int]],
    *,
    beam: int = 1,
    length_penalty: float = 1.0,
    max_tokens: int = 4096,
    max_output_length: int | None = None,
    device: torch.device | str = "cpu",
    need_attention: bool = False,
) -> list[Hypothesis]:
    """The best hypothesis for each non-empty source (lists of ids), in input order.

    Each gets at most ``1.5 · len + 10`` tokens, capped by :func:`output_length_cap` (``max_output_length``).
    """
    if not sources:
        return []
    cap = output_length_cap(model, max_output_length)
    longest = max(len(s) for s in sources)
    batcher = SequentialBatcher(
        [(list(s), []) for s in sources], max_tokens=max(max_tokens, 2 * (longest + 1)), sort_by_length=True
    )
    hypotheses: list[Hypothesis] = []
    order: list[int] = []
    for batch in batcher:
        src, lengths = batch.src.to(device), batch.src_lengths.to(device)
        if beam == 1:
            found = greedy_search(
                model, src, lengths, length_penalty=length_penalty, max_len_cap=cap, need_attention=need_attention
            )
        else:
            found = [
                hyps[0]
                for hyps in beam_search(
                    model,
                    src,
                    lengths,
                    beam_size=beam,
                    length_penalty=length_penalty,
                    max_len_cap=cap,
                    need_attention=need_attention,
                )
            ]
        hypotheses += found
        order += batch.indices.tolist()
    return restore_order(hypotheses, order)


@dataclass
class Translation:
    """One translated sentence.

    Attributes:
        source: the input text.
        text: the translation (``""`` for an empty input).
        hypothesis: the chosen :class:`~qkv.models.Hypothesis` (``None`` for an empty input); its
            ``cross_attention`` is ``(layers, heads, T, S)`` when attention was asked for.
        src_tokens: ``S`` display strings of the source tokens.
        tgt_tokens: ``T`` display strings of the output tokens, ``"</s>"`` last when the model ended it.
    """

    source: str
    text: str
    hypothesis: Hypothesis | None
    src_tokens: list[str]
    tgt_tokens: list[str]


class Translator:
    """A model and its tokenizers, ready to translate text."""

    def __init__(
        self, model: Seq2SeqModel, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, *, device: str = "cpu"
    ) -> None:
        self.model, self.src_tokenizer, self.tgt_tokenizer = model, src_tokenizer, tgt_tokenizer
        self.device = torch.device(device)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str = "cpu") -> Translator:
        """Load the model and tokenizers of a model directory (safetensors and JSON only).

        Raises:
            FileNotFoundError, ValueError: the directory lacks a file or holds one that cannot be used.
            ModelDirectoryError: (a ``ValueError``) the tokenizers and the model config disagree on the
                vocabulary sizes or the special ids (files from different runs).
            ValueError: ``device`` is CUDA but torch sees no CUDA device.
        """
        directory = Path(directory)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: CUDA is not available (this PyTorch is a CPU-only build, or no GPU is "
                "visible); use device 'cpu' or 'auto'"
            )
        if stored_model_type(directory) == TransformerLM.model_type:
            raise ValueError(
                f"{directory} holds a language model, not a translation model: use qkv generate (sampling) or "
                "qkv evaluate --text (perplexity) with it"
            )
        src, tgt = load_tokenizers(directory)
        model = load_model(directory, device=device)
        check_model_directory(directory, getattr(model, "config", None), src, tgt)
        return cls(model, src, tgt, device=device)  # type: ignore[arg-type]

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam: int = 5,
        length_penalty: float = 1.0,
        max_tokens: int = 4096,
        max_output_length: int | None = None,
        need_attention: bool = False,
    ) -> list[Translation]:
        """Translations of ``sentences``, in their order (see the module docstring for the output length).

        Raises:
            ValueError: an option is out of range (:func:`check_decoding_options`, :func:`output_length_cap`).
        """
        check_decoding_options(
            beam=beam, length_penalty=length_penalty, max_tokens=max_tokens, max_output_length=max_output_length
        )
        encoded = [self.src_tokenizer.encode(s) for s in sentences]
        live = [i for i, ids in enumerate(encoded) if ids]
        hypotheses = decode_sources(
            self.model,
            [encoded[i] for i in live],
            beam=beam,
            length_penalty=length_penalty,
            max_tokens=max_tokens,
            max_output_length=max_output_length,
            device=self.device,
            need_attention=need_attention,
        )
        found = dict(zip(live, hypotheses, strict=True))
        results = []
        for i, sentence in enumerate(sentences):
            hyp = found.get(i)
            if hyp is None:
                results.append(Translation(sentence, "", None, [], []))
                continue
            out_ids = hyp.tokens + ([self.tgt_tokenizer.eos_id] if hyp.finished else [])
            results.append(
                Translation(
                    source=sentence,
                    text=self.tgt_tokenizer.decode(hyp.tokens),
                    hypothesis=hyp,
                    src_tokens=token_texts(self.src_tokenizer, encoded[i]),
                    tgt_tokens=token_texts(self.tgt_tokenizer, out_ids),
                )
            )
        return results
