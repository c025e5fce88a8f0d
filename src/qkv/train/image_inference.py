"""Using an image classifier ``qkv train`` wrote (``task: image_classification``): predict, evaluate, attend.

A model directory holds ``config.json`` + ``model.safetensors`` (a :class:`~qkv.models.vit.VisionTransformer`,
its class names in the config) and ``preprocessing.json`` (written by
:class:`~qkv.train.tasks.image.ImageClassificationTask`: the image size, channels, and the training split's
per-channel mean and std). :class:`ImageClassifier` reads an image file the way training read its images
(Pillow, resized to the model's size, ``/ 255``, normalized with the saved statistics)::

    classifier = ImageClassifier.load("runs/vit-digits")
    classifier.predict(["digit.png"], top_k=3)  # [[("3", 0.981), ("8", 0.012), ("5", 0.004)]]
    classifier.evaluate(classifier.test_split())  # the built-in digits' test split the run held out
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkv.checks import ConfigError
from qkv.data.images import ImageSet, Normalization, read_image, read_image_folder
from qkv.models.checkpoint import load_model
from qkv.models.vit import VisionTransformer
from qkv.safe_files import read_json_file
from qkv.train.lm_inference import model_type_of
from qkv.train.tasks.image import PREPROCESSING_FILE, ImageDataConfig, Scores, read_splits, score_images

MAX_PREPROCESSING_BYTES = 1 << 20


class ImageModelError(ValueError):
    """A model directory that is not a usable image classifier; the message names the file and what is wrong."""


@dataclass
class Preprocessing:
    """How a model saw its images (``preprocessing.json``).

    Attributes:
        image_size: the side images are resized to.
        num_channels: channels the model takes.
        normalization: the training split's per-channel mean and std.
        source: the rest of the file (``dataset``, ``images``, fractions and ``split_seed``: where the test
            split came from).
    """

    image_size: int
    num_channels: int
    normalization: Normalization
    source: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> Preprocessing:
        try:
            data = read_json_file(path, MAX_PREPROCESSING_BYTES)
        except FileNotFoundError:
            raise ImageModelError(
                f"{path} is missing: the model directory of an image classifier (task: image_classification) has "
                "one beside config.json"
            ) from None
        except (OSError, ValueError) as e:  # ValueError: JSON, UTF-8, size
            raise ImageModelError(f"{path}: cannot be read as JSON ({e})") from None
        try:
            size, channels, mean, std = data["image_size"], data["num_channels"], data["mean"], data["std"]
            ok = (
                isinstance(size, int)
                and size > 0
                and isinstance(channels, int)
                and len(mean) == len(std) == channels
                and all(isinstance(v, (int, float)) for v in [*mean, *std])
                and all(s > 0 for s in std)
            )
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ImageModelError(
                f"{path}: expected image_size, num_channels and one mean and one positive std per channel"
            )
        return cls(size, channels, Normalization([float(m) for m in mean], [float(s) for s in std]), dict(data))


@dataclass
class Prediction:
    """The top classes of one image: ``classes[i] = (name, probability)``, most probable first."""

    source: str
    classes: list[tuple[str, float]]


class ImageClassifier:
    """A trained :class:`VisionTransformer` and its preprocessing (see the module docstring)."""

    def __init__(self, model: VisionTransformer, preprocessing: Preprocessing, directory: Path) -> None:
        config = model.config
        if preprocessing.num_channels != config.num_channels:
            raise ImageModelError(
                f"{directory}: preprocessing.json says {preprocessing.num_channels} channels but config.json "
                f"{config.num_channels} (were files copied in from another run?)"
            )
        self.model, self.preprocessing, self.directory = model.eval(), preprocessing, directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ImageClassifier:
        """The classifier in ``directory`` on ``device`` (``"auto"``: CUDA when available); :class:`ImageModelError`
        if it is another kind of model, ``ValueError`` for CUDA without a GPU."""
        directory = Path(directory)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: CUDA is not available; use device 'cpu' or 'auto'")
        kind = model_type_of(directory)
        if kind is not None and kind != VisionTransformer.model_type:
            raise ImageModelError(
                f"{directory} holds a model of type {kind!r}, not an image classifier "
                f"({VisionTransformer.model_type!r})"
            )
        preprocessing = Preprocessing.read(directory / PREPROCESSING_FILE)
        model = load_model(directory, device=device)
        if not isinstance(model, VisionTransformer):
            raise ImageModelError(f"{directory} holds a {type(model).__name__}, not a VisionTransformer")
        return cls(model, preprocessing, directory)

    @property
    def class_names(self) -> list[str]:
        names = self.model.config.class_names
        return list(names) if names is not None else [str(i) for i in range(self.model.config.num_classes)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def read(self, path: str | Path) -> torch.Tensor:
        """The image file ``path`` as the model's training saw images: ``(C, H, W)`` in ``[0, 1]``, not normalized."""
        return read_image(path, self.preprocessing.image_size, channels=self.preprocessing.num_channels)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``images (..., C, H, W)`` in ``[0, 1]`` → the model's input (normalized, on its device)."""
        return self.preprocessing.normalization(images).to(self.device)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, H, W)`` in ``[0, 1]`` → ``(B, classes)`` class probabilities."""
        return self.model(self.normalize(images)).logits.float().softmax(dim=-1).cpu()

    def predict(self, paths: list[str | Path], *, top_k: int = 5) -> list[Prediction]:
        """The ``top_k`` most probable classes of each image file (``top_k`` is capped at the class count)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1; got {top_k!r}")
        images = torch.stack([self.read(p) for p in paths])
        probs = self.probabilities(images)
        values, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        names = self.class_names
        return [
            Prediction(str(path), [(names[int(i)], float(v)) for v, i in zip(row_v, row_i, strict=True)])
            for path, row_v, row_i in zip(paths, values, indices, strict=True)
        ]

    def evaluate(self, images: ImageSet) -> Scores:
        """Loss and confusion matrix on labelled ``images`` (``[0, 1]``, the model's size and channels)."""
        if images.class_names != self.class_names:
            raise ImageModelError(
                f"the images' classes {images.class_names} are not the model's {self.class_names}; evaluate needs "
                "a folder with one sub-folder per class the model knows, with the same names"
            )
        return score_images(self.model, images, self.preprocessing.normalization, self.device)

    def read_folder(self, root: str | Path) -> ImageSet:
        """A folder of class folders (``root/<class name>/*.png``) at the model's image size, labelled with the
        model's class indices; a folder may hold some of the model's classes, not one it does not know."""
        images = read_image_folder(root, self.preprocessing.image_size)
        names = self.class_names
        unknown = [name for name in images.class_names if name not in names]
        if unknown:
            raise ImageModelError(
                f"{root} has class folders {', '.join(map(repr, unknown))} that the model does not know; its classes: "
                f"{', '.join(names)}"
            )
        index = torch.tensor([names.index(name) for name in images.class_names], dtype=torch.long)
        images = ImageSet(images.images, index[images.labels], names, images.paths)
        if images.num_channels != self.preprocessing.num_channels:
            # Grey to RGB or back, as read() converts a single file.
            converted = torch.stack([self.read(p) for p in images.paths or []])
            images = ImageSet(converted, images.labels, images.class_names, images.paths)
        return images

    def test_split(self) -> ImageSet:
        """The test split of the data the model was trained on, as ``preprocessing.json`` records it: the
        built-in digits (always available) or the image folder (when it is still where it was)."""
        source = self.preprocessing.source
        root = source.get("images")
        if source.get("dataset") is None and not (isinstance(root, str) and Path(root).is_dir()):
            raise ImageModelError(
                f"the model in {self.directory} was trained on the images in {root!r}, which are not there now; "
                "give the folder to evaluate on with --images ROOT"
            )
        try:
            data = ImageDataConfig(
                dataset=source.get("dataset"),
                images=root if source.get("dataset") is None else None,
                image_size=self.preprocessing.image_size,
                valid_fraction=source.get("valid_fraction", 0.15),
                test_fraction=source.get("test_fraction", 0.15),
                split_seed=source.get("split_seed", 0),
            )
        except ConfigError as e:
            raise ImageModelError(f"{self.directory / PREPROCESSING_FILE}: {e}") from None
        return read_splits(data)[2]
