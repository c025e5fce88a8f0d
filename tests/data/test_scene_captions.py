"""The caption language of the built-in scenes: a small vocabulary that sampled captions use whole, both
templates read back, and parse errors that name the word."""

from __future__ import annotations

import numpy as np
import pytest

from qkv.data.parallel import DataError
from qkv.data.scene_captions import (
    CaptionSpec,
    ObjectSpec,
    caption_vocabulary,
    describe,
    object_word_positions,
    parse_caption,
)
from qkv.data.scenes import Scene, sample_scene


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(5)
    return [sample_scene(rng) for _ in range(300)]


def test_the_vocabulary_is_small_and_every_word_is_used(scenes: list[Scene]) -> None:
    vocabulary = caption_vocabulary()
    assert len(vocabulary) == len(set(vocabulary)) <= 20
    used = {word for scene in scenes for word in scene.words()}
    assert used == set(vocabulary)
    assert Scene((), None, "A Red  circle").words() == ["a", "red", "circle"]


def test_parse_reads_both_templates_and_ignores_case() -> None:
    two = CaptionSpec((ObjectSpec("red", "circle"), ObjectSpec("blue", "square", "small")), "left of")
    one = CaptionSpec((ObjectSpec("yellow", "triangle", "large"),), None)
    assert describe(two) == "a red circle left of a small blue square"
    assert describe(two, template=1) == "a red circle is left of a small blue square"
    assert describe(one, template=1) == "there is a large yellow triangle"
    for spec in (one, two):
        for template in (0, 1):
            assert parse_caption(describe(spec, template=template)) == spec
    assert parse_caption("A GREEN Triangle  above a red circle").objects[0] == ObjectSpec("green", "triangle")


@pytest.mark.parametrize(
    ("caption", "message"),
    [
        ("", "caption must be a non-empty string; got ''"),
        ("a purple circle", "the word 'purple' is not in the vocabulary; expected words from there, is, a"),
        ("a red", r"expected a shape \(circle, square, triangle\) at word 3; got the end of the caption"),
        ("red circle", r"expected the article \(a\) at word 1; got 'red'"),
        ("a circle", r"expected a colour \(red, green, blue, yellow\) at word 2; got 'circle'"),
        ("a red circle left a blue square", r"expected a relation \(left of, right of, above, below\) at word 4"),
        ("a red circle above", r"expected the article \(a\) at word 5; got the end"),
        ("a red circle above a blue square a", "expected the end after the second object; got 'a'"),
        ("there is a red circle above a blue square", "'there is' starts a one-object caption"),
    ],
)
def test_parse_errors_name_the_word(caption: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_caption(caption)


def test_object_word_positions_name_the_object_each_content_word_describes(scenes: list[Scene]) -> None:
    assert object_word_positions("a small red circle is left of a blue square") == [
        (1, "small", 0), (2, "red", 0), (3, "circle", 0), (8, "blue", 1), (9, "square", 1),
    ]  # fmt: skip
    triangle = [(3, "large", 0), (4, "green", 0), (5, "triangle", 0)]
    assert object_word_positions("there is a large green triangle") == triangle
    for scene in scenes:  # every object's colour and shape, at their places in the caption
        words = scene.words()
        for position, word, obj in object_word_positions(scene.caption):
            assert words[position] == word
            assert word in (scene.objects[obj].colour, scene.objects[obj].shape, scene.objects[obj].size)
        named = {(obj, w) for _, w, obj in object_word_positions(scene.caption)}
        assert all({(i, o.colour), (i, o.shape)} <= named for i, o in enumerate(scene.objects))
