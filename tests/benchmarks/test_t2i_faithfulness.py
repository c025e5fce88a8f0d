"""benchmarks/t2i_faithfulness.py: the word-to-object reading of captions, the pointing game against masks,
and the JSON of a run on a tiny trained model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from qkv.data.scene_captions import object_word_positions
from qkv.data.scenes import build_scene_sets, render
from qkv.train.config import Config
from qkv.train.t2i_inference import TextToImage
from qkv.train.trainer import train

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("t2i_faithfulness", BENCHMARKS / "t2i_faithfulness.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("t2i") / "model"
    config = Config.from_dict(
        {
            "task": "text_to_image",
            "data": {"corpus": "scenes", "train_size": 16, "valid_size": 4, "test_size": 6, "held_out_size": 6},
            "model": {"patch_size": 4, "d_model": 16, "num_heads": 2, "num_layers": 1, "ffn_dim": 32},
            "training": {"batch_size": 8, "max_steps": 2, "test_prompts": 0, "sample_steps": 2},
            "output": {"dir": str(out), "progress_bar": False},
        }
    )
    train(config, echo=lambda line: None)
    return out


def test_the_pointing_game_hits_when_each_word_attends_to_its_object(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = load_script(monkeypatch)
    t2i = TextToImage.load(model_dir)
    scenes = [s for s in build_scene_sets(train=0, valid=0, test=12, held_out_test=0, seed=5)["test"].scenes]
    grid = t2i.model.config.grid

    def oracle(image: torch.Tensor, caption: str, **kwargs: object) -> torch.Tensor:
        """Each object word attends to the patches in proportion to the pixels of its object they hold."""
        scene = next(s for s in scenes if s.caption == caption)
        _, masks = render(scene, 32)
        words = caption.split()
        weights = torch.full((1, 1, grid[0] * grid[1], len(words)), 1e-3)
        for position, _, obj in object_word_positions(caption):
            counts = torch.from_numpy(masks[obj]).reshape(grid[0], 4, grid[1], 4).sum(dim=(1, 3)).flatten()
            weights[0, 0, :, position] += counts / counts.sum()
        return weights

    monkeypatch.setattr(t2i, "attend", oracle)
    report = script.ground_truth_pointing(t2i, scenes)
    assert report["all"]["trials"] == sum(len(object_word_positions(s.caption)) for s in scenes)
    assert report["all"]["rate"] > 0.9 and report["colour"]["trials"] > 0 and report["shape"]["trials"] > 0

    def contrary(image: torch.Tensor, caption: str, **kwargs: object) -> torch.Tensor:
        """Each object word attends to the other object's patch (one-object scenes: a corner)."""
        flipped = oracle(image, caption)
        return flipped.flip(2)  # the patch grid mirrored

    monkeypatch.setattr(t2i, "attend", contrary)
    assert script.ground_truth_pointing(t2i, scenes)["all"]["rate"] < 0.5


def test_the_benchmark_writes_every_figure(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = load_script(monkeypatch)
    out = tmp_path / "t2i.json"
    argv = ["--model", str(model_dir), "--prompts", "4", "--batch", "2", "--repeats", "1", "--threads", "1"]
    assert script.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["config"]["steps"] == 2 and report["config"]["guidance"] == 2.0  # the model's defaults
    for split in ("seen", "held_out"):
        faithful = report[split]["faithfulness"]["all"]
        assert faithful["prompts"] == 4 and faithful["rate"] == faithful["right"] / 4
        for cell in report[split]["pointing_generated"].values():
            assert 0 <= cell["hits"] <= cell["trials"]
    truth = report["pointing_ground_truth"]["all"]
    assert truth["trials"] > 4 and 0 <= truth["rate"] <= 1
    assert [s["batch"] for s in report["speed"]] == [1, 2] and all(s["images_per_s"] > 0 for s in report["speed"])
    assert report["model"]["image_size"] == 32 and report["machine"]["threads"] == 1
