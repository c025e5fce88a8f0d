"""Image classification (``task: image_classification``): a :class:`~qkv.models.vit.VisionTransformer` on
labelled images.

::

    task: image_classification
    data:
      dataset: digits            # the built-in handwritten digits (scikit-learn, 1,797 8x8 images), or
      images: photos/            # your images, one sub-folder per class (photos/cat/*.png)
      image_size: null           # resize to this side (default: 8 for digits, 32 for your images)
      valid_fraction: 0.15       # a stratified, seeded split: 70/15/15 by default
      test_fraction: 0.15
      split_seed: 0
      crop_padding: 0            # augmentation: random crops of the image padded by this many pixels
      flip: false                # augmentation: random horizontal flips (never for digits)
    model:                       # qkv.models.vit.ViTConfig, without what the data sets (image_size,
      patch_size: 2              #   num_channels, num_classes, class_names)
      d_model: 64
      num_layers: 4
      num_heads: 4
      ffn_dim: 128
    training:
      batch_size: 64             # images per batch
      label_smoothing: 0.0

:meth:`ImageClassificationTask.prepare` writes ``preprocessing.json`` into the model directory (the image
size, channels, the training split's per-channel mean and std, and where the data came from), which
:mod:`qkv.train.image_inference` reads so that ``qkv predict``, ``qkv evaluate`` and ``qkv show`` see images
exactly as training did; the class names are saved in ``config.json`` (``ViTConfig.class_names``).
Validation reports ``accuracy`` (the default early-stopping metric) and ``loss`` (mean cross-entropy,
without smoothing), with the per-class accuracy in the log and ``metrics.jsonl``. At the end the exported
model is scored on the test split: accuracy, per-class accuracy, and ``confusion_matrix.png`` in the model
directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qkv.checks import (
    ConfigError,
    StrictConfig,
    boolean,
    fraction,
    int_at_least,
    number_between,
    one_of,
    option,
    optional,
    qualified,
)
from qkv.data.images import (
    DATASETS,
    DIGITS,
    DIGITS_SIZE,
    Augment,
    ImageBatch,
    ImageBatches,
    ImageSet,
    Normalization,
    digits_splits,
    eval_batches,
    read_image_folder,
    split_images,
)
from qkv.models.vit import VisionTransformer, ViTConfig
from qkv.train.ddp import barrier, shard_rows
from qkv.train.task import BatchLoss, Task, Validation

PREPROCESSING_FILE = "preprocessing.json"
CONFUSION_FILE = "confusion_matrix.png"
FOLDER_IMAGE_SIZE = 32
EVAL_BATCH = 256
# ViTConfig fields that come from the data, not from the model section.
DERIVED = ("image_size", "num_channels", "num_classes", "class_names")


def _folder(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a folder name; got {value!r}")
    return value


@dataclass
class ImageDataConfig(StrictConfig):
    """The ``data:`` section (see the module docstring)."""

    dataset: str | None = option(None, optional(one_of), DATASETS)
    images: str | None = option(None, optional(_folder))
    image_size: int | None = option(None, optional(int_at_least), 1)
    valid_fraction: float = option(0.15, fraction)
    test_fraction: float = option(0.15, fraction)
    split_seed: int = option(0, int_at_least, 0)
    crop_padding: int = option(0, int_at_least, 0)
    flip: bool = option(False, boolean)
    rotation: float = option(0.0, number_between, 0.0, 45.0)
    scale: float = option(0.0, number_between, 0.0, 0.5)
    translate: float = option(0.0, number_between, 0.0, 8.0)

    def check(self, prefix: str) -> None:
        if (self.dataset is None) == (self.images is None):
            raise ConfigError(
                f"give either {qualified(prefix, 'dataset')} (built-in: {', '.join(DATASETS)}) or "
                f"{qualified(prefix, 'images')} (a folder with one sub-folder of images per class)"
                + (", not both" if self.dataset is not None else "")
            )
        if self.valid_fraction == 0:
            raise ConfigError(f"{qualified(prefix, 'valid_fraction')} must be > 0: training validates on it")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"{qualified(prefix, 'valid_fraction')} + {qualified(prefix, 'test_fraction')} must be < 1 (the rest "
                f"is the training split); got {self.valid_fraction} + {self.test_fraction}"
            )

    @property
    def size(self) -> int:
        """The side images are resized to."""
        if self.image_size is not None:
            return self.image_size
        return DIGITS_SIZE if self.dataset == DIGITS else FOLDER_IMAGE_SIZE


_VIT_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ViTConfig)}


@dataclass
class ImageModelConfig(StrictConfig):
    """The ``model:`` section: :class:`~qkv.models.vit.ViTConfig` without what the data sets (image size,
    channels, classes). Values are checked by ``ViTConfig``."""

    patch_size: int = _VIT_DEFAULTS["patch_size"]
    d_model: int = _VIT_DEFAULTS["d_model"]
    num_layers: int = _VIT_DEFAULTS["num_layers"]
    num_heads: int = _VIT_DEFAULTS["num_heads"]
    ffn_dim: int = _VIT_DEFAULTS["ffn_dim"]
    dropout: float = _VIT_DEFAULTS["dropout"]
    attention_dropout: float = _VIT_DEFAULTS["attention_dropout"]
    activation: str = _VIT_DEFAULTS["activation"]
    layer_norm_eps: float = _VIT_DEFAULTS["layer_norm_eps"]
    pooling: str = _VIT_DEFAULTS["pooling"]
    positional: str = _VIT_DEFAULTS["positional"]
    qkv_bias: bool = _VIT_DEFAULTS["qkv_bias"]

    def check(self, prefix: str) -> None:
        # The image size is the data's; a multiple of the patch checks everything but divisibility, which
        # build() checks against the real size.
        patch = self.patch_size if isinstance(self.patch_size, int) and self.patch_size > 0 else 1
        self.build(image_size=patch, num_channels=1, class_names=["a", "b"], prefix=prefix)

    def build(self, *, image_size: int, num_channels: int, class_names: list[str], prefix: str = "model") -> ViTConfig:
        """The :class:`ViTConfig` for these images and classes."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.patch_size, int) and self.patch_size > 0 and image_size % self.patch_size:
            raise ConfigError(
                f"{qualified(prefix, 'patch_size')} ({self.patch_size}) must divide the image size ({image_size}, "
                "data.image_size)"
            )
        try:
            return ViTConfig(
                image_size=image_size,
                num_channels=num_channels,
                num_classes=len(class_names),
                class_names=list(class_names),
                **params,
            )
        except (ValueError, TypeError) as e:
            message = str(e)
            named = any(message.startswith(key) for key in params)
            raise ConfigError(qualified(prefix, message) if named else f"{prefix}: {message}") from None


@dataclass
class ImageTrainingConfig(StrictConfig):
    """The ``training:`` keys only image classification reads (see the module docstring)."""

    batch_size: int = option(64, int_at_least, 1)
    label_smoothing: float = option(0.0, number_between, 0.0, 0.5, expected="a number in [0, 0.5]")


def read_splits(data: ImageDataConfig) -> tuple[ImageSet, ImageSet, ImageSet]:
    """``(train, valid, test)`` as the data section says: the built-in digits or the user's folder, resized to
    ``data.size`` and split (stratified, seeded by ``data.split_seed``)."""
    fractions = (data.valid_fraction, data.test_fraction)
    if data.dataset == DIGITS:
        splits = digits_splits(fractions, data.split_seed)
        if data.size != DIGITS_SIZE:
            splits = tuple(_resized(split, data.size) for split in splits)  # type: ignore[assignment]
        return splits
    assert data.images is not None, "ImageDataConfig.check requires dataset or images"
    return split_images(read_image_folder(data.images, data.size), fractions, data.split_seed)


def _resized(images: ImageSet, size: int) -> ImageSet:
    resized = F.interpolate(images.images, size=(size, size), mode="bilinear", align_corners=False)
    return ImageSet(resized, images.labels, images.class_names, images.paths)


@dataclass
class Scores:
    """Accuracy and loss of a model on labelled images, and the confusion matrix behind them.

    Attributes:
        loss: the mean cross-entropy (nats per image, no smoothing).
        confusion: ``(classes, classes)`` int64, ``confusion[true, predicted]`` image counts.
    """

    loss: float
    confusion: torch.Tensor

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(self.confusion.diag().sum()) / max(self.images, 1)

    def per_class(self, class_names: list[str]) -> dict[str, float | None]:
        """Each class's accuracy (recall); ``None`` for a class with no images here."""
        totals = self.confusion.sum(dim=1)
        return {
            name: (float(self.confusion[i, i]) / int(totals[i]) if int(totals[i]) else None)
            for i, name in enumerate(class_names)
        }


@torch.no_grad()
def score_images(
    model: nn.Module, images: ImageSet, normalization: Normalization, device: torch.device, batch_size: int = EVAL_BATCH
) -> Scores:
    """Loss and confusion matrix of ``model`` (a :class:`VisionTransformer`, in eval mode) on ``images``."""
    classes = len(images.class_names)
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    nll = 0.0
    for batch in eval_batches(images, normalization, batch_size):
        batch = batch.to(device)
        logits = model(batch.images).logits.float()
        nll += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
        predicted = logits.argmax(dim=-1)
        confusion += torch.bincount((batch.labels * classes + predicted).cpu(), minlength=classes * classes).view(
            classes, classes
        )
    return Scores(loss=nll / max(len(images), 1), confusion=confusion)


def per_class_line(per_class: dict[str, float | None]) -> str:
    """``"  per class: 0 100.0% | 1 96.3% | ..."`` for a log."""
    shown = " | ".join(f"{name} {'-' if acc is None else f'{acc:.1%}'}" for name, acc in per_class.items())
    return f"  per class: {shown}"


class ImageClassificationTask(Task):
    """``task: image_classification`` (see the module docstring)."""

    name = "image_classification"
    data_config = ImageDataConfig
    model_config = ImageModelConfig
    training_config = ImageTrainingConfig
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "loss")
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss"})

    train_set: ImageSet
    valid_set: ImageSet
    test_set: ImageSet
    normalization: Normalization

    @property
    def data(self) -> ImageDataConfig:
        data: ImageDataConfig = self.config.data
        return data

    @property
    def options(self) -> ImageTrainingConfig:
        """The task's ``training:`` keys."""
        options: ImageTrainingConfig = self.config.task_training
        return options

    def prepare(self, *, resume: bool) -> None:
        self.train_set, self.valid_set, self.test_set = read_splits(self.data)
        if len(self.valid_set) == 0:
            raise ConfigError(
                f"the validation split is empty ({len(self.train_set)} images in all); use a larger "
                "data.valid_fraction or more images"
            )
        # Deterministic from the data, so a resumed run computes the same statistics it saved.
        self.normalization = Normalization.fit(self.train_set.images)
        if self.ctx.is_main:
            self.preprocessing_path.write_text(json.dumps(self.preprocessing(), indent=2) + "\n", encoding="utf-8")
        barrier(self.ctx)

    @property
    def preprocessing_path(self) -> Path:
        return self.config.output_dir / PREPROCESSING_FILE

    def preprocessing(self) -> dict[str, Any]:
        """What :mod:`qkv.train.image_inference` needs to see images as training did, and to find the test split
        again (``qkv evaluate`` without ``--images``)."""
        d = self.data
        return {
            "image_size": self.train_set.image_size,
            "num_channels": self.train_set.num_channels,
            **self.normalization.to_dict(),
            "dataset": d.dataset,
            "images": None if d.images is None else str(Path(d.images).resolve()),
            "valid_fraction": d.valid_fraction,
            "test_fraction": d.test_fraction,
            "split_seed": d.split_seed,
        }

    def describe(self) -> str:
        source = f"the built-in {self.data.dataset}" if self.data.dataset else self.data.images
        t = self.train_set
        return (
            f"{len(t):,} training images, {len(self.valid_set):,} valid, {len(self.test_set):,} test from {source} "
            f"({len(t.class_names)} classes, {t.num_channels}x{t.image_size}x{t.image_size})"
        )

    def build_model(self) -> nn.Module:
        t = self.train_set
        config = self.config.model.build(
            image_size=t.image_size, num_channels=t.num_channels, class_names=t.class_names
        )
        return VisionTransformer(config)

    def train_batches(self) -> ImageBatches:
        d = self.data
        return ImageBatches(
            self.train_set,
            self.normalization,
            batch_size=self.options.batch_size,
            seed=self.config.training.seed,
            augment=Augment(
                crop_padding=d.crop_padding, flip=d.flip, rotation=d.rotation, scale=d.scale, translate=d.translate
            ),
        )

    def batch_tokens(self, batch: ImageBatch) -> int:
        return int(batch.labels.shape[0])

    def shard(self, batch: ImageBatch) -> tuple[ImageBatch, float]:
        if not self.ctx.distributed:
            return batch, 1.0
        rows = shard_rows(range(batch.labels.shape[0]), self.ctx)
        if not rows:
            return ImageBatch(batch.images[:1], batch.labels[:1]), 0.0
        return ImageBatch(batch.images[rows], batch.labels[rows]), 1.0

    def loss(self, model: nn.Module, batch: ImageBatch, device: torch.device) -> BatchLoss:
        batch = batch.to(device)
        logits = model(batch.images).logits.float()
        loss = F.cross_entropy(logits, batch.labels, reduction="sum", label_smoothing=self.options.label_smoothing)
        if self.options.label_smoothing:
            nll = float(F.cross_entropy(logits.detach(), batch.labels, reduction="sum"))
        else:
            nll = float(loss.detach())
        return BatchLoss(loss=loss, nll=nll, tokens=self.batch_tokens(batch))

    def _validation(self, scores: Scores) -> Validation:
        per_class = self.per_class(scores)
        return Validation(
            metrics={"accuracy": scores.accuracy, "loss": scores.loss},
            lines=[f"  {scores.images} images, accuracy {scores.accuracy:.2%}", per_class_line(per_class)],
            extra={"images": scores.images, "per_class_accuracy": per_class},
        )

    def per_class(self, scores: Scores) -> dict[str, float | None]:
        return scores.per_class(self.train_set.class_names)

    def validate(self, model: nn.Module, device: torch.device, step: int) -> Validation:
        return self._validation(score_images(model, self.valid_set, self.normalization, device))

    def score_test(self, model: nn.Module, device: torch.device) -> Validation | None:
        if len(self.test_set) == 0:
            return None
        from qkv.viz.confusion import plot_confusion_matrix

        scores = score_images(model, self.test_set, self.normalization, device)
        found = self._validation(scores)
        path = self.config.output_dir / CONFUSION_FILE
        plot_confusion_matrix(
            scores.confusion.numpy(),
            self.train_set.class_names,
            title=f"test split: accuracy {scores.accuracy:.2%} ({scores.images} images)",
            path=path,
        )
        found.lines.append(f"  wrote the confusion matrix to {path}")
        found.extra["confusion_matrix"] = scores.confusion.tolist()
        return found
