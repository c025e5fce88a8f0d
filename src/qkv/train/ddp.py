"""Data-parallel training over several processes, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m qkv train CONFIG.yaml`` starts ``N`` copies of ``qkv train``; each reads
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from its environment
(:func:`init_distributed`) and joins one process group: ``gloo`` on CPU, ``nccl`` on GPUs (one GPU per
process, ``cuda:LOCAL_RANK``).

Every process builds the same model (same seed; DistributedDataParallel also broadcasts rank 0's
parameters) and the same :class:`~qkv.data.TokenBatcher` plan, and takes a disjoint shard of each batch:
rows ``rank, rank + N, rank + 2N, ...`` (:func:`shard_rows`). Each rank's loss is its summed token loss
times ``N`` divided by the tokens of the whole batch, so the gradient DDP averages is the gradient of the
whole batch's mean token loss: the same update one process computes, up to the order of float sums. Only
rank 0 validates, logs and writes checkpoints; it tells the others whether to stop (:func:`broadcast_flag`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {value!r}") from None


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if preference == "cuda" and not torch.cuda.is_available():
        from qkv.train.config import ConfigError

        raise ConfigError("training.device is cuda but torch sees no CUDA device; use auto or cpu")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistContext:
    """A :class:`DistContext` from torchrun's environment, joining the process group when ``WORLD_SIZE > 1``.

    Without those variables (a plain ``qkv train``) this is a single process and nothing is initialised.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = pick_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (if this process joined one)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` when distributed, else as it is."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or ``model`` itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def no_sync(model: nn.Module, sync: bool):
    """DDP's ``no_sync()`` (skip the gradient all-reduce of an accumulation micro-batch) unless ``sync``."""
    if sync or not hasattr(model, "no_sync"):
        return nullcontext()
    wrapped: Any = model  # a DistributedDataParallel, which has no_sync
    return wrapped.no_sync()


def shard_rows(indices: Sequence[int], ctx: DistContext) -> list[int]:
    """This rank's rows of a batch: every ``world_size``-th row from ``rank`` (disjoint, together all rows)."""
    return list(indices)[ctx.rank :: ctx.world_size]


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if ctx.distributed:
        dist.barrier()


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every rank."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.long, device=ctx.device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_tensors(t: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """``t`` of every rank (same shape and dtype on all), on CPU, in rank order."""
    if not ctx.distributed:
        return [t.cpu()]
    local = t.to(ctx.device)
    out = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(out, local)
    return [x.cpu() for x in out]


@contextmanager
def distributed_session(device_preference: str = "auto") -> Iterator[DistContext]:
    """:func:`init_distributed`, and :func:`shutdown` at the end (how :func:`qkv.train.trainer.train` runs
    when it is not handed a :class:`DistContext`)."""
    ctx = init_distributed(device_preference)
    try:
        yield ctx
    finally:
        shutdown(ctx)
