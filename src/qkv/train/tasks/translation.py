"""Translation: a sequence-to-sequence model (Transformer or RNN) trained on pairs of sentences.

Data (:meth:`TranslationTask.prepare`): a built-in corpus generated into ``<output>/data/`` (regenerated
only when its size or seed changed) or your parallel files, pairs that are empty or too long dropped and
logged; tokenizers trained on the training split (or, on ``--resume``, reloaded from the model directory)
and saved beside the model, shared or one per side.

Batches: :class:`~qkv.data.TokenBatcher` plans of at most ``training.max_tokens`` padded tokens, with
length bucketing; under DDP each rank takes every ``world_size``-th row. The loss is the label-smoothed
cross-entropy (``training.label_smoothing``) summed over the target tokens.

Validation: the token loss (no smoothing) and perplexity of the valid split (its first
``training.valid_max_sentences`` pairs), and BLEU, chrF (sacrebleu, signatures kept) and exact match of
its greedy (``training.valid_beam: 1``) or beam translations. When ``data.test`` names files, the exported
model is scored on them the same way at the end. The inference side is :mod:`qkv.train.translate`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from qkv.data.batching import Batch, SequentialBatcher, TokenBatcher, collate, padded_tokens
from qkv.data.corpus import generate_corpus, split_paths, write_corpus
from qkv.data.parallel import LoadReport, Pair, load_parallel, load_tsv
from qkv.data.tokenizer import Example, Tokenizer, encode_pairs, train_tokenizer
from qkv.models.interface import Seq2SeqModel
from qkv.models.rnn import RNNSeq2Seq
from qkv.models.transformer import TransformerSeq2Seq
from qkv.train.ddp import barrier, shard_rows
from qkv.train.errors import TrainError
from qkv.train.evaluate import score
from qkv.train.loss import label_smoothed_loss
from qkv.train.task import BatchLoss, Task, Validation
from qkv.train.tasks.translation_config import (
    SplitFiles,
    TranslationDataConfig,
    TranslationModelConfig,
    TranslationTrainingConfig,
)
from qkv.train.translate import decode_sources, has_tokenizers, load_tokenizers, save_tokenizers

DATA_DIR = "data"


@dataclass
class PreparedData:
    """The encoded splits and the tokenizers (the same object twice when shared)."""

    train_pairs: list[Pair]
    valid_pairs: list[Pair]
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    train_examples: list[Example]
    valid_examples: list[Example]
    test_pairs: list[Pair] = field(default_factory=list)
    test_examples: list[Example] = field(default_factory=list)


class TranslationBatches:
    """A :class:`~qkv.data.TokenBatcher` as the trainer's endless, resumable stream of :class:`Batch` es."""

    def __init__(self, batcher: TokenBatcher) -> None:
        self.batcher = batcher

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield from self.batcher

    @property
    def epoch(self) -> float:
        """Passes over the training pairs so far: the epoch plus the share of its batches yielded."""
        position = self.batcher.position
        return position.epoch + position.batch / self.batcher.num_batches(position.epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batcher.load_state_dict(dict(state))


def _load_split(name: str, files: SplitFiles, data: TranslationDataConfig, task: TranslationTask) -> list[Pair]:
    """The kept pairs of one split, logging what was dropped (empty or too long pairs) and why."""
    report: LoadReport
    if files.tsv is not None:
        pairs, report = load_tsv(files.tsv, max_chars=data.max_chars, max_tokens=data.max_length)
    else:
        assert files.src is not None and files.tgt is not None, "SplitFiles.check requires src and tgt"
        pairs, report = load_parallel(files.src, files.tgt, max_chars=data.max_chars, max_tokens=data.max_length)
    if report.dropped_empty or report.dropped_long:
        task.log(f"{name} split: {report.summary()}")
    return pairs


def _corpus_is_current(directory: Path, data: TranslationDataConfig) -> bool:
    """Whether ``directory`` holds the built-in corpus ``data`` asks for (name, seed and split sizes)."""
    meta_path = directory / "corpus.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    want = {
        "train": None,
        "valid": round(data.size * data.valid_fraction),
        "test": round(data.size * data.test_fraction),
    }
    sizes = meta.get("sizes", {})
    return (
        meta.get("name") == data.corpus
        and meta.get("seed") == data.seed
        and sum(sizes.values()) == data.size
        and all(sizes.get(k) == v for k, v in want.items() if v is not None)
    )


class TranslationTask(Task):
    """Sequence-to-sequence translation (see the module docstring)."""

    name = "translation"
    data_config = TranslationDataConfig
    model_config = TranslationModelConfig
    training_config = TranslationTrainingConfig
    metrics = ("bleu", "chrf", "exact_match", "loss", "ppl")

    data: PreparedData
    batcher: TokenBatcher

    @property
    def settings(self) -> TranslationTrainingConfig:
        """This task's ``training:`` keys."""
        return cast(TranslationTrainingConfig, self.config.task_training)

    # -- data --------------------------------------------------------------------------------------------

    def _split_files(self) -> tuple[SplitFiles, SplitFiles]:
        """The train and valid files: the built-in corpus (generated by rank 0 if needed) or the config's."""
        d: TranslationDataConfig = self.config.data
        if d.corpus is None:
            assert d.train is not None and d.valid is not None, "the config requires data.train and data.valid"
            return d.train, d.valid
        corpus_dir = self.config.output_dir / DATA_DIR
        if self.ctx.is_main and not _corpus_is_current(corpus_dir, d):
            corpus = generate_corpus(
                d.corpus, d.size, seed=d.seed, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction
            )
            write_corpus(corpus, corpus_dir)
            self.log(f"generated the {d.corpus} corpus ({d.size} pairs, seed {d.seed}) in {corpus_dir}")
        barrier(self.ctx)
        train, valid = (SplitFiles(*map(str, split_paths(corpus_dir, name))) for name in ("train", "valid"))
        return train, valid

    def _train_tokenizers(self, train_pairs: list[Pair]) -> None:
        d: TranslationDataConfig = self.config.data
        src_texts = [s for s, _ in train_pairs]
        tgt_texts = [t for _, t in train_pairs]
        model_type = d.sentencepiece_type if d.tokenizer == "sentencepiece" else None
        if d.shared_vocab:
            src_tok = tgt_tok = train_tokenizer(
                d.tokenizer, src_texts + tgt_texts, vocab_size=d.vocab_size, model_type=model_type
            )
        else:
            src_tok = train_tokenizer(d.tokenizer, src_texts, vocab_size=d.vocab_size, model_type=model_type)
            tgt_tok = train_tokenizer(d.tokenizer, tgt_texts, vocab_size=d.vocab_size, model_type=model_type)
        save_tokenizers(self.config.output_dir, src_tok, tgt_tok, shared=d.shared_vocab)
        self.log(f"trained {d.tokenizer} tokenizers: source {src_tok.vocab_size} ids, target {tgt_tok.vocab_size} ids")

    def prepare(self, *, resume: bool) -> None:
        d: TranslationDataConfig = self.config.data
        train_files, valid_files = self._split_files()
        train_pairs = _load_split("train", train_files, d, self)
        valid_pairs = _load_split("valid", valid_files, d, self)
        # The test split (your own files only; the demo scores the built-in corpus' test split itself) is
        # scored once, at the end, with the exported model.
        test_pairs = _load_split("test", d.test, d, self) if d.test is not None else []
        if not train_pairs or not valid_pairs:
            raise TrainError(f"no {'training' if not train_pairs else 'validation'} pairs left after filtering")
        if self.ctx.is_main and not (resume and has_tokenizers(self.config.output_dir)):
            self._train_tokenizers(train_pairs)
        barrier(self.ctx)
        src_tok, tgt_tok = load_tokenizers(self.config.output_dir)
        self.data = PreparedData(
            train_pairs=train_pairs,
            valid_pairs=valid_pairs,
            src_tokenizer=src_tok,
            tgt_tokenizer=tgt_tok,
            train_examples=encode_pairs(train_pairs, src_tok, tgt_tok),
            valid_examples=encode_pairs(valid_pairs, src_tok, tgt_tok),
            test_pairs=test_pairs,
            test_examples=encode_pairs(test_pairs, src_tok, tgt_tok),
        )

    def describe(self) -> str:
        batches = ""
        if hasattr(self, "batcher"):
            batches = f", {self.batcher.num_batches(self.batcher.position.epoch)} batches an epoch"
        return f"{len(self.data.train_examples)} training pairs, {len(self.data.valid_examples)} valid pairs{batches}"

    # -- model -------------------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        model: TranslationModelConfig = self.config.model
        model_config = model.build(
            src_vocab_size=self.data.src_tokenizer.vocab_size,
            tgt_vocab_size=self.data.tgt_tokenizer.vocab_size,
            shared_vocab=self.config.data.shared_vocab,
        )
        return TransformerSeq2Seq(model_config) if model.type == "transformer" else RNNSeq2Seq(model_config)

    # -- training ----------------------------------------------------------------------------------------

    def train_batches(self) -> TranslationBatches:
        s = self.settings
        self.batcher = TokenBatcher(
            self.data.train_examples, max_tokens=s.max_tokens, seed=self.config.training.seed, bucket_size=s.bucket_size
        )
        return TranslationBatches(self.batcher)

    def batch_tokens(self, batch: Batch) -> int:
        return batch.num_tgt_tokens

    def shard(self, batch: Batch) -> tuple[Batch, float]:
        if not self.ctx.distributed:
            return batch, 1.0
        rows = shard_rows(range(batch.size), self.ctx)
        weight = 1.0
        if not rows:
            rows, weight = [0], 0.0
        indices = [int(batch.indices[r]) for r in rows]
        return collate([self.batcher.examples[i] for i in indices], indices), weight

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> BatchLoss:
        batch = batch.to(device)
        out = model(batch.src, batch.src_lengths, batch.tgt_in)
        loss_sum, nll_sum, tokens = label_smoothed_loss(
            out.logits, batch.tgt_out, smoothing=self.settings.label_smoothing, pad_id=self.data.tgt_tokenizer.pad_id
        )
        return BatchLoss(loss=loss_sum, nll=float(nll_sum), tokens=tokens)

    # -- validation --------------------------------------------------------------------------------------

    def validate(self, model: nn.Module, device: torch.device, step: int) -> Validation:
        limit = self.settings.valid_max_sentences
        pairs, examples = self.data.valid_pairs, self.data.valid_examples
        if limit is not None:
            pairs, examples = pairs[:limit], examples[:limit]
        return self._score(model, device, pairs, examples)

    def score_test(self, model: nn.Module, device: torch.device) -> Validation | None:
        if not self.data.test_examples:
            return None
        return self._score(model, device, self.data.test_pairs, self.data.test_examples)

    def _score(self, model: nn.Module, device: torch.device, pairs: list[Pair], examples: list[Example]) -> Validation:
        """Loss, perplexity, BLEU, chrF and exact match of ``model`` on ``pairs`` (``examples`` encoded)."""
        s = self.settings
        longest = max(padded_tokens(1, len(src), len(tgt)) for src, tgt in examples)
        batcher = SequentialBatcher(examples, max_tokens=max(s.max_tokens, longest), sort_by_length=True)
        nll_sum, tokens = 0.0, 0
        for batch in batcher:
            batch = batch.to(device)
            out = model(batch.src, batch.src_lengths, batch.tgt_in)
            _, nll, n = label_smoothed_loss(
                out.logits, batch.tgt_out, smoothing=0.0, pad_id=self.data.tgt_tokenizer.pad_id
            )
            nll_sum += float(nll)
            tokens += n
        hypotheses = decode_sources(
            cast(Seq2SeqModel, model),
            [src for src, _ in examples],
            beam=s.valid_beam,
            length_penalty=s.length_penalty,
            max_tokens=s.max_tokens,
            device=device,
        )
        texts = [self.data.tgt_tokenizer.decode(h.tokens) for h in hypotheses]
        scores = score(texts, [reference for _, reference in pairs])
        loss = nll_sum / max(tokens, 1)
        example = {"source": pairs[0][0], "reference": pairs[0][1], "hypothesis": texts[0]}
        return Validation(
            metrics={
                "loss": loss,
                "ppl": math.exp(min(loss, 50.0)),
                "bleu": scores.bleu,
                "chrf": scores.chrf,
                "exact_match": scores.exact_match,
            },
            lines=[
                f"  {scores.count} sentences | BLEU|{scores.bleu_signature}  chrF2|{scores.chrf_signature}",
                f"  example: {example['source']!r} → {example['hypothesis']!r} (reference {example['reference']!r})",
            ],
            extra={
                "sentences": scores.count,
                "bleu_signature": scores.bleu_signature,
                "chrf_signature": scores.chrf_signature,
                "example": example,
            },
        )
