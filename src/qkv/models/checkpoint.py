"""Save and load models as ``model.safetensors`` + ``config.json`` (never pickle).

``config.json`` holds the config's fields plus ``"model_type"`` (which class to build), e.g.
``{"model_type": "transformer_lm", "vocab_size": 100, ...}``. ``model.safetensors`` holds the state dict
with tied weights stored once: safetensors refuses tensors that share memory, so of every group of
state-dict entries that are one tensor (e.g. ``embed_tokens.weight`` and ``lm_head.weight``) only the first
is written, and loading re-ties them by building the model from its config (which ties them again).

A model type is loadable when it is in :data:`MODEL_TYPES`: its class has a ``model_type`` attribute, is
built as ``cls(config)`` and keeps the config as ``model.config`` (with ``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qkv.models.config import EncoderConfig, LMConfig, TransformerConfig
from qkv.models.encoder import TransformerEncoder
from qkv.models.lm import TransformerLM
from qkv.models.rnn import RNNConfig, RNNSeq2Seq
from qkv.models.transformer import TransformerSeq2Seq

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

MODEL_TYPES: dict[str, tuple[type[nn.Module], Any]] = {
    TransformerSeq2Seq.model_type: (TransformerSeq2Seq, TransformerConfig),
    TransformerLM.model_type: (TransformerLM, LMConfig),
    TransformerEncoder.model_type: (TransformerEncoder, EncoderConfig),
    RNNSeq2Seq.model_type: (RNNSeq2Seq, RNNConfig),
}


def tied_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first}`` for state-dict entries that are the same tensor as an earlier entry ``first``."""
    seen: dict[tuple[Any, ...], str] = {}
    aliases = {}
    for key, t in state_dict.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


def save_model(model: nn.Module, directory: str | Path) -> Path:
    """Write ``directory/config.json`` and ``directory/model.safetensors`` (creating ``directory``).

    Returns:
        The directory.
    """
    model_type = getattr(type(model), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"cannot save a {type(model).__name__}: its model_type {model_type!r} is not one of "
            f"{', '.join(map(repr, MODEL_TYPES))}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    aliases = tied_keys(state)
    tensors = {key: t.detach().cpu().contiguous() for key, t in state.items() if key not in aliases}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model_type": model_type})
    config = {"model_type": model_type, **model.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model ``directory/config.json`` describes and load ``directory/model.safetensors``.

    The model gets the checkpoint's floating-point dtype, is moved to ``device`` and returned in eval mode.

    Raises:
        ValueError: unknown ``model_type``, an invalid config, or weights that do not fit the model (the
            message names the missing and unexpected keys and the shape mismatches).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; a checkpoint directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    config = json.loads(config_path.read_text())
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{config_path} must be a JSON object with a 'model_type' key")
    model_type = config.pop("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{config_path}: unknown model_type {model_type!r}; known: {', '.join(map(repr, MODEL_TYPES))}"
        )
    cls, config_cls = MODEL_TYPES[model_type]
    model = cls(config_cls.from_dict(config))

    tensors = load_file(str(weights_path))
    expected = model.state_dict()
    aliases = tied_keys(expected)
    _check_compatible(tensors, {k: t for k, t in expected.items() if k not in aliases}, weights_path)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    full = dict(tensors)
    for alias, first in aliases.items():
        full[alias] = tensors[first]
    model.load_state_dict(full, strict=True)
    return model.to(device).eval()


def _check_compatible(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(t.shape)}"
        for k, t in expected.items()
        if k in found and found[k].shape != t.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing, ', ')}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected, ', ')}")
    if mismatched:
        problems.append(f"shape mismatches: {_some(mismatched, '; ')}")
    if problems:
        raise ValueError(f"{path} does not fit the model its config describes: " + "; ".join(problems))


def _some(items: list[str], sep: str, limit: int = 12) -> str:
    """The first ``limit`` items joined, and how many there are in all when that is more."""
    shown = sep.join(items[:limit])
    return shown if len(items) <= limit else f"{shown}{sep}... ({len(items)} in all)"
