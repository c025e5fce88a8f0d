"""The language of the built-in scenes (:mod:`qkv.data.scenes`): its words, the caption grammar, and the
reading of a caption into what it asks for.

::

    parse_caption("a green triangle above a red circle")
    # CaptionSpec(objects=(ObjectSpec("green", "triangle"), ObjectSpec("red", "circle")), relation="above")
    describe(spec, template=1)  # "a green triangle is above a red circle"

The grammar (:func:`caption_vocabulary`: 17 words)::

    caption  := ["there is"] object  |  object ["is"] relation object
    object   := "a" [size] colour shape
    relation := "left of" | "right of" | "above" | "below"

Only the words live here; what they look like (the colours' RGB values, the sizes in pixels) is the
renderer's (:data:`qkv.data.scenes.COLOURS`, :data:`qkv.data.scenes.SIZES`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qkv.data.parallel import DataError

COLOUR_WORDS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZE_WORDS: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
_ARTICLE, _THERE, _IS = "a", "there", "is"


@dataclass(frozen=True)
class ObjectSpec:
    """An object a caption names: its colour and shape, and its size when the caption says it."""

    colour: str
    shape: str
    size: str | None = None

    def describe(self) -> str:
        """``"small red circle"`` (or ``"red circle"``)."""
        return " ".join(word for word in (self.size, self.colour, self.shape) if word)


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: one or two objects and, for two, ``objects[0] <relation> objects[1]``."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None


def caption_vocabulary() -> list[str]:
    """Every word a generated caption can contain, in a fixed order (for the text tokenizer)."""
    relation_words = [word for relation in RELATIONS for word in relation.split()]
    words = [_THERE, _IS, _ARTICLE, *SIZE_WORDS, *COLOUR_WORDS, *SHAPES, *relation_words]
    return list(dict.fromkeys(words))


def _object_words(obj: ObjectSpec) -> str:
    return f"{_ARTICLE} {obj.describe()}"


def describe(spec: CaptionSpec, *, template: int = 0) -> str:
    """The caption of ``spec``: template 0 is ``"a red circle"`` / ``"a red circle left of a blue square"``,
    template 1 ``"there is a red circle"`` / ``"a red circle is left of a blue square"``."""
    first = _object_words(spec.objects[0])
    if len(spec.objects) == 1:
        return first if template == 0 else f"{_THERE} {_IS} {first}"
    second = _object_words(spec.objects[1])
    return f"{first} {spec.relation} {second}" if template == 0 else f"{first} {_IS} {spec.relation} {second}"


def object_word_positions(caption: str) -> list[tuple[int, str, int]]:
    """``(position, word, object index)`` of each size, colour and shape word of a caption of this grammar: the
    words before the relation name object 0, those after it object 1 (``"a"``, ``"is"``, ``"there"`` and the
    relation's words name no object)::

        object_word_positions("a small red circle is left of a blue square")
        # [(1, "small", 0), (2, "red", 0), (3, "circle", 0), (8, "blue", 1), (9, "square", 1)]
    """
    words = caption.lower().split()
    firsts = {relation.split()[0] for relation in RELATIONS}
    split = next((i for i, w in enumerate(words) if w in firsts), len(words))
    content = {*SIZE_WORDS, *COLOUR_WORDS, *SHAPES}
    return [(i, w, 0 if i < split else 1) for i, w in enumerate(words) if w in content]


def _expected(kind: str, words: Sequence[str], tokens: list[str], at: int, text: str) -> DataError:
    got = f"{tokens[at]!r}" if at < len(tokens) else "the end of the caption"
    return DataError(
        f"caption {text!r}: expected {kind} ({', '.join(words)}) at word {at + 1}; got {got}"
        " (captions read 'a [small|large] <colour> <shape> [[is] <relation> a [size] <colour> <shape>]')"
    )


def _parse_object(tokens: list[str], at: int, text: str) -> tuple[ObjectSpec, int]:
    if at >= len(tokens) or tokens[at] != _ARTICLE:
        raise _expected("the article", [_ARTICLE], tokens, at, text)
    at += 1
    size = None
    if at < len(tokens) and tokens[at] in SIZE_WORDS:
        size, at = tokens[at], at + 1
    if at >= len(tokens) or tokens[at] not in COLOUR_WORDS:
        raise _expected("a colour", COLOUR_WORDS, tokens, at, text)
    colour, at = tokens[at], at + 1
    if at >= len(tokens) or tokens[at] not in SHAPES:
        raise _expected("a shape", SHAPES, tokens, at, text)
    return ObjectSpec(colour, tokens[at], size), at + 1


def parse_caption(text: str) -> CaptionSpec:
    """What ``text`` asks for, read with the caption grammar (see the module docstring); case is ignored.

    Raises:
        DataError: ``text`` is empty, has a word outside :func:`caption_vocabulary` (naming it), or does not
            follow the grammar (naming the word where it stops).
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"caption must be a non-empty string; got {text!r}")
    tokens = text.lower().split()
    vocabulary = caption_vocabulary()
    unknown = [word for word in tokens if word not in vocabulary]
    if unknown:
        raise DataError(
            f"caption {text!r}: the word {unknown[0]!r} is not in the vocabulary; expected words from "
            f"{', '.join(vocabulary)}"
        )
    there_is = tokens[:2] == [_THERE, _IS]
    first, at = _parse_object(tokens, 2 if there_is else 0, text)
    if at == len(tokens):
        return CaptionSpec((first,), None)
    if there_is:
        raise DataError(
            f"caption {text!r}: 'there is' starts a one-object caption; got more after {first.describe()!r}"
        )
    if tokens[at] == _IS:
        at += 1
    relation = next((r for r in RELATIONS if tokens[at : at + len(r.split())] == r.split()), None)
    if relation is None:
        raise _expected("a relation", RELATIONS, tokens, at, text)
    second, at = _parse_object(tokens, at + len(relation.split()), text)
    if at != len(tokens):
        raise DataError(f"caption {text!r}: expected the end after the second object; got {tokens[at]!r}")
    return CaptionSpec((first, second), relation)
