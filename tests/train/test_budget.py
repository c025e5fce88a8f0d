"""The training budget: max_steps, max_epochs and max_time, whichever comes first, each ending like a finished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkv.train import checkpoint_io as ckpt
from qkv.train.budget import Budget, format_duration, parse_duration
from qkv.train.config import Config
from qkv.train.ddp import DistContext
from qkv.train.trainer import TrainResult, train


def run(config: dict, resume: bool = False) -> TrainResult:
    return train(Config.from_dict(config), resume=resume, ctx=DistContext(), echo=lambda line: None)


def validated_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_ended_like_a_finished_run(out: Path, step: int) -> None:
    """A last validation, a checkpoint and the export, all at ``step``."""
    assert validated_steps(out)[-1] == step
    assert ckpt.step_checkpoints(out / "checkpoints")[-1][0] == step
    assert (out / "model.safetensors").is_file()
    assert f"wrote the last ({step}) model" in (out / "train.log").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("value", "seconds"), [(90, 90.0), (0.5, 0.5), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1h30m", 5400.0)]
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["ten minutes", "-5m", "5", "5x", "", 0, -1, True, float("inf"), None, [1]])
def test_bad_durations_say_what_is_accepted(value):
    with pytest.raises(ValueError, match=r'must be seconds \(a number > 0\) or a string such as "90s", "30m"'):
        parse_duration(value)


def test_the_first_budget_reached_ends_the_run():
    budget = Budget(max_steps=100, max_epochs=2.0, max_time=60.0)
    assert budget.reached(99, 1.9, 59.0) is None
    assert budget.reached(100, 0.5, 1.0) == "max_steps"
    assert budget.reached(10, 2.0, 1.0) == "max_epochs"
    assert budget.reached(10, 0.5, 60.0) == "max_time"
    assert format_duration(5400.0) == "1h30m" and Budget(max_epochs=3, max_time=90).describe() == "3 epochs or 1m30s"


def test_max_epochs_ends_after_one_pass_over_the_data(tmp_path, make_config):
    out = tmp_path / "run"
    config = make_config(
        out,
        data={"size": 100},
        training={"max_steps": None, "max_epochs": 1, "valid_every": 100},
        output={"checkpoint_every": 100},
    )
    result = run(config)
    assert result.ended_by == "max_epochs"
    state = ckpt.load_checkpoint(ckpt.step_checkpoints(out / "checkpoints")[-1][1]).state
    # Every batch of the first epoch, and not one more.
    assert state["epoch"] == 1.0 and state["batches"]["epoch"] == 0 and state["batches"]["batch"] == result.step
    assert_ended_like_a_finished_run(out, result.step)
    assert "training.max_epochs reached at step" in (out / "train.log").read_text(encoding="utf-8")


def test_max_steps_still_ends_the_run_when_it_comes_first(tmp_path, make_config):
    config = make_config(tmp_path / "run", training={"max_steps": 3, "max_epochs": 1, "max_time": "1h"})
    result = run(config)
    assert (result.step, result.ended_by) == (3, "max_steps")


def test_max_time_ends_the_run_and_counts_across_a_resume(tmp_path, make_config):
    out = tmp_path / "run"
    config = make_config(out, training={"max_steps": None, "max_time": 0.5, "valid_every": 1000})
    result = run(config)
    assert result.ended_by == "max_time" and 1 <= result.step < 1000
    assert_ended_like_a_finished_run(out, result.step)
    state = ckpt.load_checkpoint(ckpt.step_checkpoints(out / "checkpoints")[-1][1]).state
    assert state["train_seconds"] >= 0.5
    # The saved training time already spends the budget: a resumed run trains no further.
    again = run(config, resume=True)
    assert (again.step, again.ended_by) == (result.step, "max_time")
