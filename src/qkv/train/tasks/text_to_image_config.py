"""The config sections of the text-to-image task: ``data:``, ``model:`` and its own ``training:`` keys.

``data:`` names the built-in captioned scenes (``corpus: scenes``, :mod:`qkv.data.scenes`, with its sizes,
seed and held-out combinations) or the user's images (``folder`` + ``captions``, a TSV of
``file<TAB>caption``, split by ``valid_fraction`` / ``test_fraction``). ``model:`` is
:class:`~qkv.models.text_to_image.TextToImageConfig` without what the data sets (the vocabulary, the image
size and channels, the longest prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from qkv.checks import (
    ConfigError,
    StrictConfig,
    boolean,
    fraction,
    int_at_least,
    non_negative_number,
    number_between,
    one_of,
    option,
    optional,
    probability,
    qualified,
    short_repr,
    text,
)
from qkv.data.scenes import COLOURS, HELD_OUT_DEFAULT, MIN_IMAGE_SIZE, SHAPES
from qkv.models.text_to_image import TextToImageConfig

SCENES = "scenes"
CORPORA = (SCENES,)
# TextToImageConfig fields that come from the data, not from the model section.
DERIVED = ("vocabulary", "image_size", "num_channels", "max_prompt_words")


def _held_out(name: str, value: Any) -> list[list[str]]:
    """A list of ``[colour, shape]`` pairs of the scenes' palette and shapes."""
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list of [colour, shape] pairs, e.g. [[green, triangle]]; got {value!r}")
    pairs = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"{name}[{i}] must be a [colour, shape] pair; got {short_repr(pair)}")
        pairs.append([one_of(f"{name}[{i}][0]", pair[0], COLOURS), one_of(f"{name}[{i}][1]", pair[1], SHAPES)])
    return pairs


@dataclass
class TextToImageDataConfig(StrictConfig):
    """The ``data:`` section: ``corpus: scenes`` and its keys, or ``folder`` + ``captions`` and theirs; for both,
    ``image_size`` and ``flip`` (training augmentation: half the images mirrored, ``left`` and ``right`` swapped
    in their captions)."""

    corpus: str | None = option(None, optional(one_of), CORPORA)
    train_size: int = option(4000, int_at_least, 1)
    valid_size: int = option(200, int_at_least, 1)
    test_size: int = option(200, int_at_least, 0)
    held_out_size: int = option(200, int_at_least, 0)
    seed: int = option(0, int_at_least, 0)
    max_objects: int = option(2, int_at_least, 1)
    two_object_fraction: float = option(0.5, number_between, 0.0, 1.0)
    held_out: list[list[str]] = option([list(pair) for pair in HELD_OUT_DEFAULT], _held_out)
    folder: str | None = option(None, optional(text))
    captions: str | None = option(None, optional(text))
    valid_fraction: float = option(0.1, fraction)
    test_fraction: float = option(0.1, fraction)
    split_seed: int = option(0, int_at_least, 0)
    image_size: int = option(32, int_at_least, MIN_IMAGE_SIZE)
    flip: bool = option(False, boolean)

    def check(self, prefix: str) -> None:
        def key(name: str) -> str:
            return qualified(prefix, name)

        if (self.corpus is None) == (self.folder is None):
            raise ConfigError(
                f"give either {key('corpus')} (built-in: {', '.join(CORPORA)}) or {key('folder')} and "
                f"{key('captions')} (your images and a TSV of file<TAB>caption)"
                + (", not both" if self.corpus is not None else "")
            )
        if (self.folder is None) != (self.captions is None):
            raise ConfigError(f"{key('folder')} and {key('captions')} go together: give both or neither")
        if self.max_objects > 2:
            raise ConfigError(f"{key('max_objects')} must be 1 or 2; got {self.max_objects}")
        if self.corpus is not None and self.held_out_size and not self.held_out:
            raise ConfigError(f"{key('held_out_size')} is {self.held_out_size} but {key('held_out')} is empty")
        if self.folder is not None and self.valid_fraction == 0:
            raise ConfigError(f"{key('valid_fraction')} must be > 0: training validates on it")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"{key('valid_fraction')} + {key('test_fraction')} must be < 1 (the rest is the training split); "
                f"got {self.valid_fraction} + {self.test_fraction}"
            )

    def describe(self) -> dict[str, Any]:
        """The corpus as the model directory records it (``text_to_image.json``): the keys that say where the
        images came from, for the scenes or for the folder."""
        if self.corpus is not None:
            keys = ["corpus", "train_size", "valid_size", "test_size", "held_out_size", "seed", "max_objects",
                    "two_object_fraction", "held_out", "image_size"]  # fmt: skip
        else:
            keys = ["folder", "captions", "valid_fraction", "test_fraction", "split_seed", "image_size"]
        return {k: getattr(self, k) for k in keys}


_MODEL_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TextToImageConfig) if f.name not in DERIVED}


@dataclass
class TextToImageModelConfig(StrictConfig):
    """The ``model:`` section: :class:`~qkv.models.text_to_image.TextToImageConfig` without what the data sets.
    Values are checked by ``TextToImageConfig``."""

    patch_size: int = _MODEL_DEFAULTS["patch_size"]
    d_model: int = _MODEL_DEFAULTS["d_model"]
    num_layers: int = _MODEL_DEFAULTS["num_layers"]
    num_heads: int = _MODEL_DEFAULTS["num_heads"]
    ffn_dim: int = _MODEL_DEFAULTS["ffn_dim"]
    text_layers: int = _MODEL_DEFAULTS["text_layers"]
    text_attention: str = _MODEL_DEFAULTS["text_attention"]
    pooled_text: bool = _MODEL_DEFAULTS["pooled_text"]
    time_shift: float = _MODEL_DEFAULTS["time_shift"]
    layer_norm_eps: float = _MODEL_DEFAULTS["layer_norm_eps"]

    def check(self, prefix: str) -> None:
        # The image size is the data's: a multiple of the patch checks all but divisibility, which build() does.
        patch = self.patch_size if isinstance(self.patch_size, int) and self.patch_size > 0 else 1
        self.build(vocabulary=["a"], image_size=patch, num_channels=3, max_prompt_words=1, prefix=prefix)

    def build(
        self, *, vocabulary: list[str], image_size: int, num_channels: int, max_prompt_words: int, prefix: str = "model"
    ) -> TextToImageConfig:
        """The :class:`TextToImageConfig` for these words and images."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.patch_size, int) and self.patch_size > 0 and image_size % self.patch_size:
            raise ConfigError(
                f"{qualified(prefix, 'patch_size')} ({self.patch_size}) must divide the image size ({image_size}, "
                "data.image_size)"
            )
        try:
            return TextToImageConfig(
                vocabulary=vocabulary,
                image_size=image_size,
                num_channels=num_channels,
                max_prompt_words=max_prompt_words,
                **params,
            )
        except (ValueError, TypeError) as e:
            message = str(e)
            named = any(message.startswith(key) for key in params)
            raise ConfigError(qualified(prefix, message) if named else f"{prefix}: {message}") from None


@dataclass
class TextToImageTrainingConfig(StrictConfig):
    """The ``training:`` keys only text to image reads.

    Attributes:
        batch_size: images per batch.
        prompt_dropout: the share of training images whose prompt is replaced by the null prompt (what
            classifier-free guidance contrasts with).
        shifted_times: the share of training images whose time is shifted toward the noise by the model's
            ``time_shift`` (where the layout is decided); the others keep the unshifted logit-normal times
            (where the shapes are).
        sample_steps, guidance: how the end-of-training faithfulness test samples, and the defaults the model
            directory records for ``qkv generate`` / ``qkv show``.
        test_prompts: prompts of each test split (seen combinations, held-out ones) generated and judged at the
            end (0: none).
        grounding: the weight of the grounding loss (:mod:`~qkv.train.tasks.text_to_image_grounding`: each object
            word's cross-attention pulled onto its object; the built-in scenes only, which know where the objects
            are); 0: none.
        grounding_from: the grounding loss counts only images noised to this time or more (the sampler's early
            steps, where the layout is decided), leaving the last steps, which draw the shapes' edges, free.
    """

    batch_size: int = option(64, int_at_least, 1)
    prompt_dropout: float = option(0.1, probability)
    shifted_times: float = option(1.0, number_between, 0.0, 1.0)
    sample_steps: int = option(20, int_at_least, 1)
    guidance: float = option(2.0, non_negative_number)
    test_prompts: int = option(50, int_at_least, 0)
    grounding: float = option(0.0, non_negative_number)
    grounding_from: float = option(0.0, number_between, 0.0, 1.0)
