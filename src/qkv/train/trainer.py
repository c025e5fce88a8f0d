"""The training loop: data → model → AdamW updates, validation, checkpoints, early stopping, export.

One *step* is one optimizer update over ``training.accumulate`` batches of the
:class:`~qkv.data.TokenBatcher` plan (each of at most ``training.max_tokens`` padded tokens). The loss of a
step is the label-smoothed cross-entropy summed over its target tokens and divided by their number, so
accumulating ``k`` batches, or splitting them over ``N`` processes (:mod:`qkv.train.ddp`), computes the
update of one batch ``k`` (or ``N``) times as large. Gradients are clipped to ``training.clip_norm``; on
CUDA, ``training.precision`` bf16/fp16 runs the forward pass under autocast (fp16 with a gradient scaler);
on CPU training is always fp32.

Every ``training.valid_every`` steps, and after the last, rank 0 validates: the token loss (without
smoothing) and perplexity of the valid split, and BLEU, chrF (sacrebleu, signatures reported) and exact
match of its greedy (``valid_beam: 1``) or beam translations. The best score of
``training.early_stopping_metric`` is saved as ``checkpoints/best.safetensors``; after ``training.patience``
validations without improvement training stops. Every ``output.checkpoint_every`` steps (and at the end) a
full checkpoint is written (:mod:`qkv.train.checkpoint_io`): model, optimizer, schedule, RNG states of
every rank, batcher position, step and best score, so ``--resume`` continues with exactly the batches and
random numbers an uninterrupted run would have used.

At the end the model chosen by ``output.export`` (best, last or the average of the last
``output.average_last`` checkpoints) is written to the model directory (see :mod:`qkv.train.translate`),
and, when ``data.test`` names files, scored on them (greedy or ``valid_beam`` decoding, like validation).

Failures stop the run with one message (:class:`TrainError`): an output directory that cannot be written
is found before any work, a write that fails during training (a full disk) names the file and keeps the
checkpoints written before, ``--resume`` names every checkpoint it had to skip and why (and refuses to
start over when none is readable), and Ctrl-C ends with :class:`TrainInterrupted`, saying which checkpoint
``--resume`` will continue from.

Log: ``train.log`` (plain text, one line per ``output.log_every`` steps with loss, lr, target tokens/s,
gradient norm; one per validation), ``metrics.jsonl`` (one JSON object per validation), a tqdm progress
bar, and TensorBoard scalars under ``tensorboard/`` when ``output.tensorboard`` is on and it is installed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from qkv.data.batching import Batch, SequentialBatcher, TokenBatcher, collate, padded_tokens
from qkv.data.corpus import generate_corpus, split_paths, write_corpus
from qkv.data.parallel import DataError, LoadReport, Pair, load_parallel, load_tsv
from qkv.data.tokenizer import Example, Tokenizer, encode_pairs, train_tokenizer
from qkv.models.checkpoint import save_model
from qkv.models.interface import Seq2SeqModel
from qkv.models.rnn import RNNSeq2Seq
from qkv.models.transformer import TransformerSeq2Seq
from qkv.train import checkpoint_io as ckpt
from qkv.train.config import Config, ConfigError, SplitFiles, read_yaml
from qkv.train.ddp import (
    DistContext,
    barrier,
    broadcast_flag,
    distributed_session,
    gather_tensors,
    no_sync,
    shard_rows,
    unwrap_model,
    wrap_model,
)
from qkv.train.evaluate import score
from qkv.train.loss import label_smoothed_loss
from qkv.train.safe_yaml import short_repr
from qkv.train.schedule import WarmupSchedule
from qkv.train.translate import (
    TRAIN_CONFIG_FILE,
    decode_sources,
    has_tokenizers,
    load_tokenizers,
    save_tokenizers,
)

CHECKPOINT_DIR = "checkpoints"
DATA_DIR = "data"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
LOWER_IS_BETTER = {"loss"}
EXPORT_TEMP_PREFIX = ".export-"


class TrainError(RuntimeError):
    """Training cannot start or continue as asked; the message says why and what to do."""


class TrainInterrupted(TrainError):
    """Training was interrupted (Ctrl-C); the message says at which step and where ``--resume`` continues."""


def write_failure(what: str, path: Path, error: OSError) -> TrainError:
    """A :class:`TrainError` for a failed write: the file, the system's reason and what is left intact."""
    reason = error.strerror or str(error)
    code = f" ({errno.errorcode.get(error.errno, error.errno)})" if error.errno else ""
    return TrainError(f"cannot write {what} {path}: {reason}{code}; the files written before it are intact")


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and check a file can be created in it (before any work is done)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise TrainError(
            f"output.dir {directory} cannot be written: {e.strerror or e}"
            + (f" ({e.filename})" if e.filename and str(e.filename) != str(directory) else "")
            + "; choose a directory you can write (--set output.dir=...)"
        ) from None


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        step: the last update done.
        output_dir: the model directory.
        best_metric, best_score, best_step: the early-stopping metric, its best value and when (``None``
            without validation).
        stopped_early: patience ran out before ``training.max_steps``.
        resumed_from: the checkpoint training continued from, if any.
        exported: which weights are in the model directory (``best``, ``last`` or ``averaged``).
        last_validation: the scores of the last validation.
        test_scores: the exported model's scores on ``data.test`` (empty without a test split).
    """

    step: int
    output_dir: Path
    best_metric: str
    best_score: float | None
    best_step: int | None
    stopped_early: bool
    resumed_from: Path | None
    exported: str
    last_validation: dict[str, Any] = field(default_factory=dict)
    test_scores: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedData:
    train_pairs: list[Pair]
    valid_pairs: list[Pair]
    src_tokenizer: Tokenizer
    tgt_tokenizer: Tokenizer
    train_examples: list[Example]
    valid_examples: list[Example]
    test_pairs: list[Pair] = field(default_factory=list)
    test_examples: list[Example] = field(default_factory=list)


def build_model(config: Config, src_vocab_size: int, tgt_vocab_size: int) -> nn.Module:
    """The model ``config.model`` describes, for these vocabulary sizes."""
    model_config = config.model.build(
        src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, shared_vocab=config.data.shared_vocab
    )
    return TransformerSeq2Seq(model_config) if config.model.type == "transformer" else RNNSeq2Seq(model_config)


def _load_split(
    name: str, files: SplitFiles, max_chars: int | None, max_length: int | None, log: Callable[[str], None]
) -> list[Pair]:
    """The kept pairs of one split, logging what was dropped (empty or too long pairs) and why."""
    report: LoadReport
    if files.tsv is not None:
        pairs, report = load_tsv(files.tsv, max_chars=max_chars, max_tokens=max_length)
    else:
        pairs, report = load_parallel(files.src, files.tgt, max_chars=max_chars, max_tokens=max_length)  # type: ignore[arg-type]
    if report.dropped_empty or report.dropped_long:
        log(f"{name} split: {report.summary()}")
    return pairs


def _corpus_is_current(directory: Path, config: Config) -> bool:
    meta_path = directory / "corpus.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    d = config.data
    want = {"train": None, "valid": round(d.size * d.valid_fraction), "test": round(d.size * d.test_fraction)}
    sizes = meta.get("sizes", {})
    return (
        meta.get("name") == d.corpus
        and meta.get("seed") == d.seed
        and sum(sizes.values()) == d.size
        and all(sizes.get(k) == v for k, v in want.items() if v is not None)
    )


def prepare_data(
    config: Config, ctx: DistContext, *, reuse_tokenizers: bool, log: Callable[[str], None]
) -> PreparedData:
    """Generate or read the corpus and train (or, when resuming, reload) the tokenizers.

    Rank 0 writes the files (a built-in corpus under ``<output>/data/``, the tokenizers in the model
    directory); the other ranks wait and read them, so every rank has the same data.
    """
    d = config.data
    out = config.output_dir
    if d.corpus is not None:
        corpus_dir = out / DATA_DIR
        if ctx.is_main and not _corpus_is_current(corpus_dir, config):
            corpus = generate_corpus(
                d.corpus, d.size, seed=d.seed, valid_fraction=d.valid_fraction, test_fraction=d.test_fraction
            )
            write_corpus(corpus, corpus_dir)
            log(f"generated the {d.corpus} corpus ({d.size} pairs, seed {d.seed}) in {corpus_dir}")
        barrier(ctx)
        splits: dict[str, SplitFiles | None] = {
            name: SplitFiles(*map(str, split_paths(corpus_dir, name))) for name in ("train", "valid")
        }
    else:
        splits = {"train": d.train, "valid": d.valid}
    train_files, valid_files = splits["train"], splits["valid"]
    assert train_files is not None and valid_files is not None, "the config requires data.train and data.valid"
    train_pairs = _load_split("train", train_files, d.max_chars, d.max_length, log)
    valid_pairs = _load_split("valid", valid_files, d.max_chars, d.max_length, log)
    # The test split (your own files only; the demo scores the built-in corpus' test split itself) is
    # scored once, at the end, with the exported model.
    test_pairs = _load_split("test", d.test, d.max_chars, d.max_length, log) if d.test is not None else []
    if not train_pairs or not valid_pairs:
        raise TrainError(f"no {'training' if not train_pairs else 'validation'} pairs left after filtering")

    if ctx.is_main and not (reuse_tokenizers and has_tokenizers(out)):
        src_texts = [s for s, _ in train_pairs]
        tgt_texts = [t for _, t in train_pairs]
        kind = d.tokenizer
        model_type = d.sentencepiece_type if kind == "sentencepiece" else None
        if d.shared_vocab:
            src_tok = tgt_tok = train_tokenizer(
                kind, src_texts + tgt_texts, vocab_size=d.vocab_size, model_type=model_type
            )
        else:
            src_tok = train_tokenizer(kind, src_texts, vocab_size=d.vocab_size, model_type=model_type)
            tgt_tok = train_tokenizer(kind, tgt_texts, vocab_size=d.vocab_size, model_type=model_type)
        save_tokenizers(out, src_tok, tgt_tok, shared=d.shared_vocab)
        log(f"trained {kind} tokenizers: source {src_tok.vocab_size} ids, target {tgt_tok.vocab_size} ids")
    barrier(ctx)
    src_tok, tgt_tok = load_tokenizers(out)
    return PreparedData(
        train_pairs=train_pairs,
        valid_pairs=valid_pairs,
        src_tokenizer=src_tok,
        tgt_tokenizer=tgt_tok,
        train_examples=encode_pairs(train_pairs, src_tok, tgt_tok),
        valid_examples=encode_pairs(valid_pairs, src_tok, tgt_tok),
        test_pairs=test_pairs,
        test_examples=encode_pairs(test_pairs, src_tok, tgt_tok),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class RunLog:
    """The plain log file, metrics.jsonl, console echo and optional TensorBoard (rank 0 only)."""

    def __init__(self, directory: Path, *, enabled: bool, tensorboard: bool, echo: Callable[[str], None]) -> None:
        self.enabled = enabled
        self.echo = echo
        self.log_path = directory / LOG_FILE
        self.metrics_path = directory / METRICS_FILE
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.line("output.tensorboard is on but tensorboard is not installed; logging to train.log only")
            else:
                self.writer = SummaryWriter(str(directory / "tensorboard"))

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {text}\n")
        self.echo(text)

    def metrics(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _echo(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)


class Trainer:
    """One training run; :func:`train` builds and runs it."""

    def __init__(self, config: Config, ctx: DistContext, *, resume: bool, echo: Callable[[str], None] = _echo) -> None:
        self.config, self.ctx = config, ctx
        t = config.training
        self.out = config.output_dir
        self.ckpt_dir = self.out / CHECKPOINT_DIR
        self.device = ctx.device
        if ctx.is_main:
            check_writable(self.out)
        barrier(ctx)
        existing = ckpt.step_checkpoints(self.ckpt_dir)
        if existing and not resume:
            raise TrainError(
                f"{self.out} already has training checkpoints (up to step {existing[-1][0]}); pass --resume to "
                "continue that run, or set output.dir to a new directory"
            )
        if resume:
            self._check_resumable()
        barrier(ctx)  # every rank has read the saved config before rank 0 replaces it
        self.log = RunLog(self.out, enabled=ctx.is_main, tensorboard=config.output.tensorboard, echo=echo)
        if ctx.is_main:
            removed = ckpt.clean_temp_files(self.ckpt_dir)
            if removed:
                self.log.line(f"removed {len(removed)} unfinished checkpoint file(s) of an interrupted run")
            exports = [p for p in self.out.glob(f"{EXPORT_TEMP_PREFIX}*") if p.is_dir()]
            for path in exports:
                shutil.rmtree(path, ignore_errors=True)
            if exports:
                self.log.line(f"removed {len(exports)} unfinished export director(ies) of an interrupted run")
            ckpt.atomic_write(self.out / TRAIN_CONFIG_FILE, config.to_yaml().encode("utf-8"))

        seed_everything(t.seed)
        self.data = prepare_data(config, ctx, reuse_tokenizers=resume, log=self.log.line)
        self.src_tok, self.tgt_tok = self.data.src_tokenizer, self.data.tgt_tokenizer
        seed_everything(t.seed)  # the same initial weights whatever data preparation drew
        self.model = build_model(config, self.src_tok.vocab_size, self.tgt_tok.vocab_size).to(self.device)
        self.ddp_model = wrap_model(self.model, ctx)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=t.lr,
            betas=(t.betas[0], t.betas[1]),
            eps=t.adam_eps,
            weight_decay=t.weight_decay,
        )
        self.schedule = WarmupSchedule(
            self.optimizer, t.schedule, lr=t.lr, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_lr=t.min_lr
        )
        self.amp_dtype = None
        if self.device.type == "cuda" and t.precision != "fp32":
            self.amp_dtype = torch.bfloat16 if t.precision == "bf16" else torch.float16
        elif t.precision != "fp32":
            self.log.line(f"training.precision {t.precision} applies on CUDA only; training in fp32 on {self.device}")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype is torch.float16)
        self.batcher = TokenBatcher(
            self.data.train_examples, max_tokens=t.max_tokens, seed=t.seed, bucket_size=t.bucket_size
        )
        self.step = 0
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.bad_validations = 0
        self.last_valid_step = 0
        self.last_checkpoint_step = 0
        self.last_validation: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self.stopped_early = False
        self.test_scores: dict[str, Any] = {}
        # Dropout draws differ between ranks (each sees other rows), reproducibly.
        torch.manual_seed(t.seed + 1 + ctx.rank)
        if resume:
            self._resume()

    # -- resuming ---------------------------------------------------------------------------------------

    def _check_resumable(self) -> None:
        saved_path = self.out / TRAIN_CONFIG_FILE
        if not saved_path.is_file():
            return
        saved = read_yaml(saved_path)
        now = self.config.to_dict()
        for section in ("data", "model"):
            before = saved.get(section, {}) or {}
            keys = sorted(set(before) | set(now[section]))
            changed = [k for k in keys if before.get(k) != now[section].get(k)]
            if changed:
                k = changed[0]
                raise TrainError(
                    f"cannot resume: {section}.{k} was {short_repr(before.get(k))} in {saved_path} but is "
                    f"{short_repr(now[section].get(k))} now; a resumed run needs the same data and model settings"
                )

    def _resume(self) -> None:
        found = ckpt.find_resumable(self.ckpt_dir)
        skipped = "; ".join(f"{path.name}: {reason}" for path, reason in found.skipped)
        if found.path is None or found.checkpoint is None:
            if found.skipped:
                raise TrainError(
                    f"cannot resume: no checkpoint in {self.ckpt_dir} can be read ({skipped}); move or delete "
                    "them to start again from step 0"
                )
            self.log.line(f"--resume: no checkpoint in {self.ckpt_dir}; starting from step 0")
            return
        path, saved = found.path, found.checkpoint
        for bad, reason in found.skipped:
            self.log.line(
                f"warning: --resume skipped {bad}, which cannot be read ({reason}); continuing from the older "
                f"{path.name}, and training will overwrite {bad.name} when it reaches that step"
            )
        state = saved.state
        try:
            self.model.load_state_dict(saved.model)
        except RuntimeError as e:  # torch lists every missing key and shape mismatch
            first = str(e).strip().splitlines()
            raise TrainError(
                f"cannot resume from {path}: it does not fit the model built from the config and the tokenizers "
                f"in {self.out} ({first[-1].strip() if first else e}); were the tokenizers replaced?"
            ) from None
        if saved.optimizer is None:
            raise TrainError(f"{path} has no optimizer state; it is not a step checkpoint")
        self.optimizer.load_state_dict(saved.optimizer)
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        try:
            self.batcher.load_state_dict(state["batcher"])
        except DataError as e:
            raise TrainError(f"cannot resume from {path}: {e}") from None
        self.step = int(state["step"])
        best = state.get("best") or {}
        self.best_score, self.best_step = best.get("score"), best.get("step")
        self.bad_validations = int(state.get("bad_validations", 0))
        self.last_valid_step = int(state.get("last_valid_step", 0))
        self.last_checkpoint_step = self.step
        self.stopped_early = bool(state.get("stopped_early", False))
        if not ckpt.restore_rng(saved.rng, state.get("rng", {}), self.ctx.rank):
            self.log.line(
                f"{path} was written by {state.get('world_size')} process(es); rank {self.ctx.rank} has no saved RNG "
                "state, so dropout draws differ from an uninterrupted run"
            )
        self.resumed_from = path
        self.log.line(f"resumed from {path} at step {self.step}")

    # -- one update --------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[Batch]:
        while True:
            yield from self.batcher

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _shard(self, batch: Batch) -> tuple[Batch, float]:
        """This rank's rows of ``batch`` and the weight of their loss (0 for a stand-in row when the batch
        has fewer rows than there are ranks: every rank must run forward and backward for DDP)."""
        if not self.ctx.distributed:
            return batch, 1.0
        rows = shard_rows(range(batch.size), self.ctx)
        weight = 1.0
        if not rows:
            rows, weight = [0], 0.0
        indices = [int(batch.indices[r]) for r in rows]
        examples = [self.batcher.examples[i] for i in indices]
        return collate(examples, indices), weight

    def _update(self, batches: list[Batch]) -> tuple[float, float, int, float | None]:
        """One optimizer step over ``batches``; returns this rank's summed loss, NLL, tokens and the grad norm."""
        t = self.config.training
        model = self.ddp_model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        total_tokens = sum(b.num_tgt_tokens for b in batches)
        scale = self.ctx.world_size / total_tokens
        loss_total = nll_total = 0.0
        tokens = 0
        for i, batch in enumerate(batches):
            part, weight = self._shard(batch)
            part = part.to(self.device)
            with no_sync(model, i == len(batches) - 1), self._autocast():
                out = model(part.src, part.src_lengths, part.tgt_in)
                loss_sum, nll_sum, n = label_smoothed_loss(
                    out.logits, part.tgt_out, smoothing=t.label_smoothing, pad_id=self.tgt_tok.pad_id
                )
                loss = loss_sum * (weight * scale)
            self.scaler.scale(loss).backward()
            if weight:
                loss_total += float(loss_sum.detach())
                nll_total += float(nll_sum)
                tokens += n
        grad_norm = None
        if t.clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_total, nll_total, tokens, grad_norm

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        if not self.ctx.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    # -- validation --------------------------------------------------------------------------------------

    def validate(self) -> dict[str, Any]:
        """Loss, perplexity, BLEU, chrF and exact match on the valid split (rank 0)."""
        t = self.config.training
        pairs, examples = self.data.valid_pairs, self.data.valid_examples
        if t.valid_max_sentences is not None:
            pairs, examples = pairs[: t.valid_max_sentences], examples[: t.valid_max_sentences]
        return self.score_split(pairs, examples)

    def score_split(self, pairs: list[Pair], examples: list[Example]) -> dict[str, Any]:
        """Loss, perplexity, BLEU, chrF and exact match of the current model on ``pairs`` (rank 0)."""
        t = self.config.training
        model = unwrap_model(self.ddp_model)
        longest = max(padded_tokens(1, len(s), len(g)) for s, g in examples)
        batcher = SequentialBatcher(examples, max_tokens=max(t.max_tokens, longest), sort_by_length=True)
        nll_sum, tokens = 0.0, 0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self._autocast():
                for batch in batcher:
                    batch = batch.to(self.device)
                    out = model(batch.src, batch.src_lengths, batch.tgt_in)
                    _, nll, n = label_smoothed_loss(
                        out.logits, batch.tgt_out, smoothing=0.0, pad_id=self.tgt_tok.pad_id
                    )
                    nll_sum += float(nll)
                    tokens += n
            hypotheses = decode_sources(
                cast(Seq2SeqModel, model),
                [s for s, _ in examples],
                beam=t.valid_beam,
                length_penalty=t.length_penalty,
                max_tokens=t.max_tokens,
                device=self.device,
            )
        finally:
            model.train(was_training)
        texts = [self.tgt_tok.decode(h.tokens) for h in hypotheses]
        scores = score(texts, [g for _, g in pairs])
        loss = nll_sum / max(tokens, 1)
        return {
            "step": self.step,
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "bleu": scores.bleu,
            "chrf": scores.chrf,
            "exact_match": scores.exact_match,
            "sentences": scores.count,
            "bleu_signature": scores.bleu_signature,
            "chrf_signature": scores.chrf_signature,
            "example": {"source": pairs[0][0], "reference": pairs[0][1], "hypothesis": texts[0]},
        }

    def _validate_and_track(self) -> bool:
        """Validate (rank 0), keep the best, and decide on early stopping; returns whether to stop."""
        t = self.config.training
        stop = False
        if self.ctx.is_main:
            result = self.validate()
            self.last_validation = result
            metric = t.early_stopping_metric
            value = result[metric]
            lower = metric in LOWER_IS_BETTER
            improved = self.best_score is None or (value < self.best_score if lower else value > self.best_score)
            if improved:
                self.best_score, self.best_step, self.bad_validations = value, self.step, 0
                best_path = self.ckpt_dir / ckpt.BEST_FILE
                try:
                    ckpt.save_checkpoint(
                        best_path,
                        unwrap_model(self.ddp_model).state_dict(),
                        state={"step": self.step, "metric": metric, "score": value, "validation": result},
                    )
                except OSError as e:
                    raise write_failure("checkpoint", best_path, e) from None
            else:
                self.bad_validations += 1
            stop = t.patience is not None and self.bad_validations >= t.patience
            result.update(best_metric=metric, best_score=self.best_score, best_step=self.best_step, lr=self._lr())
            self.log.metrics(result)
            self.log.scalars("valid", {k: result[k] for k in ("loss", "ppl", "bleu", "chrf", "exact_match")}, self.step)
            self.log.line(
                f"valid step {self.step} | loss {result['loss']:.4f} | ppl {result['ppl']:.2f} | "
                f"BLEU {result['bleu']:.2f} | chrF {result['chrf']:.2f} | exact {result['exact_match']:.2f}% | "
                f"best {metric} {self.best_score:.4g} at step {self.best_step}"
                + (" (new best)" if improved else f" ({self.bad_validations} without improvement)")
            )
            self.log.line(f"  BLEU|{result['bleu_signature']}  chrF2|{result['chrf_signature']}")
            self.log.line(
                f"  example: {result['example']['source']!r} → {result['example']['hypothesis']!r} "
                f"(reference {result['example']['reference']!r})"
            )
            if stop:
                self.log.line(f"early stopping: {metric} did not improve for {t.patience} validations")
        self.last_valid_step = self.step
        return broadcast_flag(stop, self.ctx)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write ``step_<step>.safetensors`` (rank 0; every rank contributes its RNG state) and prune."""
        rng, rng_scalars = ckpt.capture_rng(0)
        if self.ctx.distributed:
            rng = {k: v for k, v in rng.items() if not k.startswith("rank")}
            for rank, rank_state in enumerate(gather_tensors(torch.get_rng_state(), self.ctx)):
                rng[f"rank{rank}/torch"] = rank_state
            if self.device.type == "cuda":
                for rank, rank_state in enumerate(gather_tensors(torch.cuda.get_rng_state(self.device), self.ctx)):
                    rng[f"rank{rank}/cuda"] = rank_state
        self.last_checkpoint_step = self.step
        if not self.ctx.is_main:
            return
        state: dict[str, object] = {
            "step": self.step,
            "epoch": self.batcher.position.epoch,
            "best": {
                "metric": self.config.training.early_stopping_metric,
                "score": self.best_score,
                "step": self.best_step,
            },
            "bad_validations": self.bad_validations,
            "last_valid_step": self.last_valid_step,
            "batcher": self.batcher.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_scalars,
            "world_size": self.ctx.world_size,
            "stopped_early": self.stopped_early,
        }
        path = self.ckpt_dir / ckpt.STEP_FILE.format(step=self.step)
        try:
            ckpt.save_checkpoint(
                path, self.model.state_dict(), optimizer_state=self.optimizer.state_dict(), state=state, rng=rng
            )
        except OSError as e:
            raise write_failure("checkpoint", path, e) from None
        ckpt.prune_checkpoints(self.ckpt_dir, self.config.output.keep_last)

    def _finish(self) -> str:
        """Average and export (rank 0); returns what was exported."""
        o = self.config.output
        if o.average_last >= 2:
            steps = ckpt.step_checkpoints(self.ckpt_dir)[-o.average_last :]
            averaged = ckpt.average_checkpoints([p for _, p in steps])
            averaged_path = self.ckpt_dir / ckpt.AVERAGED_FILE
            try:
                ckpt.save_checkpoint(averaged_path, averaged, state={"steps": [s for s, _ in steps]})
            except OSError as e:
                raise write_failure("checkpoint", averaged_path, e) from None
            self.log.line(f"averaged the checkpoints of steps {', '.join(str(s) for s, _ in steps)}")
        export = o.export
        model = unwrap_model(self.ddp_model)
        if export == "best":
            best_path = self.ckpt_dir / ckpt.BEST_FILE
            model.load_state_dict(ckpt.load_checkpoint(best_path).model)
        elif export == "averaged":
            model.load_state_dict(ckpt.load_checkpoint(self.ckpt_dir / ckpt.AVERAGED_FILE).model)
        try:
            export_model(model, self.out)
        except OSError as e:
            raise write_failure("the model into", self.out, e) from None
        what = {"best": f"best ({self.best_step})", "last": f"last ({self.step})", "averaged": "averaged"}[export]
        self.log.line(f"wrote the {what} model to {self.out}")
        return export

    def _score_test(self) -> None:
        """Score the exported model (now in ``self.model``) on ``data.test`` and log it (rank 0)."""
        result = self.score_split(self.data.test_pairs, self.data.test_examples)
        self.test_scores = result
        self.log.metrics({"split": "test", **result})
        self.log.line(
            f"test ({result['sentences']} sentences, exported model) | loss {result['loss']:.4f} | "
            f"ppl {result['ppl']:.2f} | BLEU {result['bleu']:.2f} | chrF {result['chrf']:.2f} | "
            f"exact {result['exact_match']:.2f}%"
        )

    def _interrupted(self) -> TrainInterrupted:
        """The error for Ctrl-C: the step reached and what ``--resume`` will continue from."""
        found = ckpt.step_checkpoints(self.ckpt_dir)
        if found:
            where = f"--resume continues from {found[-1][1]} (step {found[-1][0]})"
        else:
            where = "no checkpoint was written yet, so a new run starts from step 0"
        return TrainInterrupted(f"interrupted at step {self.step}; {where}")

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        t, o = self.config.training, self.config.output
        main = self.ctx.is_main
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log.line(
            f"training {self.config.model.type} ({n_params:,} parameters) on {self.device}"
            f"{f' × {self.ctx.world_size} processes' if self.ctx.distributed else ''}: "
            f"{len(self.data.train_examples)} training pairs, {len(self.data.valid_examples)} valid pairs, "
            f"{self.batcher.num_batches(self.batcher.position.epoch)} batches an epoch, "
            f"steps {self.step} → {t.max_steps}"
        )
        bar = None
        if main and o.progress_bar:
            from tqdm import tqdm

            # disable=None: only on a terminal, so a redirected log is not filled with carriage returns
            bar = tqdm(
                total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr, disable=None
            )
        stream = self._batches()
        if self.stopped_early:
            self.log.line(f"this run stopped early at step {self.step} (patience ran out); not training further")
        interval = [0.0, 0.0, 0.0]  # loss, nll, tokens since the last log line
        interval_seconds = 0.0
        grad_norm = None
        try:
            while self.step < t.max_steps and not self.stopped_early:
                started = time.perf_counter()
                batches = [next(stream) for _ in range(t.accumulate)]
                loss, nll, tokens, grad_norm = self._update(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                interval_seconds += time.perf_counter() - started
                self.step += 1
                interval = [interval[0] + loss, interval[1] + nll, interval[2] + tokens]
                if bar is not None:
                    bar.update(1)
                if self.step % o.log_every == 0 or self.step == t.max_steps:
                    loss_sum, nll_sum, token_sum = self._sum_over_ranks(interval)
                    seconds = self._sum_over_ranks([interval_seconds])[0] / self.ctx.world_size
                    per_token = loss_sum / max(token_sum, 1)
                    self.log.line(
                        f"step {self.step}/{t.max_steps} | epoch {self.batcher.position.epoch} | "
                        f"loss {per_token:.4f} | nll {nll_sum / max(token_sum, 1):.4f} | lr {self._lr():.3e} | "
                        f"tokens/s {token_sum / max(seconds, 1e-9):.0f}"
                        + (f" | grad_norm {grad_norm:.3f}" if grad_norm is not None else "")
                    )
                    self.log.scalars("train", {"loss": per_token, "lr": self._lr()}, self.step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{per_token:.3f}", lr=f"{self._lr():.2e}")
                    interval, interval_seconds = [0.0, 0.0, 0.0], 0.0
                if self.step % t.valid_every == 0 or self.step == t.max_steps:
                    self.stopped_early = self._validate_and_track()
                if self.step % o.checkpoint_every == 0 or self.step == t.max_steps or self.stopped_early:
                    self.save_checkpoint()
            if self.last_valid_step != self.step:
                self.stopped_early = self._validate_and_track() or self.stopped_early
            if self.last_checkpoint_step != self.step or not ckpt.step_checkpoints(self.ckpt_dir):
                self.save_checkpoint()
            exported = self._finish() if main else self.config.output.export
            if main and self.data.test_examples:
                self._score_test()
        except KeyboardInterrupt:
            # The checkpoints on disk are whole (atomic writes); the update in flight is simply lost.
            raise self._interrupted() from None
        finally:
            if bar is not None:
                bar.close()
            self.log.close()
        barrier(self.ctx)
        return TrainResult(
            step=self.step,
            output_dir=self.out,
            best_metric=t.early_stopping_metric,
            best_score=self.best_score,
            best_step=self.best_step,
            stopped_early=self.stopped_early,
            resumed_from=self.resumed_from,
            exported=exported,
            last_validation=self.last_validation,
            test_scores=self.test_scores,
        )


def export_model(model: nn.Module, directory: Path) -> None:
    """``save_model`` into a temporary directory beside the target, then ``os.replace`` each file into
    ``directory``: a reader never sees a half-written ``model.safetensors`` or ``config.json``."""
    tmp = Path(tempfile.mkdtemp(prefix=EXPORT_TEMP_PREFIX, dir=directory))
    try:
        save_model(model, tmp)
        for item in tmp.iterdir():
            os.replace(item, directory / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train(
    config: Config,
    *,
    resume: bool = False,
    ctx: DistContext | None = None,
    echo: Callable[[str], None] = _echo,
) -> TrainResult:
    """Train as ``config`` says (see the module docstring); under torchrun, one process of several.

    Raises:
        ConfigError, TrainError, DataError: a configuration, resume, data or write problem, with a message
            saying what is wrong.
        TrainInterrupted: Ctrl-C (a :class:`TrainError` saying where ``--resume`` continues).
    """
    if ctx is not None:
        return Trainer(config, ctx, resume=resume, echo=echo).run()
    with distributed_session(config.training.device) as own:
        return Trainer(config, own, resume=resume, echo=echo).run()


__all__ = [
    "ConfigError",
    "TrainError",
    "TrainInterrupted",
    "TrainResult",
    "Trainer",
    "build_model",
    "export_model",
    "train",
]
