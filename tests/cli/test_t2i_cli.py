"""Text to image through the command line: ``qkv train`` a tiny model, ``qkv generate`` its images, ``qkv show``
its word maps, ``qkv demo t2i`` at a tiny size, and the bad inputs as one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from qkv.cli import main

TINY = {
    "task": "text_to_image",
    "data": {"corpus": "scenes", "train_size": 32, "valid_size": 4, "test_size": 2, "held_out_size": 2},
    "model": {"patch_size": 8, "d_model": 16, "num_heads": 2, "num_layers": 2, "ffn_dim": 32, "text_layers": 1},
    "training": {"batch_size": 8, "max_steps": 3, "valid_every": 100, "test_prompts": 1, "sample_steps": 2},
    "output": {"progress_bar": False, "checkpoint_every": 100},
}
PROMPT = "a red circle left of a small blue square"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("t2i")
    config = {**TINY, "output": {**TINY["output"], "dir": str(root / "model")}}
    (root / "tiny.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(root / "tiny.yaml")]) == 0
    return root / "model"


def test_generate_writes_the_images_side_by_side(model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "img.png"
    argv = ["generate", "--model", str(model_dir), "--prompt", PROMPT, "--out", str(out), "--num", "3", "--seed", "1"]
    assert main(argv) == 0
    assert f"wrote {out}: 3 images of {PROMPT!r}" in capsys.readouterr().out
    with Image.open(out) as image:
        first = np.asarray(image)
    assert first.shape == (32, 3 * 32 + 2 * 2, 3)
    assert main([*argv[:-1], "1"]) == 0 and main([*argv[:-1], "2"]) == 0
    with Image.open(out) as image:
        assert not np.array_equal(np.asarray(image), first)  # another seed, other noise


def test_show_writes_the_word_maps(model_dir: Path, tmp_path: Path, capsys) -> None:
    png, page, data = tmp_path / "maps.png", tmp_path / "maps.html", tmp_path / "maps.json"
    argv = ["show", "--model", str(model_dir), "--prompt", PROMPT, "--png", str(png), "--html", str(page)]
    assert main([*argv, "--json", str(data), "--steps", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {png}", f"wrote {page}", f"wrote {data}"]
    saved = json.loads(data.read_text(encoding="utf-8"))
    assert saved["words"] == PROMPT.split() and saved["grid"] == [4, 4]
    maps = np.asarray(saved["maps"])
    assert maps.shape == (9, 4, 4)
    sums = maps.sum(axis=0)  # every patch's share of attention on the words (the start token has the rest)
    assert ((sums > 0) & (sums <= 1)).all()
    assert np.asarray(saved["layer_maps"]).shape == (2, 9, 4, 4)
    assert png.stat().st_size > 2000 and "const data = " in page.read_text(encoding="utf-8")
    assert main(["show", "--model", str(model_dir), "--prompt", PROMPT]) == 0
    summary = capsys.readouterr().out
    assert "where each word's cross-attention peaks" in summary and " circle  p(" in summary


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", "", "--out", "{tmp}/a.png"], "prompt must be a non-empty string; got ''"),
        (
            ["generate", "--prompt", "a purple circle", "--out", "{tmp}/a.png"],
            "outside the model's vocabulary: 'purple'",
        ),
        (
            ["generate", "--prompt", PROMPT, "--out", "{tmp}/a.png", "--guidance", "-1"],
            "--guidance must be a number >= 0",
        ),
        (
            ["generate", "--prompt", PROMPT, "--out", "{tmp}/a.png", "--steps", "0"],
            "--steps must be an int >= 1; got 0",
        ),
        (["generate", "--prompt", PROMPT, "--out", "{tmp}/a.png", "--num", "0"], "--num must be an int >= 1; got 0"),
        (["generate", "--prompt", PROMPT, "--out", "{tmp}/a.jpg"], "written as PNG; give a file ending in .png"),
        (["generate", "--prompt", PROMPT], "--out is required for a text-to-image model"),
        (["generate", "--prompt", PROMPT, "--out", "{tmp}/no/a.png"], "the directory {tmp}/no does not exist"),
        (["show", "--prompt", PROMPT, "--layer", "0"], "--layer does not apply to a text-to-image model's word maps"),
        (["show", "a red circle"], "is a text-to-image model: give the prompt to draw as --prompt TEXT"),
        (["show", "--prompt", "a red blob"], "outside the model's vocabulary: 'blob'"),
    ],
)
def test_bad_inputs_are_one_line_errors(model_dir: Path, tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    filled = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main([filled[0], "--model", str(model_dir), *filled[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"qkv {argv[0]}: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in err


def test_text_to_image_options_are_refused_for_another_model(trained_model, capsys) -> None:
    assert main(["generate", "--model", str(trained_model.directory), "--prompt", "x", "--num", "2"]) == 2
    assert "--num: for a text-to-image model" in capsys.readouterr().err


def test_demo_t2i_trains_and_writes_the_grid(tmp_path: Path, capsys) -> None:
    sizes = ["data.train_size=32", "data.valid_size=4", "data.test_size=16", "data.held_out_size=16"]
    model = ["model.d_model=16", "model.num_layers=1", "model.ffn_dim=32", "model.patch_size=8"]
    training = ["training.max_steps=2", "training.batch_size=8", "training.test_prompts=2", "training.sample_steps=2"]
    argv = [f"--set={s}" for s in [*sizes, *model, *training, "output.progress_bar=false"]]
    assert main(["demo", "t2i", "--out", str(tmp_path / "demo"), *argv]) == 0
    out = capsys.readouterr().out
    assert "faithfulness on seen combinations:" in out and "faithfulness on held-out combinations:" in out
    assert f"wrote the grid of 8 prompts to {tmp_path / 'demo' / 'word_maps.png'}" in out
    assert (tmp_path / "demo" / "word_maps.png").stat().st_size > 10_000
