"""Using a trained language model directory: streaming generation and scoring text.

A language model directory (``qkv train`` with ``task: lm``) holds ``config.json`` + ``model.safetensors``
(a :class:`~qkv.models.TransformerLM`), ``tokenizer.json`` and the training config. :class:`LanguageModel`
loads one (refusing a translation model with a message pointing at ``qkv translate``) and

- :meth:`LanguageModel.generate` yields the continuation of a prompt as text pieces, each as soon as its
  token is sampled (one token through the KV caches per step). A non-empty prompt is encoded as it is (as
  nanoGPT's ``sample.py`` does); an empty one starts from ``bos_id``, which begins the training stream.
  Special ids (padding, BOS, EOS, unknown) are never sampled. A byte-level model can sample the first
  bytes of a character before the rest: such a piece is held back until the character is complete. With
  a model of learned positions, the prompt plus the new tokens must fit its ``max_positions`` (an error
  says how many new tokens fit); rotary and sinusoidal models take any length, though past the training
  ``block_size`` they extrapolate.
- :meth:`LanguageModel.evaluate` scores a text: ``bos_id`` then its tokens, cut into consecutive windows of
  ``block_size + 1`` tokens that share their boundary token (:func:`~qkv.data.text.score_windows`), so every
  token of the text is predicted exactly once, with up to ``block_size`` tokens of context.

The scores (:class:`Score`): ``loss`` is nats per token, ``ppl = exp(loss)``, and, comparable across
tokenizers, ``bpc`` bits per character and ``bpb`` bits per UTF-8 byte: the summed negative log-likelihood
in bits over the characters (bytes) of the scored text, i.e. of the decoded target tokens (the text itself
when the whole of it is scored).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qkv.data.text import score_windows, token_stream
from qkv.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from qkv.models.checkpoint import load_model, stored_model_type
from qkv.models.lm import TransformerLM
from qkv.nn import LearnedPositionalEmbedding
from qkv.train.model_dir import ModelDirectoryError

DEFAULT_SCORE_BATCH = 16  # windows scored at once


@dataclass
class Score:
    """How well a language model predicts a text (see the module docstring).

    Attributes:
        loss: mean negative log-likelihood per token, in nats.
        ppl: perplexity, ``exp(loss)``.
        bpc: bits per character of the scored text.
        bpb: bits per UTF-8 byte of the scored text.
        tokens, chars, bytes: what was scored.
    """

    loss: float
    ppl: float
    bpc: float
    bpb: float
    tokens: int
    chars: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def special_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids generation never samples: padding, BOS, EOS and unknown, which running text never has as a
    target (EOS would also end the decoded text)."""
    return (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id)


def model_type_of(directory: str | os.PathLike) -> str | None:
    """The ``model_type`` recorded in ``directory/config.json`` (``None`` when it cannot be read: the full
    load then says why)."""
    try:
        return stored_model_type(directory)
    except (OSError, ValueError):
        return None


@torch.no_grad()
def score_tokens(
    model: TransformerLM,
    tokens: torch.Tensor,
    tokenizer: Tokenizer,
    *,
    block_size: int,
    max_windows: int | None = None,
    batch_size: int = DEFAULT_SCORE_BATCH,
    device: torch.device | str = "cpu",
) -> Score:
    """Score the stream ``tokens (N,)`` (``bos_id`` first, see :func:`~qkv.data.text.token_stream`) in windows
    of ``block_size + 1`` (at most ``max_windows`` of them) under ``model`` (whose mode the caller sets)."""
    windows = score_windows(tokens, block_size, max_windows)
    nats, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        # the last window may be shorter; it goes alone so the others stack into one batch
        for batch in _stackable(group):
            batch = batch.to(device)
            logits = model(batch[:, :-1])
            nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
            nats += float(nll)
            count += batch.shape[0] * (batch.shape[1] - 1)
    scored = torch.cat([w[1:] for w in windows]).tolist()
    text = tokenizer.decode(scored)
    chars, n_bytes = len(text), len(text.encode("utf-8"))
    loss = nats / count
    bits = nats / math.log(2)
    return Score(
        loss=loss,
        ppl=math.exp(min(loss, 700.0)),
        bpc=bits / max(chars, 1),
        bpb=bits / max(n_bytes, 1),
        tokens=count,
        chars=chars,
        bytes=n_bytes,
    )


def _stackable(windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """``windows`` as batches of equal length: the full ones stacked, a shorter last one on its own."""
    full = [w for w in windows if w.numel() == windows[0].numel()]
    rest = windows[len(full) :]
    return [torch.stack(full), *(w[None] for w in rest)]


class LanguageModel:
    """A trained :class:`~qkv.models.TransformerLM` with its tokenizer (see the module docstring).

    Attributes:
        model: the model, in eval mode.
        tokenizer: its tokenizer.
        block_size: the context it was trained on (``data.block_size``), used to cut texts for scoring.
        device: where the model runs.
    """

    def __init__(
        self, model: TransformerLM, tokenizer: Tokenizer, *, block_size: int, device: torch.device | str = "cpu"
    ) -> None:
        self.model, self.tokenizer, self.block_size = model.eval(), tokenizer, block_size
        self.device = torch.device(device)

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str = "cpu", block_size: int | None = None) -> LanguageModel:
        """Load a language model directory.

        Args:
            directory: ``qkv train``'s ``output.dir`` of an ``lm`` run.
            device: ``"cpu"``, ``"cuda"``, ``"auto"``.
            block_size: the scoring context; default the training ``data.block_size`` (from the training
                config in the directory), else the model's ``max_positions``.

        Raises:
            FileNotFoundError, ValueError: a missing or unusable file; ``ModelDirectoryError`` (a
                ``ValueError``) for a translation model or a tokenizer that does not fit the model.
        """
        directory = Path(directory)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available; use device 'cpu' or 'auto'")
        kind = model_type_of(directory)
        if kind is not None and kind != TransformerLM.model_type:
            raise ModelDirectoryError(
                f"{directory} holds a {kind} model, not a language model ({TransformerLM.model_type}); "
                "use qkv translate or qkv evaluate --src/--ref for a translation model"
            )
        model = load_model(directory, device=device)
        if not isinstance(model, TransformerLM):
            raise ModelDirectoryError(f"{directory} holds a {type(model).__name__}, not a language model")
        if not (directory / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{directory} has no {TOKENIZER_FILE} (a model directory written by qkv train)")
        tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
        if tokenizer.vocab_size != model.config.vocab_size or tokenizer.pad_id != model.config.pad_id:
            raise ModelDirectoryError(
                f"the model and the tokenizer of {directory} do not belong together: config.json's vocab_size is "
                f"{model.config.vocab_size} (pad_id {model.config.pad_id}) but the tokenizer has "
                f"{tokenizer.vocab_size} ids (pad_id {tokenizer.pad_id}); were files copied in from another run?"
            )
        if block_size is None:
            block_size = _trained_block_size(directory) or model.config.max_positions
        return cls(model, tokenizer, block_size=block_size, device=device)  # type: ignore[arg-type]

    @property
    def max_positions(self) -> int | None:
        """The most tokens the model can see (learned positions), ``None`` when unbounded."""
        learned = isinstance(self.model.embed_positions, LearnedPositionalEmbedding)
        return self.model.config.max_positions if learned else None

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids a prompt feeds the model: its tokens, or ``[bos_id]`` when it is empty."""
        return self.tokenizer.encode(prompt) or [self.tokenizer.bos_id]

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 200,
        *,
        temperature: float = 0.8,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """The continuation of ``prompt``, piece by piece as tokens are sampled (see the module docstring).

        ``seed``: the same seed gives the same text (``None``: fresh randomness). The arguments are checked
        before this returns.

        Raises:
            ValueError: a bad sampling argument, or (learned positions) a prompt plus ``max_new_tokens`` that
                does not fit the model's context.
        """
        ids = self.prompt_ids(prompt)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        limit = self.max_positions
        if limit is not None and len(ids) + max(max_new_tokens - 1, 0) > limit:
            fits = limit - len(ids) + 1
            raise ValueError(
                f"the prompt has {len(ids)} tokens and max_new_tokens is {max_new_tokens}, but this model sees at "
                f"most {limit} tokens (learned positions); "
                + (f"ask for at most {fits} new tokens" if fits > 0 else f"shorten the prompt to {limit} tokens")
            )
        generator = None
        if seed is not None:
            generator = torch.Generator(self.device).manual_seed(seed)
        prompt_tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        steps = self.model.stream(
            prompt_tensor,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            eos_id=None,
            suppress_ids=special_ids(self.tokenizer),
        )
        return self._pieces(ids, steps)

    def _pieces(self, ids: list[int], steps: Iterator[torch.Tensor]) -> Iterator[str]:
        """Decode the growing sequence after each token and yield what is new (decoding the pieces alone would
        lose a subword's leading space and split multi-byte characters)."""
        prefix = self.tokenizer.decode(ids) if ids != [self.tokenizer.bos_id] else ""
        emitted = prefix
        for token in steps:
            ids.append(int(token[0]))
            text = self.tokenizer.decode(ids)
            complete = text.rstrip("\ufffd")  # an unfinished UTF-8 character waits for its next bytes
            if len(complete) > len(emitted) and complete.startswith(emitted):
                yield complete[len(emitted) :]
                emitted = complete
        text = self.tokenizer.decode(ids)
        if len(text) > len(emitted):
            yield text[len(emitted) :]

    def evaluate(self, text: str, *, batch_size: int = DEFAULT_SCORE_BATCH) -> Score:
        """Score ``text`` (see the module docstring); ``ValueError`` for an empty text."""
        if not text:
            raise ValueError("the text is empty; expected text to score")
        tokens = token_stream(self.tokenizer.encode(text), self.tokenizer.bos_id)
        return score_tokens(
            self.model, tokens, self.tokenizer, block_size=self.block_size, batch_size=batch_size, device=self.device
        )


def _trained_block_size(directory: Path) -> int | None:
    """``data.block_size`` of the training config saved in ``directory`` (``None`` if there is none)."""
    from qkv.train.config import ConfigError, read_yaml

    for name in ("train.yaml", "train_config.yaml"):
        if (directory / name).is_file():
            try:
                value = (read_yaml(directory / name).get("data") or {}).get("block_size")
            except (ConfigError, AttributeError):
                return None
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    return None
