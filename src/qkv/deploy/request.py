"""The ``POST /translate`` request of ``qkv serve``: its size limits, its parsing, and its errors.

A request is a JSON object::

    {"text": ["Tuesday, March 9, 1993", "6/1/02"],   required: 1 to max_sentences strings
     "beam": 5,                                     1 (greedy) to max_beam; default 5
     "length_penalty": 1.0,                         GNMT alpha, 0 to 10; default 1.0
     "max_output_length": null,                     1 to the model's limit; null: the model's default
     "alignment": false}                            also return each output token's source position

An empty or whitespace-only string is not an error: its translation is ``""``, as an empty line gives an
empty line in ``qkv translate``, so a client can send a document's lines as they are, blank ones included.

Every refusal is a :class:`RequestError` with an HTTP status (400: the body is not JSON; 413: over a size
limit; 422: a missing, unknown or wrong-typed key, or a value out of range) and a JSON body naming the field,
the value given and what was expected, the limit included::

    {
        "error": {
            "field": "beam",
            "value": 17,
            "expected": "an int in [1, 16] (the server's max_beam; 1: greedy)",
            "message": "beam must be an int in [1, 16] (the server's max_beam; 1: greedy); got 17",
        }
    }
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from qkv.checks import (
    Check,
    ConfigError,
    StrictConfig,
    boolean,
    int_at_least,
    number_between,
    option,
    short_repr,
)
from qkv.deploy.micro_batcher import DecodingOptions
from qkv.models.search import MAX_LENGTH_PENALTY

REQUEST_KEYS = ("text", "beam", "length_penalty", "max_output_length", "alignment")
VALUE_CHARS = 80  # the most characters of a refused value echoed back in an error


@dataclass(frozen=True)
class ServeLimits(StrictConfig):
    """What one ``POST /translate`` may ask for.

    Attributes:
        max_sentences: strings in ``text``.
        max_chars: characters in one string of ``text``.
        max_body_bytes: bytes of the request body (a larger one is refused before it is read in full).
        max_beam: the beam size.
    """

    max_sentences: int = option(64, int_at_least)
    max_chars: int = option(1000, int_at_least)
    max_body_bytes: int = option(1 << 20, int_at_least)
    max_beam: int = option(16, int_at_least)


class RequestError(Exception):
    """A refused request: ``status`` and the JSON :meth:`body` naming the field, the value and what was expected."""

    def __init__(self, status: HTTPStatus, field: str, value: Any, expected: str, message: str | None = None) -> None:
        self.status, self.field, self.value, self.expected = status, field, value, expected
        self.message = message or f"{field} must be {expected}; got {short_repr(value, VALUE_CHARS)}"
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """``{"error": {"field", "value", "expected", "message"}}``, JSON-ready (the value shortened)."""
        return {
            "error": {
                "field": self.field,
                "value": json_safe(self.value),
                "expected": self.expected,
                "message": self.message,
            }
        }


def json_safe(value: Any) -> Any:
    """``value`` if it is a JSON scalar that is short to echo back as UTF-8; otherwise its short ``repr``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and abs(value) < 2**53:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    if isinstance(value, str) and len(value) <= VALUE_CHARS and _utf8(value):
        return value
    return short_repr(value, VALUE_CHARS)  # repr escapes a lone surrogate, which UTF-8 cannot hold


def _utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (JSON's ``"\\ud800"`` parses to a lone surrogate, which cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class TranslateRequest:
    """A checked request: the sentences and how to decode them (``alignment``: ``options.need_attention``)."""

    text: list[str]
    options: DecodingOptions


def _checked(expected: str, check: Check, field: str, value: Any, /, *args: Any, **kwargs: Any) -> Any:
    """``check(field, value, *args, **kwargs)``, its ``ConfigError`` as a 422 :class:`RequestError` saying
    ``expected`` (the caller passes it to the check too, where the check takes one, so both say the same)."""
    try:
        return check(field, value, *args, **kwargs)
    except ConfigError as e:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, field, value, expected, str(e)) from None


def _int_between(field: str, value: Any, low: int, high: int, why: str) -> int:
    expected = f"an int in [{low}, {high}] ({why})"
    _checked(expected, int_at_least, field, value, low, expected=expected)
    _checked(expected, number_between, field, value, low, high, expected=expected)
    return int(value)


def decode_json(body: bytes) -> Any:
    """The JSON value of ``body`` (UTF-8).

    Raises:
        RequestError: 400, the body is not UTF-8 JSON (or nests too deep to parse).
    """
    expected = "a JSON object (UTF-8)"
    preview = body[:VALUE_CHARS].decode("utf-8", "replace")
    try:
        return json.loads(body)
    except UnicodeDecodeError as e:
        problem = f"is not UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        problem = f"is not JSON ({e})"
    except ValueError as e:  # a number of more digits than int() converts (sys.get_int_max_str_digits)
        problem = f"holds a number too long to read ({e})"
    except RecursionError:
        problem = "nests too deep to parse"
    raise RequestError(HTTPStatus.BAD_REQUEST, "body", preview, expected, f"body {problem}; expected {expected}")


def too_large_body(size: int | None, limit: int) -> RequestError:
    """The 413 error of a body of ``size`` bytes (``None``: not known, cut off past ``limit``) over ``limit``."""
    got = f"more than {limit} bytes" if size is None else f"{size} bytes"
    expected = f"at most {limit} bytes (the server's max_body_bytes)"
    return RequestError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body", got, expected, f"body must be {expected}; got {got}"
    )


def _text(value: Any, limits: ServeLimits) -> list[str]:
    expected = f"a list of 1 to {limits.max_sentences} strings (the server's max_sentences)"
    if not isinstance(value, list) or not value:
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "text", value, expected)
    if len(value) > limits.max_sentences:
        got = f"a list of {len(value)} strings"
        raise RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "text", got, expected, f"text must be {expected}; got {got}"
        )
    for i, sentence in enumerate(value):
        field = f"text[{i}]"
        if not isinstance(sentence, str):
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, field, sentence, "a string")
        if len(sentence) > limits.max_chars:
            expected = f"a string of at most {limits.max_chars} characters (the server's max_chars)"
            got = f"a string of {len(sentence)} characters"
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, field, got, expected, f"{field} must be {expected}; got {got}"
            )
    return value


def parse_translate_request(data: Any, limits: ServeLimits, *, max_output_length: int) -> TranslateRequest:
    """Check a parsed ``POST /translate`` body (module docstring) against ``limits``.

    Args:
        data: the JSON value of the body.
        limits: the server's limits.
        max_output_length: the most a request may ask for (the model's cap,
            :func:`qkv.train.translate.output_length_cap`).

    Raises:
        RequestError: 413 over a limit, 422 anything else wrong; the first problem found.
    """
    if not isinstance(data, dict):
        expected = f"a JSON object with the keys {', '.join(REQUEST_KEYS)}"
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "body", data, expected)
    for key, value in data.items():
        if key not in REQUEST_KEYS:
            expected = f"one of the keys {', '.join(REQUEST_KEYS)}"
            message = f"unknown key {short_repr(key, VALUE_CHARS)}; expected {expected}"
            raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, json_safe(key), value, expected, message)
    if "text" not in data:
        expected = f"a list of 1 to {limits.max_sentences} strings"
        raise RequestError(HTTPStatus.UNPROCESSABLE_ENTITY, "text", None, expected, f"text is required: {expected}")
    text = _text(data["text"], limits)
    beam = _int_between("beam", data.get("beam", 5), 1, limits.max_beam, "the server's max_beam; 1: greedy")
    expected = f"a number in [0, {MAX_LENGTH_PENALTY:g}] (GNMT alpha)"
    penalty = _checked(
        expected,
        number_between,
        "length_penalty",
        data.get("length_penalty", 1.0),
        0,
        MAX_LENGTH_PENALTY,
        expected=expected,
    )
    length = data.get("max_output_length")
    if length is not None:
        length = _int_between("max_output_length", length, 1, max_output_length, "the model's limit")
    need_attention = _checked("true or false", boolean, "alignment", data.get("alignment", False))
    return TranslateRequest(
        text=text,
        options=DecodingOptions(
            beam=beam, length_penalty=penalty, max_output_length=length, need_attention=need_attention
        ),
    )
