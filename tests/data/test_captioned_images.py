"""The user's captioned images: a folder and a TSV of file<TAB>caption, read back exactly, resized and
converted to RGB, and every bad input a clear error naming the file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qkv.data import captioned_images
from qkv.data.captioned_images import read_captioned_folder, write_captioned_folder
from qkv.data.parallel import DataError
from qkv.data.scenes import build_scene_sets


def save(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8), mode).save(path)


def folder_with(tmp_path: Path, tsv: str | bytes, images: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    for name in images:
        save(tmp_path / name, np.full((8, 8, 3), 200))
    path = tmp_path / "captions.tsv"
    path.write_bytes(tsv if isinstance(tsv, bytes) else tsv.encode("utf-8"))
    return path


def test_scenes_written_as_a_folder_read_back_exactly(tmp_path: Path) -> None:
    scenes = build_scene_sets(train=6, valid=0, test=0, held_out_test=0, seed=0)["train"]
    tsv = write_captioned_folder(scenes.images, scenes.captions, tmp_path / "scenes")
    data = read_captioned_folder(tmp_path / "scenes", tsv, image_size=32)
    assert len(data) == 6 and data.captions == scenes.captions
    assert data.files == [f"{i:05d}.png" for i in range(6)]
    assert data.images.dtype == torch.float32 and torch.equal(data.images, scenes.images)
    assert torch.equal(read_captioned_folder(tmp_path / "scenes", image_size=32).images, data.images)  # default TSV


def test_images_are_resized_rgb_and_one_file_may_have_several_captions(tmp_path: Path) -> None:
    save(tmp_path / "wide.png", np.full((24, 48, 3), (255, 0, 0)))  # not square: squeezed, not cropped
    save(tmp_path / "sub" / "grey.png", np.full((10, 10), 51), "L")
    save(tmp_path / "alpha.png", np.concatenate([np.full((8, 8, 3), 0), np.full((8, 8, 1), 9)], axis=-1), "RGBA")
    tsv = tmp_path / "c.tsv"
    tsv.write_text(
        "file\tcaption\n"
        "wide.png\t  a red thing \n"
        "\n"
        "sub/grey.png\ta grey thing\n"
        "wide.png\tanother caption\n"
        "alpha.png\tan alpha thing\r\n",
        encoding="utf-8",
    )
    data = read_captioned_folder(tmp_path, tsv, image_size=16)
    assert data.images.shape == (4, 3, 16, 16)
    assert data.captions == ["a red thing", "a grey thing", "another caption", "an alpha thing"]
    assert data.files == ["wide.png", "sub/grey.png", "wide.png", "alpha.png"]
    assert torch.equal(data.images[0, 0], torch.ones(16, 16)) and torch.equal(data.images[0, 1], -torch.ones(16, 16))
    assert torch.allclose(data.images[1], torch.full((3, 16, 16), 51 / 127.5 - 1))
    assert torch.equal(data.images[2], data.images[0])
    assert torch.equal(data.images[3], -torch.ones(3, 16, 16))  # alpha dropped


@pytest.mark.parametrize(
    ("tsv", "message"),
    [
        ("a.png a red circle\n", r"captions.tsv line 1 has 0 tabs; expected exactly one, between file and caption"),
        ("a.png\tred\tcircle\n", "line 1 has 2 tabs; expected exactly one"),
        ("a.png\tfine\nb.png\t  \n", r"line 2: the caption of 'b.png' is empty; expected a caption after the tab"),
        ("\tno file\n", "line 1: the file name is empty"),
        ("a.png\tok\nmissing.png\tgone\n", r"line 2: .*missing.png does not exist"),
        ("a.png\tok\nb.png\tx\na.png\tok\n", r"line 3 repeats line 1 \('a.png' with caption 'ok'\)"),
        ("../a.png\tup\n", r"line 1: '../a.png' must be a path relative to .* that stays inside it"),
        ("/etc/passwd\tabsolute\n", "line 1: '/etc/passwd' must be a path relative to"),
        ("", "captions.tsv has no captioned images; expected lines of file<TAB>caption"),
        ("file\tcaption\n\n", "has no captioned images"),
        (b"a.png\tcaf\xe9\n", r"captions.tsv line 1 is not valid UTF-8 \(0xe9 at byte 10 of the line\)"),
    ],
)
def test_bad_caption_files_name_the_line(tmp_path: Path, tsv: str | bytes, message: str) -> None:
    path = folder_with(tmp_path, tsv)
    with pytest.raises(DataError, match=message):
        read_captioned_folder(tmp_path, path, image_size=8)


def test_bad_files_and_folders_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"nowhere: not a directory; expected the folder of captioned images"):
        read_captioned_folder(tmp_path / "nowhere", tmp_path / "c.tsv", image_size=8)
    with pytest.raises(DataError, match=r"captions.tsv: no such captions file; expected a TSV of file<TAB>caption"):
        read_captioned_folder(tmp_path, image_size=8)
    with pytest.raises(DataError, match="is a directory; expected a regular file"):
        read_captioned_folder(tmp_path, tmp_path, image_size=8)
    path = folder_with(tmp_path, "a.png\tfine\nnot_an_image.png\tbroken\nsub\ta folder\n")
    (tmp_path / "not_an_image.png").write_text("hello", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=r"line 2: .*not_an_image.png is not a readable image \(UnidentifiedImageError"):
        read_captioned_folder(tmp_path, path, image_size=8)
    path.write_text("a.png\tfine\nsub\ta folder\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: .*sub is a directory; expected a regular file"):
        read_captioned_folder(tmp_path, path, image_size=8)
    path.write_text("a.png\tfine\n", encoding="utf-8")
    monkeypatch.setattr(captioned_images, "MAX_IMAGE_PIXELS", 63)
    with pytest.raises(DataError, match=r"line 1: .*a.png is 8 x 8 pixels; expected at most 63 in all"):
        read_captioned_folder(tmp_path, path, image_size=8)
    with pytest.raises(DataError, match="image_size must be an int >= 4; got 0"):
        read_captioned_folder(tmp_path, path, image_size=0)


def test_writing_refuses_what_the_reader_could_not_read_back(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"images must be \(N, 3, H, W\) with N = 1 captions; got shape \(2, 3, 4, 4\)"):
        write_captioned_folder(torch.zeros(2, 3, 4, 4), ["one"], tmp_path)
    with pytest.raises(DataError, match=r"captions\[0\] must be non-empty text without tabs or line breaks"):
        write_captioned_folder(torch.zeros(1, 3, 4, 4), ["a\tb"], tmp_path)
