"""Checking that the parts of a model directory belong together.

A model directory (``qkv train``'s output) holds a model (``config.json`` + ``model.safetensors``) and its
tokenizers (``tokenizer.json``, or ``src_tokenizer.json`` + ``tgt_tokenizer.json``). Each file can be valid
on its own yet come from another run: a tokenizer with another vocabulary turns every id into the wrong
text without any error. :func:`check_model_directory` compares what each part says about the others:
the vocabulary sizes and the special ids (``pad``, ``bos``, ``eos``) of the model config and the tokenizers.
"""

from __future__ import annotations

import os
from typing import Any

from qkv.data.tokenizer import Tokenizer


class ModelDirectoryError(ValueError):
    """The files of a model directory do not belong together; the message names them and what differs."""


def _mismatches(config: Any, side: str, tokenizer: Tokenizer) -> list[str]:
    """What ``config`` (a seq2seq model config) says about the ``side`` vocabulary that ``tokenizer`` contradicts."""
    found = []
    size = getattr(config, f"{side}_vocab_size", None)
    if size is not None and size != tokenizer.vocab_size:
        found.append(f"{side}_vocab_size is {size} but the {side} tokenizer has {tokenizer.vocab_size} ids")
    names = ("pad_id",) if side == "src" else ("pad_id", "bos_id", "eos_id")
    for name in names:
        value = getattr(config, name, None)
        if value is not None and value != getattr(tokenizer, name):
            found.append(f"{name} is {value} but the {side} tokenizer's is {getattr(tokenizer, name)}")
    return found


def check_model_directory(
    directory: str | os.PathLike, model_config: Any, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer
) -> None:
    """Raise :class:`ModelDirectoryError` unless the model config and the tokenizers of ``directory`` agree.

    Args:
        directory: the model directory (for the message).
        model_config: the loaded model's config (``model.config``; a ``TransformerConfig`` or ``RNNConfig``).
        src_tokenizer, tgt_tokenizer: the directory's tokenizers.
    """
    problems = _mismatches(model_config, "src", src_tokenizer) + _mismatches(model_config, "tgt", tgt_tokenizer)
    if problems:
        raise ModelDirectoryError(
            f"the model and the tokenizers of {directory} do not belong together: config.json's "
            + "; ".join(problems)
            + " (were files copied in from another run?)"
        )
