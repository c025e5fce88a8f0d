"""The task-generic trainer trains translation exactly as the trainer before it did, and resumes its checkpoints.

``golden/translation_curve.json`` holds the per-step training loss, gradient norm and learning rate, and the
validation scores, that ``qkv train`` recorded for its ``config`` at commit 7aaf486, before the trainer was
split into a generic loop and a translation task. ``golden/old_checkpoint/`` is a run of that code stopped
at step 4 (its checkpoint, tokenizer and train_config.yaml) with the losses its uninterrupted run had.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from qkv.train import checkpoint_io as ckpt
from qkv.train.config import Config
from qkv.train.ddp import DistContext
from qkv.train.errors import TrainError
from qkv.train.trainer import Trainer, TrainResult, train

GOLDEN = Path(__file__).parent / "golden"


def train_recording(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, *, resume: bool = False):
    """Train ``config``; returns the result and ``(step, loss per token, tokens, grad norm, lr)`` of each update."""
    steps: list[tuple[int, float, int, float | None, float]] = []
    real_update = Trainer._update

    def update(self: Trainer, batches: list[Any]):
        done = real_update(self, batches)
        steps.append((self.step + 1, done.loss / done.tokens, done.tokens, done.grad_norm, self._lr()))
        return done

    monkeypatch.setattr(Trainer, "_update", update)
    result: TrainResult = train(Config.from_dict(config), resume=resume, ctx=DistContext(), echo=lambda line: None)
    return result, steps


def test_the_translation_loss_curve_is_the_one_of_the_trainer_before_tasks(tmp_path, monkeypatch):
    golden = json.loads((GOLDEN / "translation_curve.json").read_text(encoding="utf-8"))
    config = copy.deepcopy(golden["config"])
    config["output"]["dir"] = str(tmp_path / "run")
    result, steps = train_recording(config, monkeypatch)
    assert result.step == 40 and len(steps) == len(golden["train"]) == 40
    for (step, loss, tokens, grad_norm, lr), want in zip(steps, golden["train"], strict=True):
        assert step == want["step"] and tokens == want["tokens"], step  # exactly the same batches
        assert loss == pytest.approx(want["loss"], rel=1e-6), step
        assert grad_norm == pytest.approx(want["grad_norm"], rel=1e-5), step
        assert lr == pytest.approx(want["lr"], rel=1e-12), step
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [v["step"] for v in golden["valid"]]
    for record, want in zip(records, golden["valid"], strict=True):
        assert record["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert record["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
        for name in ("bleu", "chrf", "exact_match", "sentences"):
            assert record[name] == want[name], name


def old_run(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of the run the old trainer stopped at step 4, and its config writing there."""
    expected = json.loads((GOLDEN / "old_checkpoint" / "expected.json").read_text(encoding="utf-8"))
    shutil.copytree(GOLDEN / "old_checkpoint", tmp_path / "run", ignore=shutil.ignore_patterns("expected.json"))
    config = copy.deepcopy(expected["config"])
    config["output"]["dir"] = str(tmp_path / "run")
    return config, expected


def test_a_checkpoint_of_the_trainer_before_tasks_resumes_to_the_same_losses(tmp_path, monkeypatch):
    config, expected = old_run(tmp_path)
    assert "task" not in ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.safetensors").state
    result, steps = train_recording(config, monkeypatch, resume=True)
    assert result.resumed_from is not None and result.step == 8
    want = [(s["step"], s["loss"], s["tokens"]) for s in expected["train"][4:]]
    assert [s[0] for s in steps] == [w[0] for w in want] == [5, 6, 7, 8]
    for (step, loss, tokens, *_), (_, want_loss, want_tokens) in zip(steps, want, strict=True):
        assert tokens == want_tokens and loss == pytest.approx(want_loss, rel=1e-6), step
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 8 and last["loss"] == pytest.approx(expected["valid"][-1]["loss"], rel=1e-6)


def test_a_checkpoint_of_another_task_is_refused(tmp_path):
    config, _ = old_run(tmp_path)
    path = tmp_path / "run" / "checkpoints" / "step_00000004.safetensors"
    saved = ckpt.load_checkpoint(path)
    ckpt.save_checkpoint(
        path, saved.model, optimizer_state=saved.optimizer, state={**saved.state, "task": "lm"}, rng=saved.rng
    )
    with pytest.raises(TrainError, match=r"step_00000004\.safetensors: it is a checkpoint of task 'lm' but the con"):
        train(Config.from_dict(config), resume=True, ctx=DistContext(), echo=lambda line: None)


def test_a_run_directory_of_another_task_is_refused_before_any_work(tmp_path):
    config, _ = old_run(tmp_path)
    saved = tmp_path / "run" / "train_config.yaml"
    saved.write_text("task: lm\n" + saved.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(TrainError, match=r"train_config\.yaml is a run of task 'lm' but the config's task is 'tr"):
        train(Config.from_dict(config), resume=True, ctx=DistContext(), echo=lambda line: None)
    assert not (tmp_path / "run" / "data").exists()  # refused before the data was prepared
