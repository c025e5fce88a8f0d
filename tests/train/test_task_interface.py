"""The trainer knows only the Task interface: a regression task defined here trains, validates, early-stops,
checkpoints, resumes exactly and exports, and importing the trainer imports no translation code."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qkv.checks import StrictConfig, boolean, int_at_least, option
from qkv.train import checkpoint_io as ckpt
from qkv.train import tasks
from qkv.train.config import Config
from qkv.train.ddp import DistContext
from qkv.train.errors import TrainError
from qkv.train.task import BatchLoss, Task, Validation
from qkv.train.trainer import TrainResult, train

ROWS, FEATURES, TARGETS = 64, 4, 2
WEIGHTS_FILE = "regression.safetensors"


@dataclass
class RegressionData(StrictConfig):
    rows: int = option(ROWS, int_at_least, 8)
    batch_rows: int = option(8, int_at_least, 1)


@dataclass
class RegressionModel(StrictConfig):
    dropout: bool = option(True, boolean)


class RowBatches:
    """Batches of row indices, in order, round and round; the state is how many batches were drawn."""

    def __init__(self, rows: int, batch_rows: int) -> None:
        self.rows, self.batch_rows, self.drawn = rows, batch_rows, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            start = self.drawn * self.batch_rows % self.rows
            self.drawn += 1
            yield torch.arange(start, start + self.batch_rows) % self.rows

    @property
    def epoch(self) -> float:
        return self.drawn * self.batch_rows / self.rows

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "drawn" not in state:
            raise ValueError(f"the saved position has no 'drawn'; got keys {sorted(state)}")
        self.drawn = int(state["drawn"])


class RegressionTask(Task):
    """Learn ``y = x W`` from a few random rows: the squared error summed over rows is the loss."""

    name = "regression"
    data_config = RegressionData
    model_config = RegressionModel
    metrics = ("loss", "never_better")
    lower_is_better = frozenset({"loss"})

    def prepare(self, *, resume: bool) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(self.config.data.rows, FEATURES, generator=generator)
        self.y = self.x @ torch.randn(FEATURES, TARGETS, generator=generator)

    def build_model(self) -> nn.Module:
        dropout = 0.1 if self.config.model.dropout else 0.0
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.Dropout(dropout), nn.Linear(16, TARGETS))

    def train_batches(self) -> RowBatches:
        return RowBatches(self.config.data.rows, self.config.data.batch_rows)

    def batch_tokens(self, batch: torch.Tensor) -> int:
        return len(batch)

    def shard(self, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        return batch, 1.0

    def loss(self, model: nn.Module, batch: torch.Tensor, device: torch.device) -> BatchLoss:
        error = ((model(self.x[batch].to(device)) - self.y[batch].to(device)) ** 2).sum()
        return BatchLoss(loss=error, nll=float(error.detach()), tokens=len(batch))

    def validate(self, model: nn.Module, device: torch.device, step: int) -> Validation:
        assert not model.training and not torch.is_grad_enabled()
        mse = float(((model(self.x) - self.y) ** 2).sum(-1).mean())
        return Validation(metrics={"loss": mse, "never_better": 0.0}, lines=[f"  mse {mse:.5f}"], extra={"rows": 64})

    def score_test(self, model: nn.Module, device: torch.device) -> Validation:
        return Validation(metrics={"loss": float(((model(self.x) - self.y) ** 2).sum(-1).mean())})

    def save_model(self, model: nn.Module, directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tasks.TASKS, "regression", f"{__name__}:RegressionTask")


def config(out: Path, **training: Any) -> dict[str, Any]:
    return {
        "task": "regression",
        "model": {"dropout": True},
        "training": {"max_steps": 12, "lr": 1e-2, "warmup_steps": 2, "valid_every": 4, **training},
        "output": {"dir": str(out), "checkpoint_every": 4, "keep_last": 5, "export": "last", "progress_bar": False},
    }


def run(data: dict[str, Any], resume: bool = False) -> TrainResult:
    return train(Config.from_dict(data), resume=resume, ctx=DistContext(), echo=lambda line: None)


def test_a_task_the_trainer_never_saw_trains_validates_and_exports(tmp_path):
    out = tmp_path / "run"
    result = run(config(out, max_steps=40, valid_every=20))
    assert (result.step, result.ended_by, result.best_metric) == (40, "max_steps", "loss")  # the task's first metric
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[:2]] == [20, 40] and records[1]["loss"] < records[0]["loss"]
    assert records[0]["rows"] == 64 and records[-1] == {"split": "test", "loss": result.test_scores["loss"]}
    assert "  mse " in (out / "train.log").read_text(encoding="utf-8")
    exported = load_file(str(out / WEIGHTS_FILE))
    last = ckpt.load_checkpoint(ckpt.step_checkpoints(out / "checkpoints")[-1][1])
    assert exported.keys() == last.model.keys() and all(torch.equal(exported[k], last.model[k]) for k in exported)
    assert last.state["task"] == "regression" and last.state["batches"] == {"drawn": 40}


def test_early_stopping_on_a_task_metric(tmp_path):
    # never_better is higher-is-better and always 0: the second validation does not improve on the first.
    result = run(config(tmp_path / "run", early_stopping_metric="never_better", patience=1))
    assert (result.step, result.stopped_early, result.ended_by, result.best_step) == (8, True, "early_stopping", 4)


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    run(config(straight))
    interrupted = tmp_path / "interrupted"
    run(config(interrupted, max_steps=6))
    resumed = run(config(interrupted), resume=True)
    assert resumed.step == 12 and resumed.resumed_from == interrupted / "checkpoints" / "step_00000006.safetensors"
    # Same batches, same dropout draws, same optimizer state: the same weights.
    a = ckpt.load_checkpoint(straight / "checkpoints" / "step_00000012.safetensors")
    b = ckpt.load_checkpoint(interrupted / "checkpoints" / "step_00000012.safetensors")
    for key, t in a.model.items():
        torch.testing.assert_close(b.model[key], t, rtol=0, atol=0, msg=key)


def test_a_bad_saved_position_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    run(config(out, max_steps=4))
    path = ckpt.step_checkpoints(out / "checkpoints")[-1][1]
    saved = ckpt.load_checkpoint(path)
    state = {**saved.state, "batches": {"position": 3}}
    ckpt.save_checkpoint(path, saved.model, optimizer_state=saved.optimizer, state=state, rng=saved.rng)
    with pytest.raises(TrainError, match=r"cannot resume from .*step_00000004\.safetensors: the saved position has no"):
        run(config(out, max_steps=8), resume=True)


def test_the_trainer_imports_no_translation_code():
    code = (
        "import sys, qkv.train.trainer\n"
        "found = [m for m in ('qkv.train.tasks.translation', 'qkv.train.tasks.translation_config',"
        " 'qkv.train.translate', 'qkv.train.loss', 'qkv.train.evaluate') if m in sys.modules]\n"
        "print(found)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
