"""Learning-rate schedules: linear warmup, then inverse square root, cosine or constant.

The learning rate of optimizer update ``s`` (1-based) with peak ``lr`` and ``w = warmup_steps``::

    warmup        s <= w:  lr · s / w
    inverse_sqrt  s > w:   lr · sqrt(max(w, 1) / s)             (Vaswani et al. 2017, fairseq's form)
    cosine        s > w:   min_lr + (lr - min_lr) · (1 + cos(π · p)) / 2,   p = min(1, (s - w) / (max_steps - w))
    constant      s > w:   lr

so every schedule peaks at ``lr`` after the warmup. The state is the number of updates done, so a resumed
run continues the curve exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCHEDULE_KINDS = ("inverse_sqrt", "cosine", "constant")


class WarmupSchedule:
    """Sets the optimizer's learning rate before each update (call :meth:`step` once per update).

    Args:
        optimizer: its param groups all get the same learning rate.
        kind: ``"inverse_sqrt"``, ``"cosine"`` or ``"constant"`` (see the module docstring).
        lr: the peak learning rate.
        warmup_steps: updates of linear warmup (0: none).
        max_steps: the last update (the end of the cosine).
        min_lr: the cosine's floor.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        kind: str,
        *,
        lr: float,
        warmup_steps: int,
        max_steps: int,
        min_lr: float = 0.0,
    ) -> None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {', '.join(SCHEDULE_KINDS)}; got {kind!r}")
        if not lr > 0 or warmup_steps < 0 or max_steps < 1 or not 0 <= min_lr <= lr:
            raise ValueError(
                f"need lr > 0, warmup_steps >= 0, max_steps >= 1 and 0 <= min_lr <= lr; got lr={lr}, "
                f"warmup_steps={warmup_steps}, max_steps={max_steps}, min_lr={min_lr}"
            )
        self.optimizer = optimizer
        self.kind, self.lr, self.warmup_steps, self.max_steps, self.min_lr = kind, lr, warmup_steps, max_steps, min_lr
        self.updates = 0

    def lr_at(self, step: int) -> float:
        """The learning rate of update ``step`` (1-based)."""
        if step < 1:
            raise ValueError(f"step counts updates from 1; got {step}")
        w = self.warmup_steps
        if step <= w:
            return self.lr * step / w
        if self.kind == "inverse_sqrt":
            return self.lr * math.sqrt(max(w, 1) / step)
        if self.kind == "cosine":
            progress = min(1.0, (step - w) / max(1, self.max_steps - w))
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr

    def step(self) -> float:
        """Set the learning rate of the next update; returns it."""
        self.updates += 1
        lr = self.lr_at(self.updates)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the updates done and the curve's parameters."""
        return {
            "kind": self.kind,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "max_steps": self.max_steps,
            "min_lr": self.min_lr,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["updates"]`` updates; the curve itself stays as configured (so a resumed run
        may, e.g., extend ``max_steps``)."""
        self.updates = int(state["updates"])
