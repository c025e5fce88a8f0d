"""Checks of arguments and config values, one error type for them, and the strict config base class.

The bottom layer of qkv: it imports nothing from qkv, so every layer (``qkv.ops`` up to ``qkv.cli``) checks
its arguments the same way and says the same thing about the same mistake::

    int_at_least("num_heads", 0)  # ConfigError: num_heads must be an int >= 1; got 0
    probability("dropout", 1.0)  # ConfigError: dropout must be a probability in [0, 1); got 1.0
    one_of("activation", "swish", ("relu", "gelu"))
    # ConfigError: activation must be one of 'relu', 'gelu'; got 'swish'

Every check is a plain function ``check(name, value, ...)`` that returns the value (normalized: an int
stays an int, a number becomes a float) or raises ``error`` (default :class:`ConfigError`, a
``ValueError``) with the message ``"{name} must be {expected}; got {value}"``. ``expected`` may be given to
keep a caller's established wording or to add why (``"an int >= 2 (one source token, BOS/EOS)"``). The
value in a message goes through :func:`short_repr`, so a hostile value (a huge or deeply nested list from
a config file) costs a bounded amount of work to show. On success a check does no more work than the
``isinstance`` tests written inline would: they run in the hot path of ``qkv.attention``.

:class:`StrictConfig` is the base of every config dataclass (the model configs, the training config's
sections): ``from_dict`` refuses unknown keys (naming the valid ones), per-field checks are declared next
to each field with :func:`option` / :func:`required`, and a cross-field hook :meth:`StrictConfig.check`
runs after them, on every construction.
"""

from __future__ import annotations

import copy
import math
import reprlib
from collections.abc import Callable, Collection, Mapping
from contextvars import ContextVar
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar

MESSAGE_CHARS = 200


class ConfigError(ValueError):
    """An argument or config value that cannot be used; the message names it, what was got and what was expected."""


Check = Callable[..., Any]
"""A check: ``check(name, value, *args, **kwargs)`` returns the (normalized) value or raises."""


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr of an int beyond sys.get_int_max_str_digits() (4300) raises; its size is what matters here.
        if x.bit_length() > 4 * self.maxlong:
            return f"<an int of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)


_REPR = _ShortRepr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = _REPR.maxfrozenset = _REPR.maxdeque = 8
_REPR.maxstring = _REPR.maxother = MESSAGE_CHARS


def short_repr(value: Any, limit: int = MESSAGE_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without building the full repr of a big or deeply
    nested value (nesting beyond 3 levels and items beyond 8 per container are shown as ``...``)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def qualified(prefix: str, name: str) -> str:
    """``"prefix.name"``, or ``name`` alone when there is no prefix (a config built in code, not read from a file)."""
    return f"{prefix}.{name}" if prefix else name


def _message(name: str, expected: str, value: Any) -> str:
    return f"{name} must be {expected}; got {short_repr(value)}"


# The checks below repeat their isinstance tests rather than share a helper: one function call per check,
# because qkv.attention calls some of them on every call.


def int_at_least(
    name: str, value: Any, minimum: int = 1, *, expected: str | None = None, error: type[ValueError] = ConfigError
) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise error(_message(name, expected or f"an int >= {minimum}", value))
    return value


def finite_number(
    name: str, value: Any, *, expected: str | None = None, error: type[ValueError] = ConfigError
) -> float:
    """``float(value)`` if it is a finite int or float (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise error(_message(name, expected or "a finite number", value))
    return float(value)


def positive_number(
    name: str, value: Any, *, expected: str | None = None, error: type[ValueError] = ConfigError
) -> float:
    """``float(value)`` if it is a finite number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise error(_message(name, expected or "a positive number", value))
    return float(value)


def non_negative_number(
    name: str, value: Any, *, expected: str | None = None, error: type[ValueError] = ConfigError
) -> float:
    """``float(value)`` if it is a finite number ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise error(_message(name, expected or "a number >= 0", value))
    return float(value)


def number_between(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    expected: str | None = None,
    error: type[ValueError] = ConfigError,
) -> float:
    """``float(value)`` if it is a number in the closed interval ``[low, high]`` (NaN never is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise error(_message(name, expected or f"a number in [{low:g}, {high:g}]", value))
    return float(value)


def probability(name: str, value: Any, *, expected: str | None = None, error: type[ValueError] = ConfigError) -> float:
    """``float(value)`` if it is a probability in ``[0, 1)`` (a dropout rate: 1 would drop everything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise error(_message(name, expected or "a probability in [0, 1)", value))
    return float(value)


def fraction(name: str, value: Any, *, expected: str | None = None, error: type[ValueError] = ConfigError) -> float:
    """``float(value)`` if it is a share in ``[0, 1)`` of something that must keep a part (a held-out split)."""
    return probability(name, value, expected=expected or "a number in [0, 1)", error=error)


def boolean(name: str, value: Any, *, error: type[ValueError] = ConfigError) -> bool:
    """``value`` if it is ``True`` or ``False`` (not 0/1, not ``"yes"``)."""
    if not isinstance(value, bool):
        raise error(_message(name, "true or false", value))
    return value


def text(name: str, value: Any, *, error: type[ValueError] = ConfigError) -> str:
    """``value`` if it is a string with something other than whitespace in it."""
    if not isinstance(value, str) or not value.strip():
        raise error(_message(name, "a non-empty string", value))
    return value


def one_of(name: str, value: Any, choices: Collection[str], *, error: type[ValueError] = ConfigError) -> str:
    """``value`` if it is one of the strings ``choices`` (a tuple, or the keys of a dict of implementations)."""
    if not isinstance(value, str) or value not in choices:
        raise error(_message(name, f"one of {', '.join(map(repr, choices))}", value))
    return value


def optional(check: Check) -> Check:
    """``check`` that lets ``None`` through (for a field or argument where ``None`` means "not set")."""

    def check_unless_none(name: str, value: Any, *args: Any, **kwargs: Any) -> Any:
        return None if value is None else check(name, value, *args, **kwargs)

    check_unless_none.__name__ = f"optional_{getattr(check, '__name__', 'check')}"
    return check_unless_none


def option(default: Any, check: Check, *args: Any, **kwargs: Any) -> Any:
    """A :class:`StrictConfig` field with a default, checked by ``check(name, value, *args, **kwargs)``.

    A list or dict default is copied for each instance (as ``default_factory`` would)."""
    metadata = {"check": check, "args": args, "kwargs": kwargs}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def required(check: Check, *args: Any, **kwargs: Any) -> Any:
    """A :class:`StrictConfig` field without a default, checked by ``check(name, value, *args, **kwargs)``."""
    return field(metadata={"check": check, "args": args, "kwargs": kwargs})


def section(config_class: type[StrictConfig], *, nullable: bool = False) -> Any:
    """A :class:`StrictConfig` field holding a nested config (a mapping in ``from_dict``).

    ``nullable``: absent or ``null`` is ``None``; otherwise absent is ``config_class()`` with its defaults."""
    metadata = {"section": config_class, "nullable": nullable}
    if nullable:
        return field(default=None, metadata=metadata)
    return field(default_factory=config_class, metadata=metadata)


C = TypeVar("C", bound="StrictConfig")

# The key prefix ("training") of the config that from_dict is building, for its __post_init__ to name keys
# as the file does ("training.lr"). Tagged with the class, so a config built inside a check is not misnamed.
_BUILDING: ContextVar[tuple[type, str] | None] = ContextVar("qkv_checks_building", default=None)


class StrictConfig:
    """Base of qkv's config dataclasses: strict ``from_dict``, ``to_dict``, and checks on every construction.

    A subclass is a ``@dataclass`` whose fields are declared with :func:`option` / :func:`required` (a
    per-field check), :func:`section` (a nested config) or plainly (not checked). On construction each
    checked field is checked and replaced by the check's normalized value (``dropout=0`` becomes ``0.0``),
    then :meth:`check` runs the checks across fields. A subclass does not define ``__post_init__``.

    Errors name a key by its path when the config comes from a file section (``from_dict(d, "training")``:
    ``training.lr must be a positive number; got -1``) and by its field name otherwise.
    """

    @classmethod
    def from_dict(cls: type[C], data: Any, prefix: str = "") -> C:
        """Build from a parsed JSON/YAML mapping (``None`` is an empty one); ``prefix`` is where it sits in a
        file (``"training"``; ``""`` for a whole file such as a checkpoint's ``config.json``).

        Raises:
            ConfigError: an unknown key, a missing required key, or a bad value.
            TypeError: ``data`` is not a mapping and no ``prefix`` says it came from a file.
        """
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            if not prefix:
                raise TypeError(f"{cls.__name__}.from_dict needs a mapping; got {type(data).__name__}")
            raise ConfigError(f"{prefix} must be a mapping of keys to values; got {short_repr(data)}")
        all_fields = fields(cls)  # type: ignore[arg-type]
        names = [f.name for f in all_fields]
        unknown = [key for key in data if key not in names]
        if unknown:
            if prefix:
                keys = ", ".join(qualified(prefix, str(key)) for key in unknown)
                raise ConfigError(
                    f"unknown key{'s' if len(unknown) > 1 else ''} {keys}; valid keys of {prefix}: {', '.join(names)}"
                )
            keys = ", ".join(short_repr(key) for key in unknown)
            raise ConfigError(f"unknown {cls.__name__} key(s): {keys}; valid keys: {', '.join(names)}")
        missing = [
            f.name for f in all_fields if f.name not in data and f.default is MISSING and f.default_factory is MISSING
        ]
        if missing:
            if prefix:
                keys = ", ".join(qualified(prefix, name) for name in missing)
                raise ConfigError(f"{keys} {'are' if len(missing) > 1 else 'is'} required")
            raise ConfigError(f"{cls.__name__} needs key(s) {', '.join(map(repr, missing))}")
        values = dict(data)
        for f in all_fields:
            nested = f.metadata.get("section")
            if nested is not None and f.name in values and not (values[f.name] is None and f.metadata["nullable"]):
                values[f.name] = nested.from_dict(values[f.name], qualified(prefix, f.name))
        token = _BUILDING.set((cls, prefix))
        try:
            return cls(**values)
        finally:
            _BUILDING.reset(token)

    def __post_init__(self) -> None:
        building = _BUILDING.get()
        prefix = building[1] if building is not None and building[0] is type(self) else ""
        for f in fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if check is not None:
                value = getattr(self, f.name)
                normalized = check(qualified(prefix, f.name), value, *f.metadata["args"], **f.metadata["kwargs"])
                if normalized is not value:
                    object.__setattr__(self, f.name, normalized)  # object's: a frozen subclass may be checked too
        self.check(prefix)

    def check(self, prefix: str) -> None:
        """Checks across fields, after every field has passed its own; raise :class:`ConfigError` naming keys
        with ``qualified(prefix, name)``. Nothing by default."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON/YAML-ready dict, nested configs as dicts (``from_dict(to_dict())`` is equal)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, StrictConfig) else copy.deepcopy(value)
        return out
