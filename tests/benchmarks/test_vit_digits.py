"""benchmarks/vit_digits.py: the built-in config is what it trains, and a short run reports the ViT's and the
SVM's test accuracy on the same split."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from qkv.train.config import Config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("vit_digits", BENCHMARKS / "vit_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when the script runs: its folder first on sys.path
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_built_in_config_fits_the_three_minute_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    config = Config.from_dict(script.build_config(tmp_path / "out", []))
    assert config.task == "image_classification" and config.data.dataset == "digits"
    assert config.training.max_time is not None and config.training.max_time <= 180
    assert config.data.flip is False  # a flipped digit is another digit (or none)
    assert config.output.dir == str(tmp_path / "out") and config.training.device == "cpu"


def test_a_short_run_reports_vit_and_svm_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread) -> None:
    script = load_script(monkeypatch)
    out = tmp_path / "report.json"
    argv = ["--workdir", str(tmp_path / "work"), "--json", str(out), "--threads", "1"]
    tiny = [
        "training.max_steps=6",
        "training.valid_every=6",
        "model.num_layers=1",
        "model.d_model=16",
        "model.ffn_dim=16",
    ]
    argv += [arg for key in tiny for arg in ("--set", key)]
    assert script.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["steps"] == 6 and report["test_images"] == 269
    assert 0 <= report["test_accuracy"] <= 1 and set(report["test_per_class_accuracy"]) == {str(i) for i in range(10)}
    assert report["svm"]["test_accuracy"] > 0.95  # SVC(gamma=0.001) on the digits
    assert report["vit_minus_svm"] == pytest.approx(report["test_accuracy"] - report["svm"]["test_accuracy"])
    assert report["reached_target"] is False  # six steps do not make a digit classifier
    assert (tmp_path / "work" / "vit_digits" / "confusion_matrix.png").is_file()
