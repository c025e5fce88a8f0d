"""benchmarks/vit_speed.py: both sides compute the same function, train, and the JSON has every figure."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

pytest.importorskip("transformers", reason="the ViT speed benchmark compares against transformers (CI installs it)")


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("vit_speed", BENCHMARKS / "vit_speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def tiny(script: ModuleType) -> object:
    return script.Size("tiny", image=8, patch=4, channels=1, width=16, layers=1, heads=2, mlp=16, classes=3, batch=4)


def test_both_sides_train_and_the_json_has_the_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    monkeypatch.setitem(script.PRESETS, "tiny", tiny(script))
    out = tmp_path / "speed.json"
    argv = ["--presets", "tiny", "--steps", "2", "--repeats", "2", "--warmup", "1", "--threads", "1"]
    assert script.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["benchmark"] == "vit_speed" and report["machine"]["threads"] == 1
    (result,) = report["results"]
    assert result["size"]["image"] == 8 and result["size"]["batch"] == 4
    ours, theirs = result["qkv"], result["transformers"]
    assert ours["parameters"] == theirs["parameters"] > 0
    for side in (ours, theirs):
        assert len(side["times_s"]) == 2 and side["images_per_s"] > 0
        assert math.isfinite(side["last_loss"]) and side["last_loss"] > 0
    assert result["ratio"] == pytest.approx(ours["images_per_s"] / theirs["images_per_s"])
    assert result["ratio_best"] == pytest.approx(ours["best_images_per_s"] / theirs["best_images_per_s"])
    assert ours["best_images_per_s"] >= ours["images_per_s"]
    assert result["max_logit_diff"] < 1e-5


def test_the_sides_have_the_same_weights_and_train_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    torch.set_num_threads(1)
    size = tiny(script)
    ours, theirs = script.build_pair(size, seed=0)
    assert type(theirs).__name__ == "ViTForImageClassification"
    assert theirs.config._attn_implementation == "sdpa"
    batch = script.make_batches(size, 1, seed=0)[0]
    assert script.same_function(ours, theirs, batch[0]) < 1e-5
    # after the same update from the same weights they still agree: gradients and optimizers match too
    losses = [script.train_step(m, script.make_optimizer(m), batch) for m in (ours, theirs)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert script.same_function(ours, theirs, batch[0]) < 1e-5
