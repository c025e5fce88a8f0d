"""Images for classification: the built-in handwritten digits, the user's folder of images, normalization,
light augmentation and resumable batches.

::

    splits = digits_splits(seed=0)  # train / valid / test, stratified, fixed
    images = read_image_folder("photos", image_size=32)  # photos/cat/*.png, photos/dog/*.jpg ...
    train, valid, test = split_images(images, (0.15, 0.15), seed=0)
    norm = Normalization.fit(train.images)  # per-channel mean and std of the training split
    batches = ImageBatches(train, norm, batch_size=64, seed=0, augment=Augment(crop_padding=2, flip=True))
    for batch in batches:  # endless; batch.images (B, C, H, W), batch.labels (B,)
        ...

The digits are scikit-learn's copy of the UCI handwritten digits (``sklearn.datasets.load_digits``: 1,797
grey 8x8 images of the digits 0-9, ink 0..16, shipped inside the scikit-learn wheel, so every machine has
them offline); pixel values become ``ink / 16`` in ``[0, 1]``. A folder of images is read with Pillow, one
sub-folder per class (sorted names are the class names), every image resized to ``image_size`` x
``image_size`` (bilinear) with pixel values ``/ 255``. Files that cannot be used raise :class:`DataError`
naming the file: an unreadable image, an empty class folder, channel counts that differ between images, a
root without class folders.

Optional libraries: scikit-learn (the digits) and Pillow (image files), the ``vision`` extra, imported only
when used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from qkv.data.parallel import DataError
from qkv.data.shuffled_batches import ShuffledBatches

DIGITS = "digits"
DATASETS = (DIGITS,)
DIGITS_SIZE = 8
DIGITS_INK = 16.0  # load_digits' pixels count ink from 0 to 16
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
# Pillow modes that read as one grey channel, and those that become RGB (a palette, CMYK, YCbCr).
GREY_MODES = ("1", "L", "I", "I;16", "F")
SPLITS = ("train", "valid", "test")


@dataclass
class ImageSet:
    """Labelled images.

    Attributes:
        images: ``(N, C, H, W)`` float32, pixel values in ``[0, 1]`` (not normalized).
        labels: ``(N,)`` int64 class indices into ``class_names``.
        class_names: the names of the classes, in index order.
        paths: the file of each image (``None`` for built-in data).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    paths: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``indices``, in that order."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        paths = None if self.paths is None else [self.paths[i] for i in index.tolist()]
        return ImageSet(self.images[index], self.labels[index], list(self.class_names), paths)


# ---- the built-in digits -------------------------------------------------------------------------------------


def load_digits() -> ImageSet:
    """scikit-learn's 1,797 handwritten digits as ``(1797, 1, 8, 8)`` images in ``[0, 1]``, classes ``"0"``..``"9"``."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits  # type: ignore[import-untyped]
    except ImportError:
        raise DataError(
            "the built-in digits come with scikit-learn, which is not installed: pip install 'qkv[vision]'"
        ) from None
    bunch = sklearn_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / DIGITS_INK)[:, None]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return ImageSet(images, labels, [str(name) for name in bunch.target_names])


def stratified_split(labels: Sequence[int] | np.ndarray, fractions: tuple[float, float], seed: int) -> list[np.ndarray]:
    """Indices of a ``train / valid / test`` split that keeps every class's share in each part.

    Each class's indices are shuffled with a generator seeded by ``seed`` and cut at
    ``round(n_class * valid_fraction)`` and ``round(n_class * test_fraction)``; every class keeps at least one
    training image. The same labels and seed give the same split on every machine.

    Args:
        labels: ``(N,)`` class indices.
        fractions: ``(valid_fraction, test_fraction)``, each in ``[0, 1)``, summing to less than 1.
        seed: the shuffle's seed.
    Returns:
        ``[train, valid, test]`` sorted index arrays.
    """
    valid_fraction, test_fraction = fractions
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise DataError(
            "valid and test fractions must be in [0, 1) and sum to less than 1; "
            f"got {valid_fraction} and {test_fraction}"
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        n_valid = round(len(members) * valid_fraction)
        n_test = min(round(len(members) * test_fraction), len(members) - n_valid - 1)
        n_test = max(n_test, 0)
        n_valid = min(n_valid, len(members) - n_test - 1)
        parts[1] += members[:n_valid].tolist()
        parts[2] += members[n_valid : n_valid + n_test].tolist()
        parts[0] += members[n_valid + n_test :].tolist()
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def split_images(images: ImageSet, fractions: tuple[float, float], seed: int) -> tuple[ImageSet, ImageSet, ImageSet]:
    """``images`` cut into ``(train, valid, test)`` by :func:`stratified_split`."""
    train, valid, test = (images.subset(part) for part in stratified_split(images.labels.numpy(), fractions, seed))
    return train, valid, test


def digits_splits(fractions: tuple[float, float] = (0.15, 0.15), seed: int = 0) -> tuple[ImageSet, ImageSet, ImageSet]:
    """The built-in digits as a fixed stratified ``(train, valid, test)`` split (70/15/15 by default:
    1,257 / 270 / 270 images)."""
    return split_images(load_digits(), fractions, seed)


# ---- the user's images ----------------------------------------------------------------------------------------


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image files needs Pillow, which is not installed: pip install 'qkv[vision]'") from None
    return Image


def read_image(path: str | Path, image_size: int, channels: int | None = None) -> torch.Tensor:
    """One image file as ``(C, image_size, image_size)`` float32 in ``[0, 1]`` (bilinear resize).

    Grey modes give 1 channel, a palette / CMYK / YCbCr image 3 (RGB), LA 2 and RGBA 4, as stored.
    ``channels``: the number the caller needs; a grey image is repeated to 3 channels, an RGB image averaged
    to 1 (so a model trained on grey digits can read a colour PNG), an alpha channel dropped (RGBA to RGB, LA
    to grey), and any other mismatch is an error naming the file.
    """
    Image = _pillow()
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's UnidentifiedImageError is an OSError
        raise DataError(f"{path}: not a readable image ({e})") from None
    if image.mode in GREY_MODES:
        image = image.convert("L")
    elif image.mode not in ("RGB", "RGBA", "LA"):
        image = image.convert("RGB")
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1)))
    if channels is not None and tensor.shape[0] in (2, 4) and tensor.shape[0] == channels + 1:
        tensor = tensor[:channels]  # drop the alpha channel of LA / RGBA
    if channels is not None and tensor.shape[0] != channels:
        if tensor.shape[0] == 1 and channels == 3:
            tensor = tensor.expand(3, -1, -1).clone()
        elif tensor.shape[0] == 3 and channels == 1:
            tensor = tensor.mean(dim=0, keepdim=True)
        else:
            raise DataError(f"{path}: the image has {tensor.shape[0]} channels ({image.mode}); expected {channels}")
    return tensor


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(root: str | Path, image_size: int) -> ImageSet:
    """Every image under ``root/<class>/``: the sorted sub-folder names are the classes.

    Args:
        root: a directory with one sub-folder per class (``root/cat/*.png``, ``root/dog/*.jpg``; files with
            the suffixes of :data:`IMAGE_SUFFIXES`).
        image_size: the side every image is resized to.
    Raises:
        DataError: ``root`` is not a directory or has no class folders, a class folder has no images, a file
            is not a readable image, or images differ in their channel counts (each naming the file).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; expected a folder with one sub-folder of images per class")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders; expected one sub-folder of images per class ({root}/cat/*.png)")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    paths: list[str] = []
    for label, folder in enumerate(classes):
        files = _image_files(folder)
        if not files:
            raise DataError(
                f"class folder {folder} has no images (expected files ending in {', '.join(IMAGE_SUFFIXES)})"
            )
        for path in files:
            image = read_image(path, image_size)
            if images and image.shape[0] != images[0].shape[0]:
                raise DataError(
                    f"{path} has {image.shape[0]} channels but {paths[0]} has {images[0].shape[0]}; "
                    "every image must have the same number (convert them all to RGB or all to greyscale)"
                )
            images.append(image)
            labels.append(label)
            paths.append(str(path))
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), [p.name for p in classes], paths)


def write_image_folder(images: ImageSet, root: str | Path) -> list[Path]:
    """Write ``images`` as PNG files ``root/<class>/<index>.png`` (8-bit; :func:`read_image_folder` reads them
    back); e.g. the digits' test split as files for ``qkv predict``. Returns the files written."""
    Image = _pillow()
    root = Path(root)
    written = []
    for index in range(len(images)):
        folder = root / images.class_names[int(images.labels[index])]
        folder.mkdir(parents=True, exist_ok=True)
        array = (images.images[index].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        pixels = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
        path = folder / f"{index:05d}.png"
        Image.fromarray(pixels).save(path)
        written.append(path)
    return written


# ---- normalization, augmentation, batches ---------------------------------------------------------------------


@dataclass
class Normalization:
    """Per-channel ``(x - mean) / std``, with the statistics of the training images."""

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, images: torch.Tensor) -> Normalization:
        """The statistics of ``images (N, C, H, W)`` (a std of 0 becomes 1: a constant channel stays 0)."""
        mean = images.double().mean(dim=(0, 2, 3))
        std = images.double().std(dim=(0, 2, 3))
        std = torch.where(std > 0, std, torch.ones_like(std))
        return cls([float(m) for m in mean], [float(s) for s in std])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images (..., C, H, W)`` normalized."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)[:, None, None]
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)[:, None, None]
        return (images - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass
class Augment:
    """Light training augmentation: a random crop of the image padded by ``crop_padding`` pixels of 0 (black:
    the digits' background) on every side, a horizontal flip with probability 1/2 when ``flip``, and a small
    random affine warp (the usual augmentation for handwriting): a rotation by up to ``rotation`` degrees, a
    scaling by up to ``scale`` (a fraction) and a shift by up to ``translate`` pixels (sub-pixel, bilinear;
    what moves in from outside is black). Off by default (``Augment()`` changes nothing); never flip digits,
    a flipped 2 is no 2."""

    crop_padding: int = 0
    flip: bool = False
    rotation: float = 0.0
    scale: float = 0.0
    translate: float = 0.0

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip or self._warps

    @property
    def _warps(self) -> bool:
        return self.rotation > 0 or self.scale > 0 or self.translate > 0

    def __call__(self, images: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
        """``images (B, C, H, W)`` (pixel values, before normalization) augmented with draws from ``generator``."""
        if not self.active:
            return images
        if self._warps:
            images = self._warp(images, generator)
        b, _, h, w = images.shape
        p = self.crop_padding
        if p:
            padded = F.pad(images, (p, p, p, p))
            dy = generator.integers(0, 2 * p + 1, size=b)
            dx = generator.integers(0, 2 * p + 1, size=b)
            images = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
        if self.flip:
            flip = torch.from_numpy(generator.random(b) < 0.5)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images

    def _warp(self, images: torch.Tensor, generator: np.random.Generator) -> torch.Tensor:
        """Each image of ``(B, C, H, W)`` rotated, scaled and shifted by its own uniform draws."""
        b, _, h, w = images.shape
        angle = np.deg2rad(generator.uniform(-self.rotation, self.rotation, size=b))
        zoom = 1.0 + generator.uniform(-self.scale, self.scale, size=b)
        shift = generator.uniform(-self.translate, self.translate, size=(b, 2)) * 2 / np.array([w, h])
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom  # the grid samples the output's source pixels
        theta = np.stack([np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(torch.from_numpy(theta).to(images.dtype), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ImageBatch(NamedTuple):
    """``images (B, C, H, W)`` normalized (and augmented when training) float32; ``labels (B,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(self.images.to(device), self.labels.to(device))


class ImageBatches(ShuffledBatches[ImageBatch]):
    """Endless training batches of ``images``: each epoch a fresh shuffle, ``ceil(N / batch_size)`` batches,
    each augmented with its own draws (see :class:`~qkv.data.shuffled_batches.ShuffledBatches`: batch ``k``
    depends only on ``k``, so a resumed run sees the batches an uninterrupted one would).

    Args:
        images: the training split.
        normalization: applied to every batch, after augmentation (so crop padding is black, not the mean).
        batch_size: images per batch (the last of an epoch may have fewer).
        seed: the seed of the shuffles and augmentations.
        augment: the augmentation (none by default).
    """

    def __init__(
        self,
        images: ImageSet,
        normalization: Normalization,
        *,
        batch_size: int,
        seed: int = 0,
        augment: Augment | None = None,
    ) -> None:
        super().__init__(len(images), batch_size=batch_size, seed=seed)
        self.images = images
        self.normalization = normalization
        self.augment = augment or Augment()

    def batch(self, k: int) -> ImageBatch:
        """Batch number ``k``."""
        rows = self.rows(k)
        images = self.augment(self.images.images[rows], self.draws(k))
        return ImageBatch(self.normalization(images), self.images.labels[rows])


def eval_batches(images: ImageSet, normalization: Normalization, batch_size: int = 256) -> Iterator[ImageBatch]:
    """``images`` in order, normalized, not augmented, ``batch_size`` at a time (for scoring)."""
    normalized = normalization(images.images)
    for start in range(0, len(images), batch_size):
        yield ImageBatch(normalized[start : start + batch_size], images.labels[start : start + batch_size])
