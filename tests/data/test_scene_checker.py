"""The independent scene checker: its accuracy on clean renders and on blurred noisy ones, wrong prompts
judged wrong, what it reports, and bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qkv.data.parallel import DataError
from qkv.data.scene_checker import detect, judge
from qkv.data.scenes import (
    COLOURS,
    SHAPES,
    SIZES,
    CaptionSpec,
    ObjectSpec,
    Scene,
    SceneObject,
    describe,
    parse_caption,
    render,
    sample_scene,
    to_unit_range,
)

REVERSED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(2024)
    return [sample_scene(rng) for _ in range(300)]


def blurred_noisy(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.1) -> torch.Tensor:
    """``image (H, W, 3)`` uint8 blurred by a 3x3 binomial kernel, in [-1, 1] with Gaussian noise of ``sigma``."""
    pixels = image.astype(np.float64) / 127.5 - 1.0
    kernel = np.array([0.25, 0.5, 0.25])
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = sum(w * padded[i : i + image.shape[0]] for i, w in enumerate(kernel))
    blurred = sum(w * rows[:, i : i + image.shape[1]] for i, w in enumerate(kernel))
    noisy = blurred + sigma * rng.standard_normal(blurred.shape)
    return torch.from_numpy(noisy.transpose(2, 0, 1).copy()).float()


def scene_of(*objects: SceneObject, relation: str | None = None) -> Scene:
    spec = CaptionSpec(tuple(ObjectSpec(o.colour, o.shape, o.size) for o in objects), relation)
    return Scene(tuple(objects), relation, describe(spec))


def test_clean_renders_are_judged_correct_and_every_object_is_read_right(scenes: list[Scene]) -> None:
    correct = 0
    for scene in scenes:
        image, masks = render(scene)
        correct += judge(image, scene).correct
        found = detect(image)
        assert len(found) == len(scene.objects)
        for obj, mask in zip(scene.objects, masks, strict=True):
            match = next(d for d in found if d.colour == obj.colour)
            assert (match.shape, match.size) == (obj.shape, obj.size), (scene.caption, match.describe())
            assert np.array_equal(match.mask, mask)
    assert correct / len(scenes) >= 0.99  # measured: 300 / 300


def test_blurred_noisy_renders_are_still_judged_correct(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(7)
    correct = sum(judge(blurred_noisy(render(scene)[0], rng), scene).correct for scene in scenes)
    assert correct / len(scenes) >= 0.97  # measured: 300 / 300 (and 1000 / 1000 at sigma 0.2)


def wrong_prompts(scene: Scene, rng: np.random.Generator) -> dict[str, CaptionSpec]:
    """Prompts the image of ``scene`` does not show: one thing changed each."""
    first = scene.objects[0]
    spec = parse_caption(scene.caption)
    named, rest = spec.objects[0], spec.objects[1:]
    colour = [c for c in COLOURS if c != first.colour][rng.integers(len(COLOURS) - 1)]
    shape = [s for s in SHAPES if s != first.shape][rng.integers(len(SHAPES) - 1)]
    size = next(s for s in SIZES if s != first.size)
    wrong = {
        "colour": CaptionSpec((dataclasses.replace(named, colour=colour), *rest), spec.relation),
        "shape": CaptionSpec((dataclasses.replace(named, shape=shape), *rest), spec.relation),
        "size": CaptionSpec((dataclasses.replace(named, size=size), *rest), spec.relation),
    }
    if spec.relation is None:
        extra = ObjectSpec(colour, shape)
        wrong["an extra object"] = CaptionSpec((named, extra), "left of")
    else:
        a, b = spec.objects
        wrong["relation reversed"] = CaptionSpec(spec.objects, REVERSED[spec.relation])
        wrong["colours swapped"] = CaptionSpec(
            (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour)), spec.relation
        )
        wrong["an object missing"] = CaptionSpec((a,), None)
    return wrong


def test_wrong_prompts_are_judged_incorrect(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(11)
    accepted: dict[str, int] = {}
    tried = 0
    for scene in scenes[:150]:
        image = blurred_noisy(render(scene)[0], rng)
        for kind, spec in wrong_prompts(scene, rng).items():
            tried += 1
            if judge(image, describe(spec)).correct:
                accepted[kind] = accepted.get(kind, 0) + 1
    assert tried > 500 and accepted == {}  # measured: none of the wrong prompts is accepted


def test_the_judgement_says_why_and_matches_objects_in_prompt_order() -> None:
    red = SceneObject("circle", "red", "large", 0.25, 0.5)
    blue = SceneObject("square", "blue", "small", 0.75, 0.5)
    image, masks = render(scene_of(red, blue, relation="left of"))
    right = judge(
        torch.from_numpy(image.transpose(2, 0, 1)).float() / 127.5 - 1, "a small blue square right of a red circle"
    )
    assert right.correct and right.reasons == []
    assert right.objects[0] is not None and np.array_equal(right.objects[0].mask, masks[1])  # the blue square
    assert right.objects[0].centre == pytest.approx((0.75, 0.5), abs=0.02)
    square, circle = right.objects
    assert circle is not None and square is not None
    reversed_ = judge(image, "a red circle right of a small blue square")
    assert reversed_.reasons == [
        f"the {circle.describe()} is not right of the {square.describe()} "
        "(expected red circle right of small blue square)"
    ]
    assert circle.describe() == "large red circle at (0.25, 0.50)"
    assert judge(image, "a red circle left of a large blue square").reasons == [
        f"expected a large blue square; found a {square.describe()}"
    ]
    assert judge(image, "a red circle").reasons == [
        f"expected 1 object(s); found 2: {circle.describe()}; {square.describe()}"
    ]
    empty = judge(np.zeros((32, 32, 3), dtype=np.uint8), "a red circle")
    assert empty.reasons == ["expected 1 object(s); found 0: nothing", "no red circle found"]


def test_tensor_and_uint8_images_give_the_same_detections(scenes: list[Scene]) -> None:
    for scene in scenes[:20]:
        image = render(scene)[0]
        from_uint8, from_tensor = detect(image), detect(to_unit_range(image))
        assert [(d.colour, d.shape, d.size, d.centre) for d in from_uint8] == [
            (d.colour, d.shape, d.size, d.centre) for d in from_tensor
        ]


def test_specks_are_ignored_and_a_formless_blob_is_no_shape() -> None:
    image = render(scene_of(SceneObject("triangle", "green", "large", 0.5, 0.5)))[0]
    image[1:3, 1:3] = COLOURS["red"]  # a 4-pixel speck
    assert judge(image, "a large green triangle").correct
    bar = np.zeros((32, 32, 3), dtype=np.uint8)
    bar[14:17, 4:28] = COLOURS["yellow"]  # 3 x 24: no circle, square or triangle
    (found,) = detect(bar)
    assert (found.colour, found.shape) == ("yellow", "unknown")
    assert judge(bar, "a yellow square").reasons == [f"expected a yellow square; found a {found.describe()}"]


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(
        DataError, match=r"image must be an \(H, W, 3\) uint8 array .*; got a float64 array of shape \(32, 32\)"
    ):
        detect(np.zeros((32, 32)))
    with pytest.raises(DataError, match=r"got a torch.float32 tensor of shape \(1, 32, 32\)"):
        detect(torch.zeros(1, 32, 32))
    with pytest.raises(DataError, match="the word 'purple' is not in the vocabulary"):
        judge(np.zeros((32, 32, 3), dtype=np.uint8), "a purple circle")
    with pytest.raises(DataError, match="tolerance must be a positive number; got 0"):
        detect(np.zeros((32, 32, 3), dtype=np.uint8), tolerance=0)
