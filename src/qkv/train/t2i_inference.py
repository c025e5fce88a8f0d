"""Using a text-to-image model ``qkv train`` wrote (``task: text_to_image``): generate images, and read the
cross-attention behind them.

A model directory holds ``config.json`` + ``model.safetensors`` (a
:class:`~qkv.models.text_to_image.TextToImageModel`, its vocabulary in the config) and ``text_to_image.json``
(written by :class:`~qkv.train.tasks.text_to_image.TextToImageTask`: the corpus it was trained on and the
default sampling steps and guidance)::

    t2i = TextToImage.load("runs/demo-t2i")
    out = t2i.generate("a green triangle above a red circle", num=4, seed=0, need_attention=True)
    out.images  # (4, 3, 32, 32) in [0, 1]
    out.cross_attention  # (4, layers, heads, 64, 7): patches x words, averaged over the sampling steps
    write_png(out.images, "img.png")  # the 4 images side by side

:meth:`TextToImage.attend` reads the cross-attention a given image (a rendered scene, say) draws from a
prompt: the image noised to a few times of the flow and denoised once at each (DAAM's reading of real
images), so word maps can be compared on generated and on ground-truth images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkv.checks import int_at_least
from qkv.data.scenes import Scene
from qkv.models.checkpoint import load_model
from qkv.models.diffusion import check_sampling, interpolate
from qkv.models.prompt_encoder import prompt_words
from qkv.models.text_to_image import TextToImageModel
from qkv.safe_files import read_json_file
from qkv.train.lm_inference import model_type_of
from qkv.train.tasks.text_to_image import T2I_FILE, read_splits
from qkv.train.tasks.text_to_image_config import TextToImageDataConfig

MAX_DESCRIPTION_BYTES = 1 << 20
ATTEND_TIMES = (0.3, 0.5, 0.7)  # where on the flow attend() reads a given image's cross-attention
GAP_PIXELS = 2
GAP_VALUE = 0.5  # grey between the images of a strip (the scenes' background is black)


class T2IModelError(ValueError):
    """A model directory that is not a usable text-to-image model; the message names the file and the fault."""


@dataclass
class GeneratedImages:
    """Images for one prompt.

    Attributes:
        prompt: the prompt. words: its words, the columns of ``cross_attention``.
        images: ``(K, C, H, W)`` in ``[0, 1]``.
        cross_attention: ``(K, layers, heads, N, S)``, averaged over the sampling steps (``N = h·w`` patches,
            row-major; ``S = len(words)``), or ``None``.
        grid: ``(h, w)`` patches per column and per row.
    """

    prompt: str
    words: list[str]
    images: torch.Tensor
    cross_attention: torch.Tensor | None
    grid: tuple[int, int]


def _read_description(path: Path) -> dict[str, Any]:
    try:
        data = read_json_file(path, MAX_DESCRIPTION_BYTES)
    except FileNotFoundError:
        raise T2IModelError(
            f"{path} is missing: the model directory of a text-to-image model (task: text_to_image) has one beside "
            "config.json"
        ) from None
    except (OSError, ValueError) as e:
        raise T2IModelError(f"{path}: cannot be read as JSON ({e})") from None
    sampling = data.get("sampling") if isinstance(data, dict) else None
    if not isinstance(data.get("corpus"), dict) or not isinstance(sampling, dict):
        raise T2IModelError(f"{path}: expected a JSON object with 'corpus' and 'sampling' objects")
    try:
        check_sampling(sampling.get("steps"), sampling.get("guidance"))
    except ValueError as e:
        raise T2IModelError(f"{path}: sampling: {e}") from None
    return data


class TextToImage:
    """A trained :class:`TextToImageModel` and what its directory says about it (see the module docstring)."""

    def __init__(self, model: TextToImageModel, description: dict[str, Any], directory: Path) -> None:
        self.model, self.description, self.directory = model.eval(), description, directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> TextToImage:
        """The model in ``directory`` on ``device``; :class:`T2IModelError` if it is another kind of model."""
        directory = Path(directory)
        kind = model_type_of(directory)
        if kind is not None and kind != TextToImageModel.model_type:
            raise T2IModelError(
                f"{directory} holds a model of type {kind!r}, not a text-to-image model "
                f"({TextToImageModel.model_type!r})"
            )
        description = _read_description(directory / T2I_FILE)
        model = load_model(directory, device=device)
        if not isinstance(model, TextToImageModel):
            raise T2IModelError(f"{directory} holds a {type(model).__name__}, not a TextToImageModel")
        return cls(model, description, directory)

    @property
    def device(self) -> torch.device:
        return self.model.positions.device

    @property
    def steps(self) -> int:
        """The default Euler steps (the training run's ``sample_steps``)."""
        return int(self.description["sampling"]["steps"])

    @property
    def guidance(self) -> float:
        """The default classifier-free guidance (the training run's ``guidance``)."""
        return float(self.description["sampling"]["guidance"])

    def generate(
        self,
        prompt: str,
        *,
        num: int = 1,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        need_attention: bool = False,
    ) -> GeneratedImages:
        """``num`` images of ``prompt`` (noise seeded by ``seed``; ``None``: a fresh seed), sampled in ``steps``
        Euler steps with ``guidance`` (defaults: the directory's).

        Raises:
            ConfigError: an empty prompt, a word outside the vocabulary, ``num`` or ``steps`` < 1, ``guidance``
                < 0.
        """
        steps, guidance = check_sampling(
            self.steps if steps is None else steps, self.guidance if guidance is None else guidance
        )
        num = int_at_least("num", num)
        words = prompt_words(prompt)
        c = self.model.config
        generator = torch.Generator()
        generator.manual_seed(seed) if seed is not None else generator.seed()
        noise = torch.randn(num, c.num_channels, c.image_size, c.image_size, generator=generator)
        out = self.model.generate([prompt] * num, noise, steps=steps, guidance=guidance, need_attention=need_attention)
        images = ((out.images.float().cpu() + 1) / 2).clamp(0, 1)
        attention = None if out.cross_attention is None else out.cross_attention.cpu()
        return GeneratedImages(prompt, words, images, attention, c.grid)

    @torch.no_grad()
    def attend(
        self, image: torch.Tensor, prompt: str, *, times: Sequence[float] = ATTEND_TIMES, seed: int = 0
    ) -> torch.Tensor:
        """The cross-attention to the words ``(layers, heads, N, S)`` that ``image (C, H, W)`` (in ``[-1, 1]``)
        draws from ``prompt``: the mean over ``times`` of the denoiser's weights at the image noised to each time (noise
        seeded by ``seed``)."""
        c = self.model.config
        if tuple(image.shape) != (c.num_channels, c.image_size, c.image_size):
            raise ValueError(
                f"image must have shape ({c.num_channels}, {c.image_size}, {c.image_size}); got {tuple(image.shape)}"
            )
        memory, lengths = self.model.encode_prompts([prompt] * len(times))
        x0 = image.to(self.device, memory.dtype)[None].expand(len(times), -1, -1, -1)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
        t = torch.tensor(list(times), dtype=x0.dtype, device=x0.device)
        out = self.model.denoise(interpolate(x0, noise, t), t, memory, lengths, need_attention=True)
        assert out.cross_attention is not None, "denoise returns the cross-attention when asked for it"
        return out.cross_attention[..., 1:].float().mean(dim=0).cpu()  # the start token's column dropped

    def data(self) -> TextToImageDataConfig:
        """The ``data:`` section the model was trained with, from ``text_to_image.json``."""
        try:
            return TextToImageDataConfig.from_dict(self.description["corpus"], "corpus")
        except ValueError as e:
            raise T2IModelError(f"{self.directory / T2I_FILE}: {e}") from None

    def scenes(self, split: str) -> list[Scene]:
        """The built-in corpus' ``split`` (``test``: combinations seen in training, ``held_out``: held-out ones),
        rebuilt from its seed; :class:`T2IModelError` for a model trained on a folder of images."""
        data = self.data()
        if data.corpus is None:
            raise T2IModelError(
                f"{self.directory} was trained on the images in {data.folder}, not on the built-in scenes"
            )
        scenes = read_splits(data)[split].scenes
        assert scenes is not None, "the built-in corpus has scenes"
        return scenes


def image_strip(images: torch.Tensor) -> np.ndarray:
    """``(K, C, H, W)`` in ``[0, 1]`` → one ``(H, K·W + (K-1)·gap, C)`` uint8 picture, grey between images."""
    k, c, h, w = images.shape
    strip = np.full((h, k * w + (k - 1) * GAP_PIXELS, c), round(GAP_VALUE * 255), dtype=np.uint8)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i in range(k):
        strip[:, i * (w + GAP_PIXELS) : i * (w + GAP_PIXELS) + w] = pixels[i]
    return strip


def write_png(images: torch.Tensor, path: str | Path) -> Path:
    """Write ``images (K, C, H, W)`` in ``[0, 1]`` to ``path`` as one PNG, side by side, at their own size."""
    from PIL import Image

    strip = image_strip(images)
    path = Path(path)
    Image.fromarray(strip[..., 0] if strip.shape[2] == 1 else strip).save(path, format="PNG")
    return path
