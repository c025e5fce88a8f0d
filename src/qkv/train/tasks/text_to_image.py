"""Text to image (``task: text_to_image``): a :class:`~qkv.models.text_to_image.TextToImageModel` trained by
rectified flow (:mod:`qkv.models.diffusion`) on captioned images.

::

    task: text_to_image
    data:
      corpus: scenes             # the built-in captioned scenes (qkv.data.scenes), generated from a seed, or
      folder: photos/            #   your images and a TSV of file<TAB>caption (with `captions:`)
      captions: photos/captions.tsv
      train_size: 4000           # scenes: split sizes, seed, objects, held-out (colour, shape) combinations
      held_out: [[green, triangle]]
      image_size: 32
      flip: true                 # mirror half the training images, swapping "left" and "right" in their captions
    model:                       # TextToImageConfig without the vocabulary, image size, channels, prompt length
      patch_size: 4
      d_model: 128
    training:
      batch_size: 64
      prompt_dropout: 0.1        # classifier-free guidance: the share of prompts replaced by the null prompt
      sample_steps: 20           # Euler steps and guidance of the end-of-training test (and the defaults
      guidance: 2.0              #   qkv generate / qkv show read from the model directory)
      test_prompts: 50
      grounding: 0.1             # the scenes only: pull each object word's cross-attention onto its object
      grounding_from: 0.5        #   (TokenCompose's loss, qkv.train.tasks.text_to_image_grounding), at t >= 0.5

A training batch is deterministic in its index (images, noise, times and dropped prompts drawn from generators
seeded by ``(training.seed, batch)``), so a resumed run sees exactly the batches of an uninterrupted one.
Validation reports ``loss``, the flow-matching loss on the valid split at fixed noise and times (cheap, and
comparable between validations). At the end the exported model generates ``test_prompts`` images for the
test scenes (combinations seen in training) and for the held-out ones, and :func:`qkv.data.scene_checker.judge`
scores them: ``faithfulness_seen`` and ``faithfulness_held_out``. With a folder of images there is no checker:
the test split's loss only.

The model directory holds ``config.json`` (the vocabulary is in it) + ``model.safetensors``, and
``text_to_image.json``: the corpus description and the sampling defaults (:mod:`qkv.train.t2i_inference`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from qkv.checks import ConfigError
from qkv.data.parallel import DataError
from qkv.data.scenes import Scene, build_scene_sets, caption_vocabulary
from qkv.models.diffusion import flow_loss, interpolate
from qkv.models.prompt_encoder import encode_prompts, prompt_words
from qkv.models.text_to_image import TextToImageModel
from qkv.train.ddp import barrier, shard_rows
from qkv.train.task import BatchLoss, Task, Validation
from qkv.train.tasks.text_to_image_batches import FlowBatch, FlowBatches, flow_draws
from qkv.train.tasks.text_to_image_config import (
    TextToImageDataConfig,
    TextToImageModelConfig,
    TextToImageTrainingConfig,
)
from qkv.train.tasks.text_to_image_grounding import grounding_loss, word_targets

T2I_FILE = "text_to_image.json"
EVAL_BATCH = 100
FAILURES_SHOWN = 3


@dataclass
class CaptionedSplit:
    """Images and their captions: ``images (N, C, H, W)`` float32 in ``[-1, 1]``; ``scenes`` for the built-in
    corpus (what the checker judges against), ``None`` for a folder."""

    images: torch.Tensor
    captions: list[str]
    scenes: list[Scene] | None = None

    def __len__(self) -> int:
        return len(self.captions)


def read_splits(data: TextToImageDataConfig) -> dict[str, CaptionedSplit]:
    """``{"train", "valid", "test", "held_out"}`` (no ``held_out`` for a folder) as the data section says."""
    if data.corpus is not None:
        sets = build_scene_sets(
            train=data.train_size,
            valid=data.valid_size,
            test=data.test_size,
            held_out_test=data.held_out_size,
            seed=data.seed,
            image_size=data.image_size,
            max_objects=data.max_objects,
            two_object_fraction=data.two_object_fraction,
            held_out=[(colour, shape) for colour, shape in data.held_out],
        )
        return {name: CaptionedSplit(s.images, s.captions, s.scenes) for name, s in sets.items()}
    from qkv.data.captioned_images import read_captioned_folder

    assert data.folder is not None and data.captions is not None, "TextToImageDataConfig.check requires both"
    found = read_captioned_folder(data.folder, data.captions, image_size=data.image_size)
    order = np.random.default_rng(data.split_seed).permutation(len(found.captions))
    n_valid = max(1, round(len(order) * data.valid_fraction))
    n_test = round(len(order) * data.test_fraction)
    if len(order) - n_valid - n_test < 1:
        raise DataError(
            f"{data.captions}: {len(order)} captioned images leave none for training after {n_valid} valid and "
            f"{n_test} test images; add images or lower data.valid_fraction / data.test_fraction"
        )
    parts = {"valid": order[:n_valid], "test": order[n_valid : n_valid + n_test], "train": order[n_valid + n_test :]}
    return {
        name: CaptionedSplit(found.images[torch.from_numpy(np.sort(rows))], [found.captions[i] for i in np.sort(rows)])
        for name, rows in parts.items()
    }


def corpus_vocabulary(data: TextToImageDataConfig, splits: Mapping[str, CaptionedSplit]) -> list[str]:
    """The scenes' caption vocabulary, or the sorted words of every caption of the folder."""
    if data.corpus is not None:
        return caption_vocabulary()
    return sorted({word for split in splits.values() for caption in split.captions for word in prompt_words(caption)})


@torch.no_grad()
def denoising_loss(model: nn.Module, split: CaptionedSplit, device: torch.device, seed: int) -> float:
    """The mean flow-matching loss of ``model`` on ``split`` with every prompt, at noise and times drawn from a
    generator seeded by ``seed`` (the same at every validation)."""
    assert isinstance(model, TextToImageModel), "the text-to-image task trains a TextToImageModel"
    c = model.config
    tokens, lengths = encode_prompts(split.captions, c.vocabulary, c.max_prompt_words)
    noise, times = flow_draws(np.random.default_rng((seed, 2)), tuple(split.images.shape), c.time_shift)
    total = 0.0
    for start in range(0, len(split), EVAL_BATCH):
        part = slice(start, start + EVAL_BATCH)
        x0, eps, t = split.images[part].to(device), noise[part].to(device), times[part].to(device)
        out = model(interpolate(x0, eps, t), t, tokens[part].to(device), lengths[part].to(device))
        total += float(flow_loss(out.velocity, x0, eps).sum())
    return total / max(len(split), 1)


@torch.no_grad()
def faithfulness(
    model: TextToImageModel, scenes: list[Scene], device: torch.device, *, steps: int, guidance: float, seed: int
) -> list[list[str]]:
    """Generate one image per scene caption (noise seeded by ``seed``) and judge it against the scene with
    :func:`qkv.data.scene_checker.judge`: the reasons each image is wrong (``[]``: right)."""
    from qkv.data.scene_checker import judge

    c = model.config
    shape = (len(scenes), c.num_channels, c.image_size, c.image_size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    reasons = []
    for start in range(0, len(scenes), EVAL_BATCH):
        part = scenes[start : start + EVAL_BATCH]
        captions, part_noise = [s.caption for s in part], noise[start : start + len(part)].to(device)
        images = model.generate(captions, part_noise, steps=steps, guidance=guidance).images
        reasons += [judge(image.cpu(), scene).reasons for image, scene in zip(images, part, strict=True)]
    return reasons


class TextToImageTask(Task):
    """``task: text_to_image`` (see the module docstring)."""

    name = "text_to_image"
    data_config = TextToImageDataConfig
    model_config = TextToImageModelConfig
    training_config = TextToImageTrainingConfig
    metrics: ClassVar[tuple[str, ...]] = ("loss",)
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"loss"})

    splits: dict[str, CaptionedSplit]
    vocabulary: list[str]

    @property
    def data(self) -> TextToImageDataConfig:
        data: TextToImageDataConfig = self.config.data
        return data

    @property
    def options(self) -> TextToImageTrainingConfig:
        options: TextToImageTrainingConfig = self.config.task_training
        return options

    def prepare(self, *, resume: bool) -> None:
        self.splits = read_splits(self.data)
        if len(self.splits["valid"]) == 0:
            raise ConfigError("the validation split is empty; use a larger data.valid_size or data.valid_fraction")
        self.vocabulary = corpus_vocabulary(self.data, self.splits)
        self.max_words = max(len(prompt_words(c)) for split in self.splits.values() for c in split.captions)
        if self.ctx.is_main:
            (self.config.output_dir / T2I_FILE).write_text(json.dumps(self.description(), indent=2) + "\n")
        barrier(self.ctx)

    def description(self) -> dict[str, Any]:
        """``text_to_image.json``: the corpus and the sampling defaults of ``qkv generate`` / ``qkv show``."""
        o = self.options
        return {"corpus": self.data.describe(), "sampling": {"steps": o.sample_steps, "guidance": o.guidance}}

    def describe(self) -> str:
        s = self.splits
        source = "the built-in scenes" if self.data.corpus else self.data.folder
        held = f", {len(s['held_out']):,} held-out" if "held_out" in s else ""
        image = s["train"].images.shape[1:]
        return (
            f"{len(s['train']):,} training images, {len(s['valid']):,} valid, {len(s['test']):,} test{held} from "
            f"{source} ({image[0]}x{image[1]}x{image[2]}, {len(self.vocabulary)} words)"
        )

    def build_model(self) -> nn.Module:
        images = self.splits["train"].images
        config = self.config.model.build(
            vocabulary=self.vocabulary,
            image_size=int(images.shape[-1]),
            num_channels=int(images.shape[1]),
            max_prompt_words=self.max_words,
        )
        return TextToImageModel(config)

    def train_batches(self) -> FlowBatches:
        train = self.splits["train"]
        tokens, lengths = encode_prompts(train.captions, self.vocabulary, self.max_words)
        o = self.options
        mirror = None
        if self.data.flip:
            if not {"left", "right"} <= set(self.vocabulary):
                raise ConfigError(
                    "data.flip swaps the words 'left' and 'right' of a flipped image's caption, but the captions do "
                    "not use both; set data.flip: false"
                )
            mirror = (self.vocabulary.index("left"), self.vocabulary.index("right"))
        targets = None
        if o.grounding:
            if train.scenes is None:
                raise ConfigError(
                    f"training.grounding ({o.grounding:g}) pulls each word's attention onto its object, which only the "
                    "built-in scenes know (data.corpus: scenes); set training.grounding: 0 for a folder of images"
                )
            patch = self.config.model.patch_size
            targets = word_targets(train.scenes, int(tokens.shape[1]), int(train.images.shape[-1]), patch)
        seed = self.config.training.seed
        return FlowBatches(
            train,
            tokens,
            lengths,
            batch_size=o.batch_size,
            seed=seed,
            prompt_dropout=o.prompt_dropout,
            mirror=mirror,
            time_shift=self.config.model.time_shift,
            shifted_times=o.shifted_times,
            targets=targets,
        )

    def batch_tokens(self, batch: FlowBatch) -> int:
        return int(batch.images.shape[0])

    def shard(self, batch: FlowBatch) -> tuple[FlowBatch, float]:
        if not self.ctx.distributed:
            return batch, 1.0
        rows = shard_rows(range(batch.images.shape[0]), self.ctx)
        return (batch.rows(rows), 1.0) if rows else (batch.rows([0]), 0.0)

    def loss(self, model: nn.Module, batch: FlowBatch, device: torch.device) -> BatchLoss:
        b = batch.to(device)
        grounded = b.targets.ndim == 4
        x_t = interpolate(b.images, b.noise, b.times)
        out = model(x_t, b.times, b.tokens, b.lengths, drop=b.drop, need_attention=grounded)
        flow = flow_loss(out.velocity, b.images, b.noise).sum()
        loss = flow
        if grounded:
            assert out.cross_attention is not None
            late = b.times < self.options.grounding_from  # the last steps, where the shapes' edges are drawn
            grounding = grounding_loss(out.cross_attention, b.targets, b.drop | late).sum()
            loss = flow + self.options.grounding * grounding
        return BatchLoss(loss=loss, nll=float(flow.detach()), tokens=self.batch_tokens(batch))

    def validate(self, model: nn.Module, device: torch.device, step: int) -> Validation:
        loss = denoising_loss(model, self.splits["valid"], device, self.config.training.seed)
        line = f"  {len(self.splits['valid'])} valid images, loss {loss:.4f}"
        return Validation(metrics={"loss": loss}, lines=[line])

    def score_test(self, model: nn.Module, device: torch.device) -> Validation | None:
        test = self.splits["test"]
        if len(test) == 0:
            return None
        assert isinstance(model, TextToImageModel), "the text-to-image task trains a TextToImageModel"
        found = Validation(metrics={"loss": denoising_loss(model, test, device, self.config.training.seed)})
        o = self.options
        for name, key in (("test", "seen"), ("held_out", "held_out")):
            split = self.splits.get(name)
            if split is None or split.scenes is None or not len(split) or not o.test_prompts:
                continue
            scenes = split.scenes[: o.test_prompts]
            reasons = faithfulness(
                model, scenes, device, steps=o.sample_steps, guidance=o.guidance, seed=self.config.training.seed
            )
            right = sum(not r for r in reasons)
            found.metrics[f"faithfulness_{key}"] = right / len(scenes)
            what = "held-out combinations" if key == "held_out" else "combinations seen in training"
            found.lines.append(
                f"  {name} prompts ({what}): {right}/{len(scenes)} images judged faithful "
                f"({right / len(scenes):.1%}; {o.sample_steps} steps, guidance {o.guidance:g})"
            )
            failures = [(s.caption, r) for s, r in zip(scenes, reasons, strict=True) if r][:FAILURES_SHOWN]
            found.lines += [f"    ✗ {caption!r}: {'; '.join(r)}" for caption, r in failures]
            found.extra[f"failures_{key}"] = [{"prompt": c, "reasons": r} for c, r in failures]
        return found
