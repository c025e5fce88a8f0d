"""Step checkpoints written by older qkv, brought to the model of today before ``--resume`` loads them.

One change so far: :class:`qkv.nn.MultiHeadAttention` stacks its query, key and value projections in one
``in_proj`` (rows ``[q; k; v]``) where it kept ``q_proj``, ``k_proj`` and ``v_proj`` apart. A checkpoint from
before holds the three (weights and biases) and an AdamW state per tensor, indexed by the old parameter order
(``q.weight, q.bias, k.weight, k.bias, v.weight, v.bias``). :func:`upgrade_checkpoint` stacks the weights and
the optimizer's per-tensor state (``exp_avg``, ``exp_avg_sq``) the same way and renumbers the rest, so the
resumed run continues exactly where the old one stopped (``tests/train/test_regression.py`` resumes a
checkpoint written by the old code to its old losses).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from qkv.nn.multi_head import separate_projection_keys, stack_separate_projections
from qkv.train.checkpoint_io import Checkpoint, CheckpointError


def upgrade_checkpoint(model: nn.Module, saved: Checkpoint) -> Checkpoint:
    """``saved`` with the separate q/k/v projections of ``model``'s fused attention modules stacked, in the
    model state and in the optimizer state; ``saved`` itself when it needs nothing.

    Raises:
        CheckpointError: an optimizer state that does not fit the old parameter order (more than one parameter
            group, or another count of parameters).
    """
    groups = separate_projection_keys(model, saved.model)
    if not groups:
        return saved
    state = stack_separate_projections(model, saved.model)
    optimizer = None if saved.optimizer is None else _stack_optimizer_state(model, saved.optimizer, groups)
    return replace(saved, model=state, optimizer=optimizer)


def _old_parameter_order(model: nn.Module, groups: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """``(old names, new names)`` of ``model``'s parameters in ``parameters()`` order, before and after fusing."""
    new = [name for name, _ in model.named_parameters()]
    old: list[str] = []
    for name in new:
        if name not in groups:
            old.append(name)
        elif name.endswith(".weight"):  # the old module held q, k, v one after the other, each weight then bias
            bias = groups.get(name.removesuffix("weight") + "bias", [None, None, None])
            old += [n for pair in zip(groups[name], bias, strict=True) for n in pair if n is not None]
    return old, new


def _stack_optimizer_state(model: nn.Module, optimizer: dict[str, Any], groups: dict[str, list[str]]) -> dict[str, Any]:
    old, new = _old_parameter_order(model, groups)
    param_groups = optimizer["param_groups"]
    if len(param_groups) != 1 or len(param_groups[0]["params"]) != len(old):
        found = [len(g["params"]) for g in param_groups]
        raise CheckpointError(
            f"the optimizer state holds parameter groups of {found} tensors; a checkpoint from before the fused "
            f"q/k/v projections of this model would hold one group of {len(old)}"
        )
    index = {name: param_groups[0]["params"][i] for i, name in enumerate(old)}
    per_param = optimizer["state"]
    stacked: dict[int, dict[str, Any]] = {}
    for j, name in enumerate(new):
        parts = [per_param.get(index[n]) for n in groups.get(name, [name])]
        if any(p is None for p in parts):
            continue  # a parameter the optimizer has not stepped yet
        first = parts[0]
        assert first is not None
        stacked[j] = {
            key: torch.cat([p[key] for p in parts]) if isinstance(value, torch.Tensor) and value.ndim else value  # type: ignore[index]
            for key, value in first.items()
        }
    return {"state": stacked, "param_groups": [{**param_groups[0], "params": list(range(len(new)))}]}
