"""The image-classification task: its config sections, data preparation, loss, validation and test scores
(the confusion matrix), and an image run killed and resumed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tests.train.tiny_tasks import prepared_task, tiny_config

from qkv.checks import ConfigError
from qkv.data.images import ImageBatch
from qkv.models import VisionTransformer
from qkv.train.config import Config
from qkv.train.config import ConfigError as TrainConfigError
from qkv.train.ddp import DistContext
from qkv.train.tasks.image import CONFUSION_FILE, PREPROCESSING_FILE, ImageClassificationTask, Scores

TINY_VIT: dict[str, Any] = {
    "task": "image_classification",
    "data": {"dataset": "digits"},
    "model": {"patch_size": 4, "d_model": 16, "num_heads": 2, "num_layers": 1, "ffn_dim": 32},
    "training": {"batch_size": 32, "max_steps": 4, "valid_every": 100},
}
pytestmark = pytest.mark.usefixtures("one_thread")


def vit_config(out: Path, **sections: dict[str, Any]) -> Config:
    return tiny_config(TINY_VIT, out, **sections)


def prepared(out: Path, **sections: dict[str, Any]) -> ImageClassificationTask:
    return prepared_task(vit_config(out, **sections), ImageClassificationTask)


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("data", {"images": "photos"}, r"give either data.dataset \(built-in: digits\) or data.images .*, not both"),
        ("data", {"dataset": None}, r"give either data.dataset \(built-in: digits\) or data.images"),
        ("data", {"dataset": "mnist"}, "data.dataset must be one of 'digits'; got 'mnist'"),
        ("data", {"valid_fraction": 0}, "data.valid_fraction must be > 0"),
        ("data", {"valid_fraction": 0.5, "test_fraction": 0.5}, r"valid_fraction \+ data.test_fraction must be < 1"),
        ("data", {"crop_padding": -1}, "data.crop_padding must be an int >= 0; got -1"),
        ("data", {"rotation": 90}, r"data.rotation must be a number in \[0, 45\]; got 90"),
        ("data", {"translate": -1.0}, r"data.translate must be a number in \[0, 8\]; got -1.0"),
        ("data", {"flip": "yes"}, "data.flip must be true or false; got 'yes'"),
        ("model", {"num_heads": 3}, "model.d_model=16 must be a multiple of num_heads=3"),
        ("model", {"pooling": "max"}, "model.pooling must be one of 'cls', 'mean'; got 'max'"),
        ("model", {"hidden_size": 8}, "unknown key model.hidden_size; valid keys of model: patch_size"),
        ("training", {"label_smoothing": 0.7}, r"training.label_smoothing must be a number in \[0, 0.5\]; got 0.7"),
        ("training", {"valid_beam": 2}, "training.valid_beam is a key of task translation, not of task image"),
        ("training", {"early_stopping_metric": "bleu"}, "early_stopping_metric must be one of accuracy, loss"),
    ],
)
def test_bad_config_values_name_the_key(section: str, values: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises((ConfigError, TrainConfigError), match=message):
        vit_config(tmp_path, **{section: values})


def test_patch_size_must_divide_the_image_size(tmp_path: Path) -> None:
    task = prepared(tmp_path, model={"patch_size": 3})
    with pytest.raises(ConfigError, match=r"model.patch_size \(3\) must divide the image size \(8, data.image_size\)"):
        task.build_model()


def test_prepare_reads_the_split_and_writes_the_preprocessing(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    assert (len(task.train_set), len(task.valid_set), len(task.test_set)) == (1259, 269, 269)
    saved = json.loads((tmp_path / PREPROCESSING_FILE).read_text())
    assert saved["image_size"] == 8 and saved["num_channels"] == 1 and saved["dataset"] == "digits"
    assert saved["mean"] == pytest.approx([float(task.train_set.images.mean())])
    model = task.build_model()
    assert isinstance(model, VisionTransformer)
    assert model.config.class_names == [str(i) for i in range(10)] and model.config.num_channels == 1
    assert "1,259 training images, 269 valid, 269 test from the built-in digits" in task.describe()


def test_image_size_resizes_the_digits(tmp_path: Path) -> None:
    task = prepared(tmp_path, data={"image_size": 16})
    assert task.train_set.images.shape[1:] == (1, 16, 16)
    assert task.build_model().config.image_size == 16


def test_folder_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(
                tmp_path / "photos" / name / f"{i}.png"
            )
    task = prepared(tmp_path / "out", data={"dataset": None, "images": str(tmp_path / "photos"), "image_size": 8})
    assert task.train_set.class_names == ["cat", "dog"] and task.train_set.images.shape[1:] == (3, 8, 8)
    assert (len(task.train_set), len(task.valid_set), len(task.test_set)) == (6, 2, 2)
    assert task.build_model().config.num_channels == 3


def test_loss_is_summed_cross_entropy_with_label_smoothing(tmp_path: Path) -> None:
    task = prepared(tmp_path, training={"label_smoothing": 0.1})
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.train_batches()))
    result = task.loss(model, batch, torch.device("cpu"))
    logits = model(batch.images).logits
    assert result.tokens == 32
    torch.testing.assert_close(result.loss, F.cross_entropy(logits, batch.labels, reduction="sum", label_smoothing=0.1))
    assert result.nll == pytest.approx(float(F.cross_entropy(logits.detach(), batch.labels, reduction="sum")), rel=1e-5)


def test_scores_accuracy_and_per_class() -> None:
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    scores = Scores(loss=0.5, confusion=confusion)
    assert scores.accuracy == pytest.approx(5 / 6)
    assert scores.per_class(["a", "b", "c"]) == {"a": 0.75, "b": 1.0, "c": None}


class Constant(torch.nn.Module):
    """Predicts class ``label`` for every image (a stand-in whose scores are known)."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, images: torch.Tensor) -> Any:
        logits = torch.full((images.shape[0], 10), -5.0)
        logits[:, self.label] = 5.0
        return type("Out", (), {"logits": logits})()


def test_validate_and_score_test_report_accuracy_per_class_and_confusion(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    found = task.validate(Constant(3), torch.device("cpu"), step=1)
    threes = int((task.valid_set.labels == 3).sum())
    assert found.metrics["accuracy"] == pytest.approx(threes / 269)
    assert found.extra["per_class_accuracy"]["3"] == 1.0 and found.extra["per_class_accuracy"]["0"] == 0.0
    test = task.score_test(Constant(3), torch.device("cpu"))
    assert test is not None
    confusion = np.asarray(test.extra["confusion_matrix"])
    assert confusion[:, 3].sum() == 269 and confusion.sum() == 269
    assert confusion[3, 3] == int((task.test_set.labels == 3).sum())
    assert (tmp_path / CONFUSION_FILE).stat().st_size > 1000


def test_shard_under_ddp_takes_every_world_size_th_row(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    task.ctx = DistContext(rank=1, world_size=2, local_rank=1)
    batch = ImageBatch(torch.arange(5.0).view(5, 1, 1, 1), torch.arange(5))
    part, weight = task.shard(batch)
    assert part.labels.tolist() == [1, 3] and weight == 1.0


def test_an_image_run_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from qkv.train.trainer import train

    def run(out: Path, steps: int, *, resume: bool = False) -> None:
        config = vit_config(
            out,
            data={"crop_padding": 1, "flip": True, "rotation": 5.0},  # augmentation draws must resume too
            model={"dropout": 0.1},  # and dropout's
            training={"max_steps": steps, "lr": 3e-3, "warmup_steps": 2, "batch_size": 500},  # epochs of 3 batches
        )
        config.output.checkpoint_every, config.output.export, config.output.progress_bar = 2, "last", False
        train(config, resume=resume, echo=lambda line: None)

    run(tmp_path / "whole", 5)
    run(tmp_path / "killed", 2)  # a run stopped after its step-2 checkpoint
    run(tmp_path / "killed", 5, resume=True)  # crosses an epoch boundary after the resume
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)
    assert "resumed from" in (tmp_path / "killed" / "train.log").read_text(encoding="utf-8")
