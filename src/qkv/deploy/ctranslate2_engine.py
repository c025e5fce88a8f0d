"""``CTranslate2Translator``: translating with a CTranslate2 export, called as qkv's own ``Translator``.

``translate(sentences, beam=..., length_penalty=..., max_tokens=..., max_output_length=...,
need_attention=...)`` returns :class:`~qkv.train.translate.Translation` objects, as
:meth:`qkv.train.translate.Translator.translate` does, from ``ctranslate2.Translator.translate_batch``.
The sentences are tokenized by the qkv tokenizers of the export, their ids turned into the export's token
strings (1:1, see :mod:`qkv.deploy.ctranslate2_export`), and the output strings back into ids.

How the options map, and where the two engines differ:

* ``beam`` → ``beam_size`` (``1``: greedy). Greedy decoding is the same search in both: in float32 the
  outputs are the same token for token (up to float rounding of near ties).
* Output length: as qkv, at most ``int(1.5 · source tokens + 10)`` steps (EOS included) per sentence,
  capped by ``max_output_length`` (default 1024, or fewer learned positions). CTranslate2 has one
  ``max_decoding_length`` per call, so sentences are translated in groups of equal limit (which are
  groups of equal source length, padding-free), and the limit holds exactly. ``min_decoding_length=0``:
  EOS may come first, as in qkv.
* ``length_penalty``: qkv ranks ended hypotheses by GNMT's ``log_prob / ((5 + L) / 6) ** alpha``,
  CTranslate2 by ``log_prob / L ** alpha`` (``L`` counts EOS in both), which is not the same ranking.
  Both searches keep the live hypotheses with the highest summed log-probability whatever ``alpha``, so
  CTranslate2 searches with ``length_penalty=0`` and returns its ``beam`` best ended hypotheses with their
  log-probabilities, and the one chosen is the best by qkv's formula (its ``score`` is qkv's). Passing
  ``alpha`` to CTranslate2 instead gave 13 of the 1,200 demo test sentences another translation and
  0.65 less BLEU; this way all 1,200 are qkv's. What still differs is when a sentence stops: qkv goes on
  while a live hypothesis could still beat the ``beam``-th ended one under the penalty, CTranslate2 stops
  once ``beam`` hypotheses have ended, so with ``alpha > 0`` a longer, better-scoring hypothesis that qkv
  would find can be missed.
* ``max_tokens`` → ``max_batch_size`` with ``batch_type="tokens"``.
* ``need_attention`` → ``return_attention``: the last decoder layer's cross-attention averaged over its
  heads (the export sets ``alignment_heads`` to all heads), as ``hypothesis.cross_attention`` of shape
  ``(1, 1, T, S)``: one layer, one (mean) head; qkv's engine returns every layer and head.
* A source longer than the export's position table (learned ``max_positions``, or the sinusoidal rows
  written) is an error naming it, as qkv's engine does for learned positions.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qkv.checks import int_at_least
from qkv.data.tokenizer import MAX_TOKENIZER_BYTES, Tokenizer
from qkv.deploy.ctranslate2_export import ExportInfo, read_export_info
from qkv.deploy.ctranslate2_spec import require_ctranslate2
from qkv.models.hypothesis import Hypothesis, gnmt_length_penalty
from qkv.models.transformer import TransformerSeq2Seq
from qkv.safe_files import read_json_file
from qkv.train.translate import (
    DEFAULT_MAX_OUTPUT_LENGTH,
    Translation,
    check_decoding_options,
    load_tokenizers,
    token_texts,
)

MAX_LEN_RATIO, MAX_LEN_EXTRA = 1.5, 10  # qkv.models.search's defaults, which Translator uses
VOCABULARY_FILES = {
    "source": ("source_vocabulary.json", "shared_vocabulary.json"),
    "target": ("target_vocabulary.json", "shared_vocabulary.json"),
}


def _read_vocabulary(directory: Path, side: str, size: int) -> list[str]:
    """The token strings of ``side`` that the export registered, checked against the tokenizer's ``size``."""
    path = next((directory / name for name in VOCABULARY_FILES[side] if (directory / name).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{directory} has no {' or '.join(VOCABULARY_FILES[side])}; is it a CTranslate2 model?")
    try:
        tokens = read_json_file(path, MAX_TOKENIZER_BYTES)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(tokens, list) or len(tokens) != size or len(set(tokens)) != size:
        raise ValueError(
            f"{path} must list {size} distinct token strings, one per id of the {side} tokenizer; "
            f"got {len(tokens) if isinstance(tokens, list) else type(tokens).__name__} "
            "(were files copied in from another export?)"
        )
    return tokens


class CTranslate2Translator:
    """A CTranslate2 export and its tokenizers, ready to translate text (see the module docstring).

    Attributes:
        translator: the ``ctranslate2.Translator``.
        info: the export's :class:`~qkv.deploy.ctranslate2_export.ExportInfo`.
        src_tokenizer, tgt_tokenizer: the qkv tokenizers of the export.
    """

    def __init__(
        self, translator: Any, info: ExportInfo, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, directory: Path
    ) -> None:
        self.translator, self.info = translator, info
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer
        self.src_vocabulary = _read_vocabulary(directory, "source", src_tokenizer.vocab_size)
        self.tgt_vocabulary = _read_vocabulary(directory, "target", tgt_tokenizer.vocab_size)
        self.tgt_ids = {token: i for i, token in enumerate(self.tgt_vocabulary)}

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        device: str = "cpu",
        intra_threads: int | None = None,
        compute_type: str = "default",
    ) -> CTranslate2Translator:
        """Load an export of ``qkv export --format ctranslate2``.

        Args:
            directory: the export directory.
            device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CTranslate2's devices).
            intra_threads: CPU threads per translation; default ``torch.get_num_threads()``, the threads
                qkv's own engine uses (``0``: CTranslate2's default).
            compute_type: CTranslate2's ``compute_type`` (``"default"``: the type the weights were saved in).

        Raises:
            ImportError: ctranslate2 is not installed.
            FileNotFoundError: ``directory`` is not an export of ``qkv export`` (names the missing file).
            ValueError: the export holds a language model, or its files do not belong together, or
                CTranslate2 cannot load it on ``device``.
        """
        ct2 = require_ctranslate2()
        directory = Path(directory)
        threads = torch.get_num_threads() if intra_threads is None else int_at_least("intra_threads", intra_threads, 0)
        info = read_export_info(directory)
        if info.model_type != TransformerSeq2Seq.model_type:
            raise ValueError(
                f"{directory} holds an exported {info.model_type} model, not a translation model "
                f"({TransformerSeq2Seq.model_type}); use ctranslate2.Generator with it"
            )
        src, tgt = load_tokenizers(directory)
        try:
            translator = ct2.Translator(str(directory), device=device, intra_threads=threads, compute_type=compute_type)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"CTranslate2 cannot load {directory} on device {device!r}: {e}") from None
        return cls(translator, info, src, tgt, directory)

    def output_length_cap(self, max_output_length: int | None = None, *, flags: bool = False) -> int:
        """The most tokens (EOS included) of any translation, as :func:`qkv.train.translate.output_length_cap`:
        ``max_output_length``, by default 1024 or the target positions of the export when fewer.

        Raises:
            ValueError: ``max_output_length`` is not a positive int or exceeds the export's target positions.
        """
        name = "--max-output-length" if flags else "max_output_length"
        positions = self.info.target_positions
        if max_output_length is None:
            return DEFAULT_MAX_OUTPUT_LENGTH if positions is None else min(DEFAULT_MAX_OUTPUT_LENGTH, positions)
        int_at_least(name, max_output_length)
        if positions is not None and max_output_length > positions:
            raise ValueError(
                f"{name} {max_output_length} exceeds the {positions} target positions of this export; "
                f"expected at most {positions}"
            )
        return max_output_length

    def _check_source_lengths(self, encoded: list[list[int]]) -> None:
        limit = self.info.source_positions
        longest = max((len(ids) for ids in encoded), default=0)
        if limit is not None and longest > limit:
            line = next(i for i, ids in enumerate(encoded) if len(ids) == longest)
            kind = "sinusoidal positions written by qkv export (--sinusoidal-positions)"
            if self.info.model_config.get("positional") == "learned":
                kind = "learned max_positions"
            raise ValueError(
                f"sentence {line + 1} has {longest} source tokens, beyond the {limit} {kind} of this export; shorten it"
            )

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
        """Translations of ``sentences``, in their order; an empty sentence gives ``""``.

        Raises:
            ValueError: an option is out of range, or a sentence is longer than the export's positions.
        """
        check_decoding_options(
            beam=beam, length_penalty=length_penalty, max_tokens=max_tokens, max_output_length=max_output_length
        )
        cap = self.output_length_cap(max_output_length)
        encoded = [self.src_tokenizer.encode(s) for s in sentences]
        self._check_source_lengths(encoded)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(encoded):
            if ids:
                groups[min(max(1, int(MAX_LEN_RATIO * len(ids) + MAX_LEN_EXTRA)), cap)].append(i)
        found: dict[int, Hypothesis] = {}
        for limit, members in sorted(groups.items()):
            results = self.translator.translate_batch(
                [[self.src_vocabulary[t] for t in encoded[i]] for i in members],
                max_batch_size=max_tokens,
                batch_type="tokens",
                beam_size=beam,
                num_hypotheses=beam,
                length_penalty=0.0,  # scores are log-probabilities; qkv's penalty is applied in _best
                max_decoding_length=limit,
                min_decoding_length=0,
                max_input_length=0,
                return_end_token=True,
                return_scores=True,
                return_attention=need_attention,
            )
            for i, result in zip(members, results, strict=True):
                found[i] = self._best(result, length_penalty, need_attention)
        return [self._translation(s, encoded[i], found.get(i)) for i, s in enumerate(sentences)]

    def _best(self, result: Any, alpha: float, need_attention: bool) -> Hypothesis:
        """The hypothesis of ``result`` (a ``TranslationResult`` of a search without length penalty) with the
        best GNMT score for ``alpha``."""
        eos_id = self.tgt_tokenizer.eos_id
        best: Hypothesis | None = None
        for n, (tokens, score) in enumerate(zip(result.hypotheses, result.scores, strict=True)):
            ids = [self.tgt_ids[t] for t in tokens]
            finished = bool(ids) and ids[-1] == eos_id
            hypothesis = Hypothesis(
                tokens=ids[:-1] if finished else ids,
                score=score / gnmt_length_penalty(len(ids), alpha),  # len(ids): EOS included, as in qkv
                log_prob=score,
                finished=finished,
                cross_attention=torch.tensor(result.attention[n])[None, None] if need_attention else None,
            )
            if best is None or hypothesis.score > best.score:
                best = hypothesis
        assert best is not None, "translate_batch returns at least one hypothesis"
        return best

    def _translation(self, sentence: str, src_ids: list[int], hypothesis: Hypothesis | None) -> Translation:
        if hypothesis is None:
            return Translation(sentence, "", None, [], [])
        out_ids = hypothesis.tokens + ([self.tgt_tokenizer.eos_id] if hypothesis.finished else [])
        return Translation(
            source=sentence,
            text=self.tgt_tokenizer.decode(hypothesis.tokens),
            hypothesis=hypothesis,
            src_tokens=token_texts(self.src_tokenizer, src_ids),
            tgt_tokens=token_texts(self.tgt_tokenizer, out_ids),
        )
