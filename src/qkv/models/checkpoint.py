"""Save and load models as ``model.safetensors`` + ``config.json`` (never pickle).

``config.json`` holds the config's fields plus ``"model_type"`` (which class to build), e.g.
``{"model_type": "transformer_lm", "vocab_size": 100, ...}``. ``model.safetensors`` holds the state dict
with tied weights stored once: safetensors refuses tensors that share memory, so of every group of
state-dict entries that are one tensor (e.g. ``embed_tokens.weight`` and ``lm_head.weight``) only the first
is written, and loading re-ties them by building the model from its config (which ties them again).

A model type is loadable when it is in :data:`MODEL_TYPES`: its class has a ``model_type`` attribute, is
built as ``cls(config)`` and keeps the config as ``model.config`` (with ``to_dict`` / ``from_dict``).

Integrity: ``model.safetensors`` records the SHA-256 of every tensor in its metadata (``"sha256"``, a JSON
``{name: hex digest}``, see :func:`tensor_digests`), checked on load, so flipped bytes are an error naming
the file and the tensor rather than a model that silently computes something else. Files written before
digests were recorded load without the check. A model directory may come from anyone, so loading reads
regular files only, of bounded size, and compares the parameter count the config describes with the values
the weight file holds *before* allocating the model (a ``config.json`` asking for ``d_model`` 1,048,576
is refused instead of attempting a 4 TB allocation).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from torch.overrides import TorchFunctionMode

from qkv.models.config import EncoderConfig, LMConfig, TransformerConfig
from qkv.models.encoder import TransformerEncoder
from qkv.models.lm import TransformerLM
from qkv.models.rnn import RNNConfig, RNNSeq2Seq
from qkv.models.text_to_image import TextToImageConfig, TextToImageModel
from qkv.models.transformer import TransformerSeq2Seq
from qkv.models.vit import VisionTransformer, ViTConfig
from qkv.nn.multi_head import separate_projection_keys, stack_separate_projections
from qkv.safe_files import MiB, check_regular_file, read_json_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIGESTS_KEY = "sha256"
# A config.json is a few hundred bytes; anything near this is not one.
MAX_CONFIG_BYTES = 1 * MiB
# Weights are memory-mapped, not read, so their limit only stops absurd files (sparse or device files).
MAX_WEIGHTS_BYTES = 1 << 40

MODEL_TYPES: dict[str, tuple[type[nn.Module], Any]] = {
    TransformerSeq2Seq.model_type: (TransformerSeq2Seq, TransformerConfig),
    TransformerLM.model_type: (TransformerLM, LMConfig),
    TransformerEncoder.model_type: (TransformerEncoder, EncoderConfig),
    RNNSeq2Seq.model_type: (RNNSeq2Seq, RNNConfig),
    VisionTransformer.model_type: (VisionTransformer, ViTConfig),
    TextToImageModel.model_type: (TextToImageModel, TextToImageConfig),
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


class ModelFileError(ValueError):
    """A file of a model directory that cannot be used as it is; the message names the file."""


def tensor_sha256(t: torch.Tensor) -> str:
    """The SHA-256 hex digest of a tensor's bytes (in memory order, on CPU)."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{name: tensor_sha256(t)}`` of the tensors a file will hold."""
    return {name: tensor_sha256(t) for name, t in tensors.items()}


def digest_mismatches(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list[str]:
    """The names of ``tensors`` whose SHA-256 differs from (or is missing in) ``metadata["sha256"]``; ``[]``
    when the file recorded no digests (written before qkv recorded them).

    Raises:
        ValueError: ``metadata["sha256"]`` is there but is not a JSON object.
    """
    if DIGESTS_KEY not in metadata:
        return []
    try:
        recorded = json.loads(metadata[DIGESTS_KEY])
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"metadata {DIGESTS_KEY!r} is not a JSON object of tensor digests")
    bad = [name for name, t in tensors.items() if recorded.get(name) != tensor_sha256(t)]
    return bad + [name for name in recorded if name not in tensors]


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with the permissions ``open`` gives (0666 less the umask), unlike
    ``safetensors.torch.save_file``, which creates 0600 files."""
    with open(path, "wb") as f:
        f.write(data)


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
    metadata = {"format": "pt", "model_type": model_type, DIGESTS_KEY: json.dumps(tensor_digests(tensors))}
    _write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata=metadata))
    model_config: Any = model.config  # every model save_model takes has a config dataclass
    config = {"model_type": model_type, **model_config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _check_file(path: Path, max_bytes: int) -> None:
    """``path`` exists and is a regular file of at most ``max_bytes`` (see :mod:`qkv.safe_files`)."""
    try:
        check_regular_file(path, max_bytes)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} does not exist; a checkpoint directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        ) from None
    except ValueError as e:
        raise ModelFileError(str(e)) from None


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, a regular file of at most :data:`MAX_CONFIG_BYTES`."""
    try:
        config = read_json_file(path, MAX_CONFIG_BYTES)
    except ValueError as e:  # also UnicodeDecodeError and JSONDecodeError
        raise ModelFileError(f"{path} is not a JSON model config: {e}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path} must be a JSON object with a 'model_type' key")
    return config


def _read_config(path: Path) -> dict[str, Any]:
    config = _read_json_object(path)
    if "model_type" not in config:
        raise ModelFileError(f"{path} must be a JSON object with a 'model_type' key")
    return config


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes the safetensors header of ``path`` declares (read without loading a tensor)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 (no __iter__)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ModelFileError(f"{path} is not a readable safetensors file: {e}") from None


class _SkipInPlaceOnMeta(TorchFunctionMode):
    """Makes in-place tensor methods (``normal_``, ``zero_``...) on meta tensors no-ops: initialisers only set
    values, which a meta tensor has none of, and torch runs some of them on meta through its Python
    reference implementations, whose first use imports sympy and dynamo (more than a second)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            target = args[0] if args else next(iter(kwargs.values()), None)  # nn.init passes tensor=...
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def stored_model_type(directory: str | os.PathLike[str]) -> str | None:
    """The ``model_type`` that ``directory/config.json`` records, read without loading anything else;
    ``None`` when there is no ``config.json`` or it has no ``model_type`` (a Hugging Face config may not).

    Raises:
        ModelFileError: ``config.json`` is not a regular file of bounded size holding a JSON object.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        return None
    kind = _read_json_object(path).get("model_type")
    return kind if isinstance(kind, str) else None


def _check_against_header(cls: type[nn.Module], config: Any, config_path: Path, weights_path: Path) -> None:
    """Compare the tensors the config describes with those the weight file declares, before allocating the
    model: a config that does not fit its weights (say ``d_model`` 1,048,576) never reaches an allocation."""
    stored = _stored_shapes(weights_path)
    # Each layer has at least one tensor, so a layer count above the file's tensors cannot be right; checked
    # first, it keeps a config asking for 10**9 layers from taking forever to build even on "meta".
    for name, value in config.to_dict().items():
        if "layers" in name and isinstance(value, int) and value > len(stored):
            raise ModelFileError(
                f"{config_path}: {name} is {value} but {weights_path} holds only {len(stored)} tensors; "
                "the config and the weights do not belong together"
            )
    with torch.device("meta"), _SkipInPlaceOnMeta():  # shapes only: no memory is allocated
        skeleton = cls(config)
    for fused, separate in separate_projection_keys(skeleton, stored).items():  # files from before in_proj
        shapes = [stored.pop(n) for n in separate]
        stored[fused] = (sum(s[0] for s in shapes), *shapes[0][1:])
    first_of: dict[int, str] = {}
    expected: dict[str, tuple[int, ...]] = {}
    for key, t in skeleton.state_dict(keep_vars=True).items():
        if first_of.setdefault(id(t), key) == key:  # a tied weight is one object; stored under its first key
            expected[key] = tuple(t.shape)
    _check_compatible(stored, expected, weights_path)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, their recorded SHA-256 digests checked (when the file has them)."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ModelFileError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        bad = digest_mismatches(tensors, metadata)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    if bad:
        raise ModelFileError(
            f"{path} is damaged: the SHA-256 of {_some(bad, ', ', 3)} differs from the one recorded when it was written"
        )
    return tensors


def load_model(directory: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model ``directory/config.json`` describes and load ``directory/model.safetensors``.

    The model gets the checkpoint's floating-point dtype, is moved to ``device`` and returned in eval mode.

    Raises:
        FileNotFoundError: a file is missing.
        ModelFileError: (a ``ValueError``) a file that is not a regular file, is not JSON or safetensors,
            is damaged (a tensor's SHA-256 differs from the recorded one), or a config describing more
            parameters than the weights hold.
        ValueError: unknown ``model_type``, an invalid config, or weights that do not fit the model (the
            message names the missing and unexpected keys and the shape mismatches).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    _check_file(config_path, MAX_CONFIG_BYTES)
    _check_file(weights_path, MAX_WEIGHTS_BYTES)
    config = _read_config(config_path)
    model_type = config.pop("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{config_path}: unknown model_type {model_type!r}; known: {', '.join(map(repr, MODEL_TYPES))}"
        )
    cls, config_cls = MODEL_TYPES[model_type]
    model_config = config_cls.from_dict(config)
    _check_against_header(cls, model_config, config_path, weights_path)
    tensors = _load_weights(weights_path)
    model = cls(model_config)
    tensors = stack_separate_projections(model, tensors)
    expected = model.state_dict()
    aliases = tied_keys(expected)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    full = dict(tensors)
    for alias, first in aliases.items():
        full[alias] = tensors[first]
    model.load_state_dict(full, strict=True)
    return model.to(device).eval()


def _check_compatible(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], path: Path
) -> None:
    """Raise :class:`ModelFileError` naming the missing, unexpected and mis-shaped tensors of ``path``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: checkpoint {found[k]}, model {shape}"
        for k, shape in expected.items()
        if k in found and found[k] != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing, ', ')}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected, ', ')}")
    if mismatched:
        problems.append(f"shape mismatches: {_some(mismatched, '; ')}")
    if problems:
        raise ModelFileError(f"{path} does not fit the model its config describes: " + "; ".join(problems))


def _some(items: list[str], sep: str, limit: int = 12) -> str:
    """The first ``limit`` items joined, and how many there are in all when that is more."""
    shown = sep.join(items[:limit])
    return shown if len(items) <= limit else f"{shown}{sep}... ({len(items)} in all)"
