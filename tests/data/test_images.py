"""Images for classification: the digits and their fixed stratified split, folders of images and every bad
input (each error naming the file), normalization, augmentation, resumable batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qkv.data.images import (
    Augment,
    ImageBatches,
    ImageSet,
    Normalization,
    digits_splits,
    eval_batches,
    load_digits,
    read_image,
    read_image_folder,
    stratified_split,
    write_image_folder,
)
from qkv.data.parallel import DataError


def save_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def grey(value: int, size: int = 4) -> np.ndarray:
    return np.full((size, size), value, dtype=np.uint8)


def rgb(value: int, size: int = 4) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


# ---- digits -------------------------------------------------------------------------------------------------


def test_digits_are_the_sklearn_set_scaled_to_unit_range() -> None:
    digits = load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.float32
    assert digits.class_names == [str(i) for i in range(10)]
    assert float(digits.images.min()) == 0.0 and float(digits.images.max()) == 1.0
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    np.testing.assert_array_equal(digits.images[5, 0].numpy() * 16, raw.images[5])
    assert digits.labels.tolist() == raw.target.tolist()


def test_digits_split_is_stratified_disjoint_complete_and_fixed() -> None:
    train, valid, test = digits_splits()
    assert (len(train), len(valid), len(test)) == (1259, 269, 269)
    digits = load_digits()
    counts = torch.bincount(digits.labels, minlength=10)
    for part, fraction in ((valid, 0.15), (test, 0.15), (train, 0.70)):
        share = torch.bincount(part.labels, minlength=10) / counts
        assert torch.all((share - fraction).abs() < 0.02), share  # every class in the same proportion
    indices = [stratified_split(digits.labels.numpy(), (0.15, 0.15), seed=0)]
    flat = np.concatenate(indices[0])
    assert sorted(flat.tolist()) == list(range(1797))  # every image once
    # Fixed: the same split again, and the images are those at the split's indices.
    again = digits_splits()[2]
    assert torch.equal(again.images, test.images) and torch.equal(test.images, digits.images[indices[0][2]])
    other = stratified_split(digits.labels.numpy(), (0.15, 0.15), seed=1)[2]
    assert not np.array_equal(other, indices[0][2])


def test_stratified_split_keeps_a_training_image_of_every_class() -> None:
    train, valid, test = stratified_split([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], (0.4, 0.4), seed=0)
    assert 0 in np.asarray([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])[train]
    assert len(train) + len(valid) + len(test) == 10
    with pytest.raises(DataError, match="sum to less than 1; got 0.5 and 0.5"):
        stratified_split([0, 1], (0.5, 0.5), seed=0)


# ---- folders ------------------------------------------------------------------------------------------------


def test_folder_of_class_folders_resized_and_scaled(tmp_path: Path) -> None:
    save_png(tmp_path / "cat" / "a.png", grey(255, 6))
    save_png(tmp_path / "cat" / "b.png", grey(0, 6))
    save_png(tmp_path / "dog" / "c.png", grey(51, 6))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    images = read_image_folder(tmp_path, image_size=3)
    assert images.class_names == ["cat", "dog"]
    assert images.labels.tolist() == [0, 0, 1]
    assert images.images.shape == (3, 1, 3, 3)
    torch.testing.assert_close(images.images[:, 0, 1, 1], torch.tensor([1.0, 0.0, 0.2]))
    assert images.paths == [
        str(tmp_path / "cat" / "a.png"),
        str(tmp_path / "cat" / "b.png"),
        str(tmp_path / "dog" / "c.png"),
    ]


def test_written_folder_reads_back(tmp_path: Path) -> None:
    digits = load_digits().subset(range(6))
    write_image_folder(digits, tmp_path)
    back = read_image_folder(tmp_path, image_size=8)
    order = np.argsort(digits.labels.numpy(), kind="stable")  # read back class by class
    torch.testing.assert_close(back.images, digits.images[order], atol=0.51 / 255, rtol=0)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda root: None, "has no class folders"),
        (lambda root: (root / "cat").mkdir(), r"class folder .*cat has no images"),
        (
            lambda root: save_png(root / "cat" / "a.png", grey(1)).with_name("b.png").write_bytes(b"not a png"),
            r"cat/b.png: not a readable image",
        ),
        (
            lambda root: (save_png(root / "cat" / "a.png", grey(1)), save_png(root / "dog" / "b.png", rgb(1))),
            r"dog/b.png has 3 channels but .*cat/a.png has 1; every image must have the same number",
        ),
    ],
    ids=["no class folders", "empty class folder", "unreadable image", "mixed channels"],
)
def test_folder_errors_name_the_file(tmp_path: Path, build, message: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    build(root)
    with pytest.raises(DataError, match=message):
        read_image_folder(root, image_size=4)


def test_root_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing: not a directory; expected a folder with one sub-folder"):
        read_image_folder(tmp_path / "missing", image_size=4)


def test_read_image_converts_channels_to_what_the_model_takes(tmp_path: Path) -> None:
    colour = save_png(tmp_path / "c.png", np.stack([grey(30), grey(60), grey(90)], axis=-1))
    assert read_image(colour, 4).shape == (3, 4, 4)
    torch.testing.assert_close(read_image(colour, 4, channels=1), torch.full((1, 4, 4), 60 / 255))
    torch.testing.assert_close(
        read_image(save_png(tmp_path / "g.png", grey(51)), 4, channels=3), torch.full((3, 4, 4), 0.2)
    )
    rgba = tmp_path / "a.png"
    Image.fromarray(np.full((4, 4, 4), 51, dtype=np.uint8), "RGBA").save(rgba)
    torch.testing.assert_close(read_image(rgba, 4, channels=3), torch.full((3, 4, 4), 0.2))  # alpha dropped
    with pytest.raises(DataError, match=r"a.png: the image has 4 channels \(RGBA\); expected 1"):
        read_image(rgba, 4, channels=1)
    with pytest.raises(DataError, match="nope.png: no such image file"):
        read_image(tmp_path / "nope.png", 4)


# ---- normalization, augmentation, batches -------------------------------------------------------------------


def test_normalization_uses_per_channel_statistics() -> None:
    images = torch.stack([torch.zeros(2, 2, 2), torch.ones(2, 2, 2)])
    images[:, 1] = 0.5  # a constant channel: std 0 becomes 1
    norm = Normalization.fit(images)
    assert norm.mean == pytest.approx([0.5, 0.5]) and norm.std[1] == 1.0
    out = norm(images)
    assert torch.all(out[:, 1] == 0) and out[0, 0].mean() < 0 < out[1, 0].mean()


def test_augment_crops_with_padding_and_flips() -> None:
    image = torch.arange(16.0).view(1, 1, 4, 4).expand(64, 1, 4, 4)
    assert Augment()(image, np.random.default_rng(0)) is image  # off by default
    flipped = Augment(flip=True)(image, np.random.default_rng(0))
    mirrored = [bool(torch.equal(f, image[0].flip(-1))) for f in flipped]
    assert all(m or torch.equal(f, image[0]) for m, f in zip(mirrored, flipped, strict=True))
    assert 10 < sum(mirrored) < 54  # about half
    cropped = Augment(crop_padding=1)(image, np.random.default_rng(0))
    assert cropped.shape == image.shape
    # Every crop is the image shifted by at most one pixel, zeros where it moved in from the padding.
    shifts = set()
    padded = torch.nn.functional.pad(image[0], (1, 1, 1, 1))
    for c in cropped:
        match = [(dy, dx) for dy in range(3) for dx in range(3) if torch.equal(padded[:, dy : dy + 4, dx : dx + 4], c)]
        assert match
        shifts.add(match[0])
    assert len(shifts) > 4


def centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """``(B, 2)`` (x, y) ink-weighted centres of ``images (B, 1, H, W)``, in pixels."""
    h, w = images.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=images.dtype), torch.arange(w, dtype=images.dtype), indexing="ij")
    mass = images.sum(dim=(1, 2, 3))
    return torch.stack([(images[:, 0] * xs).sum((1, 2)) / mass, (images[:, 0] * ys).sum((1, 2)) / mass], dim=1)


def test_augment_warps_by_small_rotations_scales_and_shifts() -> None:
    image = torch.zeros(200, 1, 16, 16, dtype=torch.float64)
    image[:, :, 5:11, 7:9] = 1.0  # a vertical bar, well inside the border
    rng = np.random.default_rng
    assert Augment(rotation=0.0, scale=0.0, translate=0.0)(image, rng(0)) is image
    shifted = Augment(translate=1.5)(image, rng(0))
    moved = centre_of_mass(shifted) - centre_of_mass(image)
    assert moved.abs().max() <= 1.5 + 1e-9 and moved.abs().max() > 1.0  # sub-pixel shifts up to the bound
    assert torch.allclose(shifted.sum(dim=(1, 2, 3)), image.sum(dim=(1, 2, 3)))  # a shift inside keeps the ink
    assert torch.equal(Augment(translate=1.5)(image, rng(0)), shifted)  # the draws come from the generator
    # A rotation turns the bar: its horizontal spread grows with the angle, never past what 30 degrees give.
    spread = [Augment(rotation=a)(image[:1].expand(50, -1, -1, -1), rng(1)) for a in (5.0, 30.0)]
    width = [(s.sum(dim=2) > 0.05).sum(dim=-1).double().mean() for s in spread]
    assert 2 <= width[0] < width[1]
    zoomed = Augment(scale=0.3)(image, rng(2))
    ink = zoomed.sum(dim=(1, 2, 3)) / image.sum(dim=(1, 2, 3))  # area scales with zoom**2: in [0.49, 1.69]
    assert ink.min() >= 0.49 - 0.05 and ink.max() <= 1.69 + 0.05 and ink.max() - ink.min() > 0.5


def small_set(n: int = 10) -> ImageSet:
    return ImageSet(torch.rand(n, 1, 4, 4), torch.arange(n) % 2, ["a", "b"])


def test_batches_cover_each_epoch_once_and_resume_exactly() -> None:
    images = small_set(10)
    norm = Normalization.fit(images.images)
    batches = ImageBatches(images, norm, batch_size=4, seed=3, augment=Augment(crop_padding=1))
    stream = iter(batches)
    first_epoch = [next(stream) for _ in range(3)]
    assert [len(b.labels) for b in first_epoch] == [4, 4, 2]
    assert batches.epoch == 1.0
    seen = torch.cat([b.images for b in first_epoch])
    assert seen.shape == (10, 1, 4, 4)
    later = [next(stream) for _ in range(2)]
    state = batches.state_dict()
    expected = next(stream)
    resumed = ImageBatches(images, norm, batch_size=4, seed=3, augment=Augment(crop_padding=1))
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert torch.equal(got.images, expected.images) and torch.equal(got.labels, expected.labels)
    assert not torch.equal(later[0].images, first_epoch[0].images)  # a new shuffle each epoch
    with pytest.raises(DataError, match="belongs to a stream of 10 images, seed 3, batch size 4, not this one"):
        ImageBatches(images, norm, batch_size=5, seed=3).load_state_dict(state)


def test_eval_batches_are_in_order_and_normalized() -> None:
    images = small_set(5)
    norm = Normalization([0.5], [0.25])
    batches = list(eval_batches(images, norm, batch_size=2))
    assert [len(b.labels) for b in batches] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([b.images for b in batches]), (images.images - 0.5) / 0.25)


def test_crop_padding_is_black_not_the_mean() -> None:
    images = ImageSet(torch.ones(8, 1, 4, 4), torch.zeros(8, dtype=torch.long), ["a"])
    batch = ImageBatches(images, Normalization([0.5], [0.5]), batch_size=8, augment=Augment(crop_padding=1)).batch(0)
    values = set(batch.images.unique().tolist())
    assert values == {-1.0, 1.0}  # pixels of 1 and padding of 0, normalized: (0 - 0.5) / 0.5
