"""benchmarks/lm_nanogpt.py: its presets are valid qkv configs, and a short run reports every figure."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from qkv.train.config import Config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("lm_nanogpt", BENCHMARKS / "lm_nanogpt.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["nanogpt", "best"])
def test_presets_are_valid_lm_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str) -> None:
    script = load_script(monkeypatch)
    config = Config.from_dict(script.build_config(preset, tmp_path / "t.txt", tmp_path / "out", []))
    assert config.task == "lm" and config.training.device == "cpu"


def test_the_nanogpt_preset_is_nanogpts_cpu_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    config = Config.from_dict(script.build_config("nanogpt", tmp_path / "t.txt", tmp_path / "out", []))
    m, t = config.model, config.training
    assert (m.num_layers, m.num_heads, m.d_model, m.dropout, m.positional) == (4, 4, 128, 0.0, "learned")
    assert (config.data.block_size, config.task_training.batch_size, config.data.valid_fraction) == (64, 12, 0.1)
    assert (t.max_steps, t.lr, t.min_lr, t.warmup_steps, t.schedule) == (2000, 1e-3, 1e-4, 100, "cosine")
    assert (t.betas, t.weight_decay, t.clip_norm, t.adam_eps) == ([0.9, 0.99], 0.1, 1.0, 1e-8)


def test_a_short_run_reports_its_losses_and_a_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat.\nthe dog ate the log.\n" * 60, encoding="utf-8")
    out = tmp_path / "result.json"
    short = ["training.max_steps=4", "training.valid_every=2", "training.warmup_steps=1", "model.num_layers=1"]
    argv = ["--data", str(text), "--workdir", str(tmp_path / "runs"), "--threads", "1", "--sample-tokens", "8"]
    assert script.main([*argv, *(x for s in short for x in ("--set", s)), "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["steps"] == 4 and report["val_step"] == 4 and report["ended_by"] == "max_steps"
    assert math.isfinite(report["val_loss"]) and math.isfinite(report["val_loss_full"])
    assert report["reached_target"] == (report["val_loss"] <= 1.88)
    assert report["val_tokens_full"] == round(len(text.read_text(encoding="utf-8")) * 0.1)
    assert report["sample"].startswith("ROMEO:") and len(report["sample"]) > len("ROMEO:")
    saved = yaml.safe_load(Path(report["config_file"]).read_text(encoding="utf-8"))
    assert saved["training"]["max_steps"] == 4 and saved["model"]["num_layers"] == 1
    assert saved == report["config"]


def test_a_bad_override_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_script(monkeypatch)
    text = tmp_path / "text.txt"
    text.write_text("some text\n" * 100, encoding="utf-8")
    argv = ["--data", str(text), "--workdir", str(tmp_path / "runs"), "--set", "training.lr=-1"]
    assert script.main(argv) == 2
    assert capsys.readouterr().out.strip().startswith("lm_nanogpt: error: training.lr")
    assert not (tmp_path / "runs" / "nanogpt").exists()


def test_a_workdir_that_is_not_a_run_is_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    precious = tmp_path / "nanogpt"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(SystemExit, match="not a qkv run directory"):
        script.prepare_out(precious)
    assert (precious / "notes.txt").read_text(encoding="utf-8") == "mine"
