"""Training checkpoints: one safetensors file each, written atomically, read without unpickling.

A checkpoint is a single ``.safetensors`` file, so it is complete or absent, never half written::

    tensors   model/<state-dict key>          the model (tied weights stored once, see ``model_aliases``)
              optimizer/<param index>/<name>  optimizer state tensors (AdamW: step, exp_avg, exp_avg_sq)
              rng/<name>                      RNG states: rng/rank<r>/torch, rng/rank<r>/cuda, rng/numpy
    metadata  format, version                 "qkv-train-checkpoint", "1"
              sha256                          JSON: {tensor name: SHA-256 hex digest}, checked on load
              state                           JSON: step, best score, batcher position, schedule, scaler,
                                              python/numpy RNG scalars... (whatever the trainer stores)
              optimizer                       JSON: param_groups and non-tensor optimizer state
              model_aliases                   JSON: {alias: first} for tied weights

Writing (:func:`atomic_write`): the bytes go to a temporary file in the same directory
(``.<name>.tmp-<pid>``), which is flushed and ``fsync``-ed, then ``os.replace``-d onto the final name (atomic
on POSIX and Windows), and the directory is ``fsync``-ed so the rename itself survives a power cut. A crash
at any point leaves the previous file intact; a stale temporary file is removed by
:func:`clean_temp_files` when training resumes.

Reading checks every tensor against its recorded SHA-256, so a file damaged after it was written (flipped
bytes) is an error naming it rather than a run that silently diverges; files written before digests were
recorded load unchecked. Reading uses ``safetensors`` and ``json`` only: no ``torch.load``, no ``pickle``,
so a checkpoint from elsewhere cannot run code.

The checkpoint directory holds ``step_<8 digits>.safetensors`` (the last ``keep_last`` kept),
``best.safetensors`` (model and scores only) and ``averaged.safetensors`` (the element-wise mean of the
models of the last ``k`` step checkpoints).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from qkv.models.checkpoint import DIGESTS_KEY, digest_mismatches, tensor_digests, tied_keys
from qkv.safe_files import check_regular_file

FORMAT = "qkv-train-checkpoint"
VERSION = "1"
STEP_FILE = "step_{step:08d}.safetensors"
STEP_RE = re.compile(r"step_(\d{8,})\.safetensors")
BEST_FILE = "best.safetensors"
AVERAGED_FILE = "averaged.safetensors"
TEMP_MARK = ".tmp-"
# Checkpoints are memory-mapped, not read; the limit only stops absurd files (device files, sparse files).
MAX_CHECKPOINT_BYTES = 1 << 40


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the full model state dict (tied aliases restored), CPU tensors.
        optimizer: a ``torch.optim.Optimizer.state_dict()``-shaped dict, or ``None`` (best/averaged files).
        state: the JSON scalars the trainer stored.
        rng: RNG state tensors by name (``rank0/torch``, ``numpy``...).
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows; rename is durable there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary file :func:`atomic_write` writes before renaming it to ``path``."""
    return path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}"


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``, directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _jsonable(value: Any) -> Any:
    """Tuples as lists, recursively (JSON has only lists); anything else JSON cannot hold is an error."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's JSON: {value!r}")


def checkpoint_bytes(
    model_state: Mapping[str, torch.Tensor],
    *,
    optimizer_state: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    rng: Mapping[str, torch.Tensor] | None = None,
) -> bytes:
    """The safetensors bytes of a checkpoint (see the module docstring for the layout)."""
    aliases = tied_keys(dict(model_state))
    tensors = {f"model/{k}": t.detach().cpu().contiguous() for k, t in model_state.items() if k not in aliases}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "state": json.dumps(_jsonable(dict(state or {}))),
        "model_aliases": json.dumps(aliases),
    }
    if optimizer_state is not None:
        scalars: dict[str, dict[str, Any]] = {}
        for index, entries in optimizer_state["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = _jsonable(value)
        metadata["optimizer"] = json.dumps(
            {"param_groups": _jsonable(optimizer_state["param_groups"]), "scalars": scalars}
        )
    for name, t in (rng or {}).items():
        tensors[f"rng/{name}"] = t.detach().cpu().contiguous()
    metadata[DIGESTS_KEY] = json.dumps(tensor_digests(tensors))
    return safetensors_bytes(tensors, metadata=metadata)


def save_checkpoint(
    path: str | os.PathLike,
    model_state: Mapping[str, torch.Tensor],
    *,
    optimizer_state: Mapping[str, Any] | None = None,
    state: Mapping[str, Any] | None = None,
    rng: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint file atomically; returns its path."""
    data = checkpoint_bytes(model_state, optimizer_state=optimizer_state, state=state, rng=rng)
    return atomic_write(path, data)


def _json_field(metadata: dict[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: metadata {key!r} is missing or not JSON ({e})") from None


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors + JSON; never unpickles)."""
    path = Path(path)
    try:
        check_regular_file(path, MAX_CHECKPOINT_BYTES)
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a qkv training checkpoint (format {metadata.get('format')!r})")
    if metadata.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {metadata.get('version')!r}; this qkv reads {VERSION}")
    try:
        damaged = digest_mismatches(tensors, metadata)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if damaged:
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise CheckpointError(
            f"{path} is damaged: the SHA-256 of {shown} differs from the one recorded when it was written"
        )
    model = {k.removeprefix("model/"): t for k, t in tensors.items() if k.startswith("model/")}
    for alias, first in _json_field(metadata, "model_aliases", path).items():
        model[alias] = model[first]
    optimizer = None
    if "optimizer" in metadata:
        meta = _json_field(metadata, "optimizer", path)
        per_param: dict[int, dict[str, Any]] = {}
        for key, t in tensors.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                per_param.setdefault(int(index), {})[name] = t
        for index, entries in meta["scalars"].items():
            per_param.setdefault(int(index), {}).update(entries)
        groups = meta["param_groups"]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        optimizer = {"state": dict(sorted(per_param.items())), "param_groups": groups}
    rng = {k.removeprefix("rng/"): t for k, t in tensors.items() if k.startswith("rng/")}
    return Checkpoint(model=model, optimizer=optimizer, state=_json_field(metadata, "state", path), rng=rng)


def capture_rng(rank: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process' RNG states: tensors (torch CPU and current CUDA device as ``rank<r>/...``, numpy's key)
    and JSON scalars (Python's state, the rest of numpy's)."""
    tensors = {f"rank{rank}/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors[f"rank{rank}/cuda"] = torch.cuda.get_rng_state()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy"] = torch.from_numpy(np.asarray(keys).astype(np.int64))
    version, internal, gauss_next = random.getstate()
    scalars = {"python": [version, list(internal), gauss_next], "numpy": [name, int(pos), int(has_gauss), cached]}
    return tensors, scalars


def restore_rng(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], rank: int = 0) -> bool:
    """Restore what :func:`capture_rng` captured; ``False`` when this rank's torch state is not there (a
    different world size), in which case the torch generator is left as it is."""
    if "python" in scalars:
        version, internal, gauss_next = scalars["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "numpy" in scalars and "numpy" in tensors:
        name, pos, has_gauss, cached = scalars["numpy"]
        np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    key = f"rank{rank}/torch"
    if key not in tensors:
        return False
    torch.set_rng_state(tensors[key].to(torch.uint8))
    cuda_key = f"rank{rank}/cuda"
    if cuda_key in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[cuda_key].to(torch.uint8))
    return True


def step_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the step checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_RE.fullmatch(p.name))]
    return sorted(found)


@dataclass
class Resumable:
    """What :func:`find_resumable` found: the newest readable step checkpoint (``None`` when there is none)
    and the newer step checkpoints it skipped, each with the reason it could not be read."""

    path: Path | None
    checkpoint: Checkpoint | None
    skipped: list[tuple[Path, str]]


def find_resumable(directory: str | os.PathLike) -> Resumable:
    """The newest step checkpoint of ``directory`` that reads correctly, and the newer ones that did not."""
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(step_checkpoints(directory)):
        try:
            return Resumable(path, load_checkpoint(path), skipped)
        except CheckpointError as e:  # atomic writes leave none; a file damaged afterwards, or a foreign one
            skipped.append((path, str(e)))
    return Resumable(None, None, skipped)


def latest_checkpoint(directory: str | os.PathLike) -> tuple[Path, Checkpoint] | None:
    """The newest step checkpoint that reads correctly, loaded; ``None`` if there is none (see
    :func:`find_resumable` for the ones skipped)."""
    found = find_resumable(directory)
    return None if found.path is None or found.checkpoint is None else (found.path, found.checkpoint)


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints; returns the deleted paths."""
    doomed = [path for _, path in step_checkpoints(directory)[:-keep]] if keep > 0 else []
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def clean_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files left by writes that never finished (a killed run); returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.name.startswith(".") and TEMP_MARK in p.name]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def average_checkpoints(paths: Sequence[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the models of ``paths`` (accumulated in float64, returned in each tensor's
    dtype); non-floating tensors (counters, masks) are taken from the last checkpoint."""
    if not paths:
        raise ValueError("average_checkpoints needs at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    for i, path in enumerate(paths):
        model = load_checkpoint(path).model
        if i and set(model) != set(last):
            raise CheckpointError(
                f"{path} holds other parameters than {paths[0]}: "
                f"{sorted(set(model) ^ set(last))[:5]}; only checkpoints of one model can be averaged"
            )
        for key, t in model.items():
            if i and t.shape != last[key].shape:
                raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)} but {tuple(last[key].shape)} before")
            if t.is_floating_point():
                total[key] = total[key] + t.double() if i else t.double()
        last = model
    aliases = tied_keys(last)
    mean = {
        key: (total[key] / len(paths)).to(t.dtype) if key in total else t
        for key, t in last.items()
        if key not in aliases
    }
    for alias, first in aliases.items():
        mean[alias] = mean[first]  # tied weights stay one tensor
    return mean
