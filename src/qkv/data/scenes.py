"""The built-in captioned scenes for text to image: one or two coloured shapes on a plain background, each
with a caption that says what is where, generated offline from a seed.

::

    sets = build_scene_sets(train=4000, valid=200, test=200, held_out_test=200, seed=0)
    sets["train"].images  # (N, 3, 32, 32) float in [-1, 1]
    sets["train"].scenes[0].caption  # "a red circle left of a small blue square"
    image, masks = render(sets["held_out"].scenes[0])  # (32, 32, 3) uint8, one (32, 32) bool mask per object
    parse_caption("a green triangle above a red circle")  # CaptionSpec: what the checker looks for

The renderer knows where every object is, which makes a generated image checkable
(:mod:`qkv.data.scene_checker`). The geometry is defined on a 32 x 32 canvas and scaled to ``image_size``:

- an object is a circle (its diameter), a square (its side) or an upward triangle (base and height) of
  :data:`SIZES` pixels, filled with one :data:`COLOURS` colour on the :data:`BACKGROUND`; pixels are in or
  out (no anti-aliasing), so a mask's pixels have exactly the palette colour;
- a two-object scene is placed so its relation holds with a clear margin: along the relation's axis the
  objects' boxes are :data:`GAP` pixels apart or more (so the masks are disjoint), and across it the centres
  are displaced by at most half as much as along it (:func:`relation_holds` needs only "more along than
  across"). Its two objects differ in colour and in shape, so each content word of the caption names one
  object (the word-map pointing game is then unambiguous) and getting a caption right needs the binding of
  each colour to its shape.

Captions follow the grammar of :mod:`qkv.data.scene_captions` (re-exported here: :func:`parse_caption`,
:func:`caption_vocabulary`, :func:`describe`), with one of two templates each ("a red circle" / "there is
a red circle"; "a red circle left of a blue square" / "... is left of ..."), the size word in half of the
objects.

One-object captions carry no position word ("a red circle", not "a red circle on the left"): the only
spatial words are the relations between two objects, the thing cross-attention must bind, and absolute
positions would add words the generator must learn and the checker must judge without testing anything
the relations do not. A one-object scene's position is uniform over the canvas.

Held-out combinations (``HELD_OUT_DEFAULT``: every green triangle) appear in no train / valid / test scene
and in every ``held_out`` scene, which measures whether a generator composes a colour and a shape it has
only seen apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qkv.checks import int_at_least, number_between, one_of
from qkv.data.parallel import DataError
from qkv.data.scene_captions import (
    COLOUR_WORDS,
    RELATIONS,
    SHAPES,
    SIZE_WORDS,
    CaptionSpec,
    ObjectSpec,
    caption_vocabulary,
    describe,
    parse_caption,
)

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "HELD_OUT_DEFAULT",
    "MIN_IMAGE_SIZE",
    "REFERENCE_SIZE",
    "RELATIONS",
    "SCENE_SPLITS",
    "SHAPES",
    "SIZES",
    "CaptionSpec",
    "ObjectSpec",
    "Scene",
    "SceneObject",
    "SceneSet",
    "build_scene_sets",
    "caption_vocabulary",
    "describe",
    "is_held_out",
    "object_mask",
    "parse_caption",
    "relation_holds",
    "render",
    "sample_scene",
    "shape_mask",
    "to_unit_range",
]

COLOURS: dict[str, tuple[int, int, int]] = dict(
    zip(COLOUR_WORDS, [(220, 40, 40), (30, 180, 60), (50, 90, 230), (240, 220, 40)], strict=True)
)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
REFERENCE_SIZE = 32
SIZES: dict[str, int] = dict(zip(SIZE_WORDS, (9, 14), strict=True))  # pixels at REFERENCE_SIZE
HELD_OUT_DEFAULT: tuple[tuple[str, str], ...] = (("green", "triangle"),)
MARGIN = 0.5  # pixels (at REFERENCE_SIZE) between an object's box and the image border, at least
GAP = 2.0  # pixels (at REFERENCE_SIZE) between two objects' boxes along their relation's axis, at least
ACROSS_RATIO = 0.5  # across the relation's axis, the centres move at most this share of their distance along it
MIN_IMAGE_SIZE = 16
MAX_DRAWS = 10_000  # scenes drawn for one that ``exclude`` accepts before giving up

_RELATION_AXIS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}  # (axis, sign)


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``x, y`` its box's centre as a share of the image width / height (``y`` grows downward)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Scene:
    """One or two objects and the caption that describes them; for two, ``objects[0] <relation> objects[1]``."""

    objects: tuple[SceneObject, ...]
    relation: str | None
    caption: str

    def words(self) -> list[str]:
        """The caption's words as the tokenizer sees them (lowercase, split on spaces)."""
        return self.caption.lower().split()


def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    """Whether the centre ``first = (x, y)`` is ``relation`` of the centre ``second`` (``y`` grows downward):
    it is displaced in the relation's direction by more than it is displaced across it."""
    axis, sign = _RELATION_AXIS[one_of("relation", relation, RELATIONS)]
    along = sign * (first[axis] - second[axis])
    across = first[1 - axis] - second[1 - axis]
    return along > abs(across)


# ---- rendering ------------------------------------------------------------------------------------------------


def shape_mask(shape: str, centre: tuple[float, float], side: float, image_size: int) -> np.ndarray:
    """``(image_size, image_size)`` bool: the pixels whose centres lie inside ``shape`` with its box centred at
    ``centre = (x, y)`` and ``side`` wide and high (pixels, ``y`` down; a triangle's apex at the top centre)."""
    cx, cy = centre
    coords = np.arange(image_size) + 0.5
    px, py = coords[None, :], coords[:, None]
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 < (side / 2) ** 2
    top, bottom = cy - side / 2, cy + side / 2
    if shape == "square":
        return (px >= cx - side / 2) & (px < cx + side / 2) & (py >= top) & (py < bottom)
    if shape == "triangle":  # the half-width grows from 0 at the apex to side / 2 at the base
        return (py >= top) & (py < bottom) & (np.abs(px - cx) < (py - top) / 2)
    raise DataError(f"shape must be one of {', '.join(map(repr, SHAPES))}; got {shape!r}")


def object_mask(obj: SceneObject, image_size: int) -> np.ndarray:
    """``(image_size, image_size)`` bool: the pixels of ``obj`` at ``image_size``."""
    side = SIZES[obj.size] * image_size / REFERENCE_SIZE
    return shape_mask(obj.shape, (obj.x * image_size, obj.y * image_size), side, image_size)


def render(scene: Scene, image_size: int = 32) -> tuple[np.ndarray, list[np.ndarray]]:
    """The scene drawn: ``(H, W, 3)`` uint8 image (``H = W = image_size``) on :data:`BACKGROUND`, and one
    ``(H, W)`` bool mask per object (its true pixels, in ``scene.objects`` order)."""
    int_at_least("image_size", image_size, MIN_IMAGE_SIZE, error=DataError)
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    masks = []
    for obj in scene.objects:
        mask = object_mask(obj, image_size)
        image[mask] = COLOURS[obj.colour]
        masks.append(mask)
    return image, masks


def to_unit_range(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 as ``(3, H, W)`` float32 in ``[-1, 1]`` (the generator's pixel range)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 127.5 - 1.0


# ---- sampling -------------------------------------------------------------------------------------------------


def _span(side: float) -> tuple[float, float]:
    """The range of a centre coordinate (pixels at REFERENCE_SIZE) that keeps a box of ``side`` inside."""
    return MARGIN + side / 2, REFERENCE_SIZE - MARGIN - side / 2


def _place_pair(rng: np.random.Generator, sides: tuple[float, float], relation: str) -> list[tuple[float, float]]:
    """Centres (pixels at REFERENCE_SIZE) of two boxes of ``sides`` with ``first <relation> second``."""
    axis, sign = _RELATION_AXIS[relation]
    low, high = (0, 1) if sign < 0 else (1, 0)  # which object has the smaller coordinate along the axis
    low_span, high_span = _span(sides[low]), _span(sides[high])
    distance = rng.uniform((sides[0] + sides[1]) / 2 + GAP, high_span[1] - low_span[0])
    start = rng.uniform(max(low_span[0], high_span[0] - distance), min(low_span[1], high_span[1] - distance))
    along = {low: start, high: start + distance}
    across_first = rng.uniform(*_span(sides[0]))
    span_second = _span(sides[1])
    reach = ACROSS_RATIO * distance
    across_second = rng.uniform(max(span_second[0], across_first - reach), min(span_second[1], across_first + reach))
    across = (across_first, across_second)
    return [(along[i], across[i]) if axis == 0 else (across[i], along[i]) for i in (0, 1)]


def _draw_scene(rng: np.random.Generator, num_objects: int) -> Scene:
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    colour = [colours[rng.integers(len(colours))]]
    shape = [shapes[rng.integers(len(shapes))]]
    if num_objects == 2:  # a different colour and a different shape
        others = [c for c in colours if c != colour[0]]
        colour.append(others[rng.integers(len(others))])
        other_shapes = [s for s in shapes if s != shape[0]]
        shape.append(other_shapes[rng.integers(len(other_shapes))])
    size = [sizes[rng.integers(len(sizes))] for _ in range(num_objects)]
    named = [bool(rng.random() < 0.5) for _ in range(num_objects)]
    template = int(rng.integers(2))
    sides = [float(SIZES[s]) for s in size]
    if num_objects == 1:
        relation = None
        centres = [(rng.uniform(*_span(sides[0])), rng.uniform(*_span(sides[0])))]
    else:
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        centres = _place_pair(rng, (sides[0], sides[1]), relation)
    objects = tuple(
        SceneObject(shape[i], colour[i], size[i], centres[i][0] / REFERENCE_SIZE, centres[i][1] / REFERENCE_SIZE)
        for i in range(num_objects)
    )
    spec = CaptionSpec(
        tuple(ObjectSpec(o.colour, o.shape, o.size if named[i] else None) for i, o in enumerate(objects)), relation
    )
    return Scene(objects, relation, describe(spec, template=template))


def _check_counts(max_objects: int, two_object_fraction: float, num_objects: int | None) -> None:
    for name, value in (("max_objects", max_objects), ("num_objects", num_objects)):
        if value is not None and (isinstance(value, bool) or value not in (1, 2)):
            raise DataError(f"{name} must be 1 or 2; got {value!r}")
    number_between("two_object_fraction", two_object_fraction, 0.0, 1.0, error=DataError)


def sample_scene(
    rng: np.random.Generator,
    *,
    max_objects: int = 2,
    two_object_fraction: float = 0.5,
    exclude: Callable[[Scene], bool] | None = None,
    num_objects: int | None = None,
) -> Scene:
    """A random scene drawn with ``rng``; redrawn while ``exclude(scene)`` is true.

    Args:
        rng: the generator every choice is drawn from (the same state gives the same scene).
        max_objects: 1 or 2.
        two_object_fraction: the chance of two objects when ``max_objects`` is 2, in ``[0, 1]``.
        exclude: scenes to redraw (e.g. those with a held-out combination).
        num_objects: 1 or 2 to fix the count (then ``max_objects`` and ``two_object_fraction`` are unused).
    Raises:
        DataError: a bad argument, or no scene that ``exclude`` accepts in :data:`MAX_DRAWS` draws.
    """
    _check_counts(max_objects, two_object_fraction, num_objects)
    for _ in range(MAX_DRAWS):
        count = num_objects or (2 if max_objects == 2 and rng.random() < two_object_fraction else 1)
        scene = _draw_scene(rng, count)
        if exclude is None or not exclude(scene):
            return scene
    raise DataError(f"no scene that exclude accepts in {MAX_DRAWS:,} draws; expected a filter that some scenes pass")


def is_held_out(scene: Scene, held_out: Sequence[tuple[str, str]]) -> bool:
    """Whether any object of ``scene`` has a ``(colour, shape)`` in ``held_out``."""
    return any((obj.colour, obj.shape) in held_out for obj in scene.objects)


def _check_held_out(held_out: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for i, pair in enumerate(held_out):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataError(f"held_out[{i}] must be a (colour, shape) pair; got {pair!r}")
        pairs.append((one_of(f"held_out[{i}] colour", pair[0], COLOURS, error=DataError),
                      one_of(f"held_out[{i}] shape", pair[1], SHAPES, error=DataError)))  # fmt: skip
    return tuple(pairs)


def _split_filter(held_out: tuple[tuple[str, str], ...], want_held_out: bool) -> Callable[[Scene], bool]:
    """The ``exclude`` of a split: scenes with (``want_held_out``) or without a held-out combination pass."""

    def exclude(scene: Scene) -> bool:
        return is_held_out(scene, held_out) != want_held_out

    return exclude


# ---- the splits -----------------------------------------------------------------------------------------------


@dataclass
class SceneSet:
    """Rendered scenes: ``images (N, 3, H, W)`` float32 in ``[-1, 1]``, ``masks[i][j]`` the ``(H, W)`` bool
    mask of object ``j`` of scene ``i``."""

    scenes: list[Scene]
    images: torch.Tensor
    masks: list[list[np.ndarray]]

    def __len__(self) -> int:
        return len(self.scenes)

    @property
    def captions(self) -> list[str]:
        return [scene.caption for scene in self.scenes]


SCENE_SPLITS = ("train", "valid", "test", "held_out")


def build_scene_sets(
    *,
    train: int,
    valid: int,
    test: int,
    held_out_test: int,
    seed: int = 0,
    image_size: int = 32,
    max_objects: int = 2,
    two_object_fraction: float = 0.5,
    held_out: Sequence[tuple[str, str]] = HELD_OUT_DEFAULT,
) -> dict[str, SceneSet]:
    """The four splits of :data:`SCENE_SPLITS`, each drawn from its own stream seeded by ``(seed, split)``
    (so changing one split's count leaves the others as they were).

    ``train``, ``valid``, ``test`` hold no object with a ``held_out`` combination; ``held_out`` (of
    ``held_out_test`` scenes) holds one in every scene. Every split has the same share of two-object scenes
    (the count is drawn before the scene is redrawn to fit its split).

    Raises:
        DataError: a count below 0, a bad ``image_size`` / ``max_objects`` / ``two_object_fraction``, or a
            ``held_out`` pair that is not a known ``(colour, shape)``; ``held_out_test > 0`` with no ``held_out``.
    """
    counts = {"train": train, "valid": valid, "test": test, "held_out": held_out_test}
    for name, count in zip(("train", "valid", "test", "held_out_test"), counts.values(), strict=True):
        int_at_least(name, count, 0, error=DataError)
    int_at_least("image_size", image_size, MIN_IMAGE_SIZE, error=DataError)
    int_at_least("seed", seed, 0, error=DataError)
    _check_counts(max_objects, two_object_fraction, None)
    held = _check_held_out(held_out)
    if held_out_test and not held:
        raise DataError(f"held_out_test is {held_out_test} but held_out names no (colour, shape); expected some")
    sets = {}
    for index, (split, count) in enumerate(counts.items()):
        rng = np.random.default_rng((seed, index))
        want_held = split == "held_out"
        scenes = []
        for _ in range(count):
            two = max_objects == 2 and rng.random() < two_object_fraction
            scenes.append(
                sample_scene(
                    rng,
                    max_objects=max_objects,
                    two_object_fraction=two_object_fraction,
                    num_objects=2 if two else 1,
                    exclude=_split_filter(held, want_held),
                )
            )
        rendered = [render(scene, image_size) for scene in scenes]
        images = (
            torch.stack([to_unit_range(image) for image, _ in rendered])
            if rendered
            else torch.empty(0, 3, image_size, image_size)
        )
        sets[split] = SceneSet(scenes, images, [masks for _, masks in rendered])
    return sets
