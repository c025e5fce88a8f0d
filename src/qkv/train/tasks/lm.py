"""Language modelling (``task: lm``): a GPT-style :class:`~qkv.models.TransformerLM` on running text.

::

    task: lm
    data:
      corpus: python_docs        # the built-in text (qkv.data.text), or
      files: [a.txt, b.txt]      # your UTF-8 text files, joined in order
      max_chars: null            # keep only the first characters of the text
      tokenizer: char            # char | byte | sentencepiece (vocab_size, sentencepiece_type: unigram | bpe)
      valid_fraction: 0.1        # the last 10% of the text is held out (by position, not shuffled)
      block_size: 256            # tokens of context; training blocks have block_size + 1
    model:                       # qkv.models.LMConfig: GPT-2 style by default (learned positions, pre-LN,
      d_model: 384               #   GELU, tied embeddings); current practice: positional: rotary,
      num_heads: 6               #   kv_heads: 2 (grouped-query), window: 128 (sliding window)
      num_layers: 6
    training:
      batch_size: 64             # blocks per batch (per optimizer step, with accumulate: 1)
      valid_blocks: 200          # validation scores at most this many consecutive blocks of the valid text
      sample_tokens: 200         # the sample each validation logs (0: none)

The model directory gets ``tokenizer.json`` (written by :meth:`LanguageModelingTask.prepare`) beside the
trainer's ``config.json`` + ``model.safetensors`` and ``train_config.yaml``; :mod:`qkv.train.lm_inference`
reads it (``qkv generate``, ``qkv evaluate --text``). Validation reports ``loss`` (nats per token),
``ppl``, ``bpc`` and ``bpb`` (bits per character and per UTF-8 byte, comparable across tokenizers; see
:mod:`qkv.train.lm_inference`), any of which ``training.early_stopping_metric`` may name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qkv.checks import ConfigError, StrictConfig, fraction, int_at_least, one_of, option, optional, qualified
from qkv.data.parallel import DataError
from qkv.data.text import BUILTIN_TEXTS, RandomBlocks, builtin_text, check_blocks, read_texts, split_text, token_stream
from qkv.data.tokenizer import (
    PAD_ID,
    SENTENCEPIECE_MODEL_TYPES,
    TOKENIZER_FILE,
    TOKENIZERS,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from qkv.models.config import LMConfig
from qkv.models.lm import TransformerLM
from qkv.train.ddp import barrier, shard_rows
from qkv.train.lm_inference import score_tokens, special_ids
from qkv.train.task import BatchLoss, Task, Validation

# Every tokenizer but "word": a word vocabulary cannot spell a word it has not seen, and a language model must.
LM_TOKENIZERS = tuple(kind for kind in TOKENIZERS if kind != "word")
SAMPLE_TEMPERATURE = 0.8
# LMConfig fields that come from the data, not from the model section.
DERIVED = ("vocab_size", "pad_id", "eos_id")


def _files(name: str, value: Any) -> list[str]:
    """A file name or a non-empty list of them."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise ConfigError(f"{name} must be a file name or a list of file names; got {value!r}")
    return list(items)


@dataclass
class LMDataConfig(StrictConfig):
    """The ``data:`` section of a language model (see the module docstring)."""

    corpus: str | None = option(None, optional(one_of), BUILTIN_TEXTS)
    files: list[str] | None = option(None, optional(_files))
    max_chars: int | None = option(None, optional(int_at_least), 1)
    tokenizer: str = option("char", one_of, LM_TOKENIZERS)
    vocab_size: int | None = option(None, optional(int_at_least), 5)
    sentencepiece_type: str = option("unigram", one_of, SENTENCEPIECE_MODEL_TYPES)
    valid_fraction: float = option(0.1, fraction)
    block_size: int = option(256, int_at_least, 1)

    def check(self, prefix: str) -> None:
        if (self.corpus is None) == (self.files is None):
            raise ConfigError(
                f"give either {qualified(prefix, 'corpus')} (built-in: {', '.join(BUILTIN_TEXTS)}) or "
                f"{qualified(prefix, 'files')} (your text files)" + (", not both" if self.corpus is not None else "")
            )
        if self.valid_fraction == 0:
            raise ConfigError(f"{qualified(prefix, 'valid_fraction')} must be > 0: training validates on it")
        if self.tokenizer == "byte" and self.vocab_size is not None:
            raise ConfigError(
                f"{qualified(prefix, 'vocab_size')} must be null with the byte tokenizer (260 ids); "
                f"got {self.vocab_size}"
            )


_LM_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(LMConfig)}


@dataclass
class LMModelConfig(StrictConfig):
    """The ``model:`` section: :class:`~qkv.models.LMConfig` without what the data sets (vocabulary size,
    special ids); ``max_positions`` defaults to ``data.block_size``. Values are checked by ``LMConfig``."""

    d_model: int = _LM_DEFAULTS["d_model"]
    num_heads: int = _LM_DEFAULTS["num_heads"]
    kv_heads: int | None = _LM_DEFAULTS["kv_heads"]
    num_layers: int = _LM_DEFAULTS["num_layers"]
    ffn_dim: int = _LM_DEFAULTS["ffn_dim"]
    dropout: float = _LM_DEFAULTS["dropout"]
    attention_dropout: float = _LM_DEFAULTS["attention_dropout"]
    activation_dropout: float = _LM_DEFAULTS["activation_dropout"]
    activation: str = _LM_DEFAULTS["activation"]
    norm_first: bool = _LM_DEFAULTS["norm_first"]
    positional: str = _LM_DEFAULTS["positional"]
    max_positions: int | None = None
    tie_embeddings: bool = _LM_DEFAULTS["tie_embeddings"]
    layer_norm_eps: float = _LM_DEFAULTS["layer_norm_eps"]
    window: int | None = _LM_DEFAULTS["window"]

    def check(self, prefix: str) -> None:
        self.build(vocab_size=16, block_size=self.max_positions or 1, prefix=prefix)

    def build(self, *, vocab_size: int, block_size: int, prefix: str = "model") -> LMConfig:
        """The :class:`LMConfig` for this vocabulary; learned positions must cover ``block_size``."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}
        params["max_positions"] = self.max_positions or block_size
        if self.positional == "learned" and params["max_positions"] < block_size:
            raise ConfigError(
                f"{qualified(prefix, 'max_positions')} ({params['max_positions']}) must be >= data.block_size "
                f"({block_size}) with learned positions"
            )
        try:
            return LMConfig(vocab_size=vocab_size, pad_id=PAD_ID, eos_id=None, **params)
        except (ValueError, TypeError) as e:
            message = str(e)
            named = any(message.startswith(key) for key in params)
            raise ConfigError(qualified(prefix, message) if named else f"{prefix}: {message}") from None


@dataclass
class LMTrainingConfig(StrictConfig):
    """The ``training:`` keys only language modelling reads (see the module docstring)."""

    batch_size: int = option(64, int_at_least, 1)
    valid_blocks: int | None = option(200, optional(int_at_least), 1)
    sample_tokens: int = option(200, int_at_least, 0)


class LanguageModelingTask(Task):
    """``task: lm`` (see the module docstring)."""

    name = "lm"
    data_config = LMDataConfig
    model_config = LMModelConfig
    training_config = LMTrainingConfig
    metrics: ClassVar[tuple[str, ...]] = ("loss", "ppl", "bpc", "bpb")
    lower_is_better: ClassVar[frozenset[str]] = frozenset(metrics)

    tokenizer: Tokenizer
    train_tokens: torch.Tensor
    valid_tokens: torch.Tensor

    @property
    def data(self) -> LMDataConfig:
        data: LMDataConfig = self.config.data  # type: ignore[assignment]
        return data

    @property
    def options(self) -> LMTrainingConfig:
        """The task's ``training:`` keys."""
        options: LMTrainingConfig = self.config.task_training
        return options

    def read_text(self) -> tuple[str, str]:
        """``(train, valid)`` text as the data section says."""
        d = self.data
        if d.files is not None:
            text = read_texts(d.files)
            text = text if d.max_chars is None else text[: d.max_chars]
        else:
            assert d.corpus is not None, "LMDataConfig.check requires corpus or files"
            text = builtin_text(d.corpus, max_chars=d.max_chars)
        return split_text(text, d.valid_fraction)

    def _train_tokenizer(self, train_text: str) -> Tokenizer:
        d = self.data
        if d.tokenizer == "sentencepiece":
            # SentencePiece learns from lines; "\n" is a piece of its own so running text keeps its layout.
            return SentencePieceTokenizer.train(
                train_text.splitlines(),
                vocab_size=d.vocab_size or 8000,
                model_type=d.sentencepiece_type,
                user_defined_symbols=("\n",),
            )
        return train_tokenizer(d.tokenizer, [train_text], vocab_size=d.vocab_size)

    def prepare(self, *, resume: bool) -> None:
        train_text, valid_text = self.read_text()
        path = self.config.output_dir / TOKENIZER_FILE
        if self.ctx.is_main and not (resume and path.is_file()):
            tokenizer = self._train_tokenizer(train_text)
            tokenizer.save(path)
            self.log(f"trained a {self.data.tokenizer} tokenizer: {tokenizer.vocab_size} ids")
        barrier(self.ctx)
        self.tokenizer = load_tokenizer(path)
        bos = self.tokenizer.bos_id
        self.train_tokens = token_stream(self.tokenizer.encode(train_text), bos)
        self.valid_tokens = token_stream(self.tokenizer.encode(valid_text), bos)
        check_blocks(self.train_tokens, self.data.block_size, "training text")
        if self.valid_tokens.numel() < 2:
            raise DataError("the validation text has no tokens; use a larger data.valid_fraction or more text")

    def describe(self) -> str:
        return (
            f"{self.train_tokens.numel() - 1:,} training tokens, {self.valid_tokens.numel() - 1:,} valid tokens "
            f"({self.data.tokenizer}, {self.tokenizer.vocab_size} ids), blocks of {self.data.block_size}"
        )

    def build_model(self) -> nn.Module:
        config = self.config.model.build(vocab_size=self.tokenizer.vocab_size, block_size=self.data.block_size)
        return TransformerLM(config)

    def train_batches(self) -> RandomBlocks:
        return RandomBlocks(
            self.train_tokens,
            block_size=self.data.block_size,
            batch_size=self.options.batch_size,
            seed=self.config.training.seed,
        )

    def batch_tokens(self, batch: torch.Tensor) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def shard(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        if not self.ctx.distributed:
            return batch, 1.0
        rows = shard_rows(range(batch.shape[0]), self.ctx)
        if not rows:
            return batch[:1], 0.0
        return batch[rows], 1.0

    def loss(self, model: nn.Module, batch: torch.Tensor, device: torch.device) -> BatchLoss:
        batch = batch.to(device)
        logits = model(batch[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        return BatchLoss(loss=nll, nll=float(nll.detach()), tokens=self.batch_tokens(batch))

    def validate(self, model: nn.Module, device: torch.device, step: int) -> Validation:
        lm = _language_model(model)
        score = score_tokens(
            lm,
            self.valid_tokens,
            self.tokenizer,
            block_size=self.data.block_size,
            max_windows=self.options.valid_blocks,
            device=device,
        )
        metrics = {"loss": score.loss, "ppl": score.ppl, "bpc": score.bpc, "bpb": score.bpb}
        lines = [f"  scored {score.tokens:,} tokens ({score.chars:,} characters, {score.bytes:,} bytes)"]
        extra: dict[str, Any] = {"tokens": score.tokens, "chars": score.chars}
        if self.options.sample_tokens:
            sample = self.sample(lm, device, self.options.sample_tokens)
            lines.append(f"  sample: {sample!r}")
            extra["sample"] = sample
        return Validation(metrics=metrics, lines=lines, extra=extra)

    def sample(self, model: TransformerLM, device: torch.device, tokens: int, *, prompt: str = "") -> str:
        """A continuation of ``prompt`` (empty: from ``bos_id``), sampled at temperature 0.8 with a generator
        seeded by ``training.seed``, so it changes only with the model (and the global RNG is untouched)."""
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.bos_id]
        limit = model.config.max_positions if model.config.positional == "learned" else None
        if limit is not None:
            tokens = min(tokens, limit - len(ids) + 1)
        generator = torch.Generator(device).manual_seed(self.config.training.seed)
        out = model.generate(
            torch.tensor([ids], device=device),
            tokens,
            temperature=SAMPLE_TEMPERATURE,
            generator=generator,
            suppress_ids=special_ids(self.tokenizer),
        )
        return self.tokenizer.decode(out[0, len(ids) :].tolist())


def _language_model(model: nn.Module) -> TransformerLM:
    inner = getattr(model, "module", model)  # DistributedDataParallel keeps the model as .module
    if not isinstance(inner, TransformerLM):
        raise TypeError(f"the lm task trains a TransformerLM; got {type(inner).__name__}")
    return inner
