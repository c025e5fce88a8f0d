"""The built-in captioned scenes: seeded and deterministic, captions that agree with the drawn geometry
(relation between the masks' centroids, size word and mask area, palette colours), held-out combinations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qkv.checks import ConfigError
from qkv.data.parallel import DataError
from qkv.data.scenes import (
    BACKGROUND,
    COLOURS,
    RELATIONS,
    SIZES,
    Scene,
    SceneObject,
    build_scene_sets,
    is_held_out,
    parse_caption,
    relation_holds,
    render,
    sample_scene,
)

AREA_SHARE = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # the shape's area / its box's area


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(123)
    return [sample_scene(rng) for _ in range(400)]


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


# ---- determinism -----------------------------------------------------------------------------------------------


def test_the_same_seed_gives_identical_sets_and_another_seed_different_ones() -> None:
    first = build_scene_sets(train=40, valid=8, test=8, held_out_test=8, seed=3)
    again = build_scene_sets(train=40, valid=8, test=8, held_out_test=8, seed=3)
    other = build_scene_sets(train=40, valid=8, test=8, held_out_test=8, seed=4)
    for split in ("train", "valid", "test", "held_out"):
        assert first[split].scenes == again[split].scenes
        assert torch.equal(first[split].images, again[split].images)
        for masks, masks_again in zip(first[split].masks, again[split].masks, strict=True):
            assert all(np.array_equal(a, b) for a, b in zip(masks, masks_again, strict=True))
        assert first[split].scenes != other[split].scenes
    assert first["train"].images.shape == (40, 3, 32, 32) and first["train"].images.dtype == torch.float32
    assert float(first["train"].images.min()) == -1.0 and float(first["train"].images.max()) <= 1.0


def test_each_split_has_its_own_stream() -> None:
    small = build_scene_sets(train=30, valid=5, test=5, held_out_test=5, seed=0)
    more_test = build_scene_sets(train=30, valid=5, test=50, held_out_test=5, seed=0)
    assert small["train"].scenes == more_test["train"].scenes
    assert small["test"].scenes == more_test["test"].scenes[:5]


def test_render_draws_the_same_arrays_for_the_same_scene(scenes: list[Scene]) -> None:
    image, masks = render(scenes[0])
    image_again, masks_again = render(scenes[0])
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert np.array_equal(image, image_again)
    assert all(np.array_equal(a, b) for a, b in zip(masks, masks_again, strict=True))
    assert sample_scene(np.random.default_rng(9)) == sample_scene(np.random.default_rng(9))


# ---- captions agree with the geometry -----------------------------------------------------------------------


def test_every_caption_parses_back_to_its_scenes_objects(scenes: list[Scene]) -> None:
    named_sizes = 0
    for scene in scenes:
        spec = parse_caption(scene.caption)
        assert spec.relation == scene.relation
        assert [(o.colour, o.shape) for o in spec.objects] == [(o.colour, o.shape) for o in scene.objects]
        for named, obj in zip(spec.objects, scene.objects, strict=True):
            assert named.size in (None, obj.size)
            named_sizes += named.size is not None
    assert 0.3 < named_sizes / sum(len(s.objects) for s in scenes) < 0.7  # the size word is optional


def test_pixels_are_the_palette_colour_inside_masks_and_background_outside(scenes: list[Scene]) -> None:
    for scene in scenes:
        image, masks = render(scene)
        assert len(masks) == len(scene.objects)
        for obj, mask in zip(scene.objects, masks, strict=True):
            assert mask.dtype == bool and mask.any()
            assert np.all(image[mask] == COLOURS[obj.colour])
        outside = ~np.any(masks, axis=0)
        assert np.all(image[outside] == BACKGROUND)


def test_the_size_word_agrees_with_the_mask_area(scenes: list[Scene]) -> None:
    for scene in scenes:
        for obj, mask in zip(scene.objects, render(scene)[1], strict=True):
            side = math.sqrt(mask.sum() / AREA_SHARE[obj.shape])  # the side (or diameter) the area implies
            assert abs(side - SIZES[obj.size]) < 1.0, (scene.caption, obj, int(mask.sum()))
    # At twice the resolution the same object covers about four times the pixels.
    obj = SceneObject("square", "red", "large", 0.5, 0.5)
    at_64 = render(Scene((obj,), None, "a large red square"), 64)[1][0].sum()
    assert at_64 == 4 * SIZES["large"] ** 2


def test_the_relation_holds_between_the_masks_centroids_with_a_margin(scenes: list[Scene]) -> None:
    two = [scene for scene in scenes if len(scene.objects) == 2]
    assert {scene.relation for scene in two} == set(RELATIONS) and len(two) > 150
    for scene in two:
        assert scene.relation is not None
        first, second = render(scene)[1]
        assert not np.any(first & second)
        (x0, y0), (x1, y1) = centroid(first), centroid(second)
        along, across = {
            "left of": (x1 - x0, y1 - y0),
            "right of": (x0 - x1, y1 - y0),
            "above": (y1 - y0, x1 - x0),
            "below": (y0 - y1, x1 - x0),
        }[scene.relation]
        assert along > abs(across) and along >= 9.0, scene  # two small boxes' centres are 9 px + a gap apart
        assert relation_holds(centroid(first), centroid(second), scene.relation)
        # Along the relation's axis a row or column of background separates the two masks.
        axis = 1 if scene.relation in ("left of", "right of") else 0
        low, high = (first, second) if scene.relation in ("left of", "above") else (second, first)
        assert np.nonzero(low.any(axis=1 - axis))[0].max() + 1 < np.nonzero(high.any(axis=1 - axis))[0].min()


def test_relation_holds_needs_more_displacement_along_than_across() -> None:
    assert relation_holds((0.2, 0.5), (0.8, 0.5), "left of")
    assert not relation_holds((0.2, 0.5), (0.8, 0.5), "right of")
    assert relation_holds((0.5, 0.1), (0.5, 0.9), "above")  # y grows downward
    assert relation_holds((0.5, 0.9), (0.5, 0.1), "below")
    assert not relation_holds((0.4, 0.1), (0.5, 0.9), "left of")  # mostly above, a little left
    with pytest.raises(ConfigError, match="relation must be one of 'left of'.*; got 'near'"):
        relation_holds((0.0, 0.0), (1.0, 1.0), "near")


def test_two_objects_differ_in_colour_and_shape(scenes: list[Scene]) -> None:
    for scene in scenes:
        if len(scene.objects) == 2:
            first, second = scene.objects
            assert first.colour != second.colour and first.shape != second.shape


# ---- held-out combinations -----------------------------------------------------------------------------------


def test_held_out_combinations_are_only_in_the_held_out_split() -> None:
    sets = build_scene_sets(train=300, valid=60, test=60, held_out_test=60, seed=1)
    for split in ("train", "valid", "test"):
        assert not any(("green", "triangle") in [(o.colour, o.shape) for o in s.objects] for s in sets[split].scenes)
    assert all(is_held_out(s, [("green", "triangle")]) for s in sets["held_out"].scenes)
    train_objects = [(o.colour, o.shape) for s in sets["train"].scenes for o in s.objects]
    assert any(c == "green" for c, _ in train_objects) and any(s == "triangle" for _, s in train_objects)
    two_share = {name: np.mean([len(s.objects) == 2 for s in sets[name].scenes]) for name in ("train", "held_out")}
    assert abs(two_share["train"] - two_share["held_out"]) < 0.2  # the count is drawn before the filter


def test_several_held_out_pairs_and_bad_ones() -> None:
    held = [("red", "square"), ("blue", "circle")]
    sets = build_scene_sets(train=100, valid=0, test=0, held_out_test=30, seed=0, held_out=held)
    assert len(sets["valid"]) == 0 and sets["valid"].images.shape == (0, 3, 32, 32)
    assert not any(is_held_out(s, held) for s in sets["train"].scenes)
    assert all(is_held_out(s, held) for s in sets["held_out"].scenes)
    with pytest.raises(DataError, match=r"held_out\[0\] colour must be one of 'red'.*; got 'purple'"):
        build_scene_sets(train=1, valid=0, test=0, held_out_test=0, held_out=[("purple", "circle")])
    with pytest.raises(DataError, match=r"held_out\[0\] must be a \(colour, shape\) pair; got 'red'"):
        build_scene_sets(train=1, valid=0, test=0, held_out_test=0, held_out=["red"])  # type: ignore[list-item]
    with pytest.raises(DataError, match="held_out_test is 5 but held_out names no"):
        build_scene_sets(train=1, valid=0, test=0, held_out_test=5, held_out=[])


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(DataError, match="valid must be an int >= 0; got -1"):
        build_scene_sets(train=1, valid=-1, test=0, held_out_test=0)
    with pytest.raises(DataError, match="image_size must be an int >= 16; got 8"):
        build_scene_sets(train=1, valid=0, test=0, held_out_test=0, image_size=8)
    with pytest.raises(DataError, match="max_objects must be 1 or 2; got 3"):
        build_scene_sets(train=1, valid=0, test=0, held_out_test=0, max_objects=3)
    with pytest.raises(DataError, match=r"two_object_fraction must be a number in \[0, 1\]; got 1.5"):
        sample_scene(np.random.default_rng(0), two_object_fraction=1.5)
    with pytest.raises(DataError, match="no scene that exclude accepts in 10,000 draws"):
        sample_scene(np.random.default_rng(0), exclude=lambda scene: True)
    one_object = build_scene_sets(train=20, valid=0, test=0, held_out_test=0, max_objects=1)["train"]
    assert all(len(s.objects) == 1 and s.relation is None for s in one_object.scenes)


def test_the_palette_is_well_separated() -> None:
    palette = np.array([BACKGROUND, *COLOURS.values()], dtype=float)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1)[np.triu_indices(len(palette), 1)]
    assert distances.min() > 150  # the checker tells the colours apart through noise and blur
