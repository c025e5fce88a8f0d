"""An image classifier end to end on the built-in digits: ``qkv train`` → ``qkv evaluate`` → ``qkv predict`` →
``qkv show``, with a tiny ViT trained for a few steps; and the bad inputs of ``qkv predict``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from qkv.cli import main
from qkv.data.images import digits_splits, write_image_folder
from qkv.models import load_model
from qkv.train.image_inference import ImageClassifier

TINY_IMAGE_RUN = {
    "task": "image_classification",
    "data": {"dataset": "digits"},
    "model": {"patch_size": 4, "d_model": 16, "num_heads": 2, "num_layers": 2, "ffn_dim": 32},
    "training": {"batch_size": 64, "max_steps": 30, "lr": 3e-3, "warmup_steps": 5, "valid_every": 15},
    "output": {"checkpoint_every": 15, "keep_last": 1, "log_every": 10, "progress_bar": False},
}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A model directory written by ``qkv train`` (30 steps on the digits)."""
    root = tmp_path_factory.mktemp("image_run")
    config = {**TINY_IMAGE_RUN, "output": {**TINY_IMAGE_RUN["output"], "dir": str(root / "model")}}
    path = root / "vit.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "model"


@pytest.fixture(scope="module")
def test_images(tmp_path_factory) -> list[Path]:
    """The first 6 images of the digits' test split as PNG files (``<class>/<index>.png``)."""
    return write_image_folder(digits_splits()[2].subset(range(6)), tmp_path_factory.mktemp("digits"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_train_writes_the_model_directory_and_test_scores(trained: Path) -> None:
    for name in ("config.json", "model.safetensors", "preprocessing.json", "confusion_matrix.png"):
        assert (trained / name).is_file(), name
    assert load_model(trained).config.class_names == [str(i) for i in range(10)]
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in records if r.get("split") == "test"]
    assert len(test) == 1 and sum(map(sum, test[0]["confusion_matrix"])) == 269


def test_evaluate_scores_the_held_out_test_split_as_training_did(trained: Path, capsys) -> None:
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    (test,) = [r for r in records if r.get("split") == "test"]
    status, out, err = run(capsys, "evaluate", "--model", str(trained), "--json")
    assert (status, err) == (0, "")
    scores = json.loads(out)
    assert scores["images"] == 269 and scores["data"] == "test split"
    assert scores["accuracy"] == pytest.approx(test["accuracy"])
    assert scores["confusion_matrix"] == test["confusion_matrix"]
    status, out, _ = run(capsys, "evaluate", "--model", str(trained))
    assert status == 0 and out.startswith(f"accuracy = {test['accuracy']:.2%} (")
    assert out.splitlines()[1].startswith("per class: 0 ")


def test_evaluate_on_a_folder(trained: Path, test_images: list[Path], capsys) -> None:
    root = test_images[0].parent.parent
    status, out, err = run(capsys, "evaluate", "--model", str(trained), "--images", str(root), "--json")
    assert (status, err) == (0, "")
    classifier = ImageClassifier.load(trained)
    probs = classifier.probabilities(torch.stack([classifier.read(p) for p in test_images]))
    labels = torch.tensor([int(p.parent.name) for p in test_images])
    assert json.loads(out)["accuracy"] == pytest.approx(float((probs.argmax(-1) == labels).float().mean()))


def test_predict_prints_the_top_k_classes(trained: Path, test_images: list[Path], capsys) -> None:
    status, out, err = run(capsys, "predict", "--model", str(trained), *map(str, test_images[:2]), "--top-k", "3")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 2
    classifier = ImageClassifier.load(trained)
    for path, line in zip(test_images[:2], lines, strict=True):
        probs = classifier.probabilities(classifier.read(path)[None])[0]
        values, indices = probs.topk(3)
        expected = " | ".join(f"{int(i)} {float(v):.1%}" for v, i in zip(values, indices, strict=True))
        assert line == f"{path}: {expected}"
    status, out, _ = run(capsys, "predict", "--model", str(trained), str(test_images[0]), "--json", "--top-k", "20")
    (row,) = json.loads(out)
    assert len(row["classes"]) == 10 and sum(c["probability"] for c in row["classes"]) == pytest.approx(1.0)


def test_show_draws_the_attention_over_the_image(
    trained: Path, test_images: list[Path], tmp_path: Path, capsys
) -> None:
    png = tmp_path / "attention.png"
    status, out, err = run(capsys, "show", "--model", str(trained), str(test_images[0]), "--png", str(png))
    assert (status, out, err) == (0, f"wrote {png}\n", "")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top-k", "0"], "--top-k must be an int >= 1; got 0"),
        (["MISSING"], "MISSING: no such image file"),
        (["NOT_AN_IMAGE"], r"NOT_AN_IMAGE: not a readable image"),
    ],
)
def test_predict_errors_are_one_line(trained: Path, test_images, tmp_path: Path, capsys, argv, message) -> None:
    bad = tmp_path / "NOT_AN_IMAGE"
    bad.write_text("text")
    argv = [str(tmp_path / a) if a in ("MISSING", "NOT_AN_IMAGE") else a for a in argv]
    if "--top-k" in argv:
        argv.append(str(test_images[0]))
    status, out, err = run(capsys, "predict", "--model", str(trained), *argv)
    assert status == 2 and out == ""
    assert err.startswith("qkv predict: error: ") and err.count("\n") == 1
    assert re.search(message, err), err


def test_predict_refuses_a_model_that_is_not_an_image_classifier(tmp_path: Path, test_images, capsys) -> None:
    from qkv.models import LMConfig, TransformerLM, save_model

    save_model(TransformerLM(LMConfig(vocab_size=8, d_model=8, num_heads=2, num_layers=1, ffn_dim=8)), tmp_path)
    status, _, err = run(capsys, "predict", "--model", str(tmp_path), str(test_images[0]))
    assert status == 2 and "holds a model of type 'transformer_lm', not an image classifier ('vit')" in err


def test_predict_needs_the_preprocessing_file(trained: Path, tmp_path: Path, test_images, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    (copy / "preprocessing.json").unlink()
    status, _, err = run(capsys, "predict", "--model", str(copy), str(test_images[0]))
    assert status == 2 and "preprocessing.json is missing" in err


def test_evaluate_errors_are_one_line(trained: Path, test_images: list[Path], tmp_path: Path, capsys) -> None:
    status, out, err = run(capsys, "evaluate", "--model", str(trained), "--text", str(test_images[0]))
    assert (status, out) == (2, "")
    assert err == (
        "qkv evaluate: error: --src, --ref and --text apply to text models; an image classifier takes --images ROOT\n"
    )
    (tmp_path / "zebra").mkdir()
    shutil.copy(test_images[0], tmp_path / "zebra" / "z.png")
    status, _, err = run(capsys, "evaluate", "--model", str(trained), "--images", str(tmp_path))
    assert status == 2 and err.startswith(f"qkv evaluate: error: {tmp_path} has class folders 'zebra' that the model")
