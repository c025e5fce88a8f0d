"""qkv.checks: each check's accept/refuse boundary and message, bounded reprs, and the strict config base."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import pytest

from qkv.checks import (
    ConfigError,
    StrictConfig,
    boolean,
    finite_number,
    fraction,
    int_at_least,
    non_negative_number,
    number_between,
    one_of,
    option,
    optional,
    positive_number,
    probability,
    qualified,
    required,
    section,
    short_repr,
    text,
)
from qkv.data.parallel import DataError, filter_pairs


def refused(message: str) -> pytest.RaisesExc[ConfigError]:
    """``pytest.raises`` for a ConfigError whose whole message is ``message``."""
    return pytest.raises(ConfigError, match=f"^{re.escape(message)}$")


def test_int_at_least_boundary_and_message() -> None:
    assert int_at_least("num_heads", 1) == 1
    assert int_at_least("pad_id", 0, 0) == 0
    with refused("num_heads must be an int >= 1; got 0"):
        int_at_least("num_heads", 0)
    with refused("pad_id must be an int >= 0; got -1"):
        int_at_least("pad_id", -1, 0)
    with refused("n must be an int >= 1; got True"):
        int_at_least("n", True)
    with refused("n must be an int >= 1; got 2.0"):
        int_at_least("n", 2.0)
    with refused("n must be an int >= 1; got '3'"):
        int_at_least("n", "3")


def test_expected_and_error_keep_a_callers_wording_and_type() -> None:
    with pytest.raises(DataError, match=r"^max_tokens must be an integer >= 2 \(BOS/EOS\); got 1$"):
        int_at_least("max_tokens", 1, 2, expected="an integer >= 2 (BOS/EOS)", error=DataError)


def test_finite_number() -> None:
    assert finite_number("scale", -2) == -2.0
    assert isinstance(finite_number("scale", 3), float)
    for bad, shown in ((math.nan, "nan"), (math.inf, "inf"), (False, "False"), ("1", "'1'")):
        with refused(f"scale must be a finite number; got {shown}"):
            finite_number("scale", bad)


def test_positive_number_boundary() -> None:
    assert positive_number("lr", 5e-324) == 5e-324
    for bad in (0, -1e-9, math.inf, math.nan, True):
        with refused(f"lr must be a positive number; got {bad!r}"):
            positive_number("lr", bad)


def test_non_negative_number_boundary() -> None:
    assert non_negative_number("min_lr", 0) == 0.0
    for bad in (-1e-12, math.inf, math.nan):
        with refused(f"min_lr must be a number >= 0; got {bad!r}"):
            non_negative_number("min_lr", bad)


def test_number_between_is_closed() -> None:
    assert number_between("alpha", 0, 0, 10) == 0.0
    assert number_between("alpha", 10, 0, 10) == 10.0
    for bad in (-1e-9, 10.000001, math.nan, True):
        with refused(f"alpha must be a number in [0, 10]; got {bad!r}"):
            number_between("alpha", bad, 0, 10)


def test_probability_boundary() -> None:
    assert probability("dropout", 0) == 0.0
    assert isinstance(probability("dropout", 0), float)
    assert probability("dropout", 0.999) == 0.999
    for bad in (1.0, -0.1, math.nan, "0.1", False):
        with refused(f"dropout must be a probability in [0, 1); got {bad!r}"):
            probability("dropout", bad)


def test_fraction_boundary() -> None:
    assert fraction("valid_fraction", 0) == 0.0
    with refused("valid_fraction must be a number in [0, 1); got 1"):
        fraction("valid_fraction", 1)


def test_boolean_refuses_look_alikes() -> None:
    assert boolean("norm_first", False) is False
    for bad in (1, 0, "yes", None):
        with refused(f"norm_first must be true or false; got {bad!r}"):
            boolean("norm_first", bad)


def test_text_must_have_content() -> None:
    assert text("dir", "out") == "out"
    for bad in ("", "  \n", 3, None):
        with refused(f"dir must be a non-empty string; got {bad!r}"):
            text("dir", bad)


def test_one_of_takes_a_tuple_or_dict_keys_and_any_value() -> None:
    assert one_of("activation", "gelu", {"relu": None, "gelu": None}) == "gelu"
    with refused("activation must be one of 'relu', 'gelu'; got 'swish'"):
        one_of("activation", "swish", ("relu", "gelu"))
    # An unhashable value (a list from YAML) against a dict of choices is a clear error, not a TypeError.
    with refused("activation must be one of 'relu', 'gelu'; got ['relu']"):
        one_of("activation", ["relu"], {"relu": None, "gelu": None})


def test_optional_lets_none_through_and_passes_arguments_on() -> None:
    check = optional(int_at_least)
    assert check("patience", None, 5) is None
    assert check("patience", 5, 5) == 5
    with refused("patience must be an int >= 5; got 4"):
        check("patience", 4, 5)


def test_short_repr_of_an_exponentially_large_value_is_fast_and_bounded() -> None:
    value: object = ["x" * 10_000]
    for _ in range(100):  # 2**100 leaves once expanded, as a YAML alias bomb builds
        value = [value, value, {"k": value}]
    start = time.perf_counter()
    shown = short_repr(value)
    assert time.perf_counter() - start < 0.5
    assert len(shown) <= 200
    assert shown.startswith("[[[[...], [...], {...}], ")


def test_short_repr_of_huge_scalars() -> None:
    assert short_repr(10**5000) == "<an int of about 5001 digits>"  # repr() itself raises past 4300 digits
    shown = short_repr("y" * 100_000)
    assert len(shown) <= 200 and shown.startswith("'yyy")
    assert short_repr(0.1) == "0.1" and short_repr("a") == "'a'"


def test_qualified() -> None:
    assert qualified("training", "lr") == "training.lr"
    assert qualified("", "lr") == "lr"


def test_data_errors_are_config_errors() -> None:
    # One except clause catches every bad argument or config value, whichever layer found it.
    with pytest.raises(ConfigError, match="max_chars must be a positive integer or None; got 0"):
        filter_pairs([("a", "b")], source="test", max_chars=0)


@dataclass
class Inner(StrictConfig):
    size: int = option(3, int_at_least)


@dataclass
class Example(StrictConfig):
    name: str = required(text)
    layers: int = option(2, int_at_least)
    pad_id: int = option(0, int_at_least, 0)
    dropout: float = option(0.1, probability)
    kind: str = option("a", one_of, ("a", "b"))
    patience: int | None = option(None, optional(int_at_least))
    sizes: list[int] = option([1, 2], lambda name, value: value)
    inner: Inner = section(Inner)
    extra: Inner | None = section(Inner, nullable=True)

    def check(self, prefix: str) -> None:
        if self.pad_id >= self.layers:
            raise ConfigError(f"{qualified(prefix, 'pad_id')} must be < {qualified(prefix, 'layers')}")


@dataclass(frozen=True)
class Frozen(StrictConfig):
    rate: float = option(0, probability)


def test_fields_are_checked_and_normalized_on_construction() -> None:
    config = Example("run", dropout=0)
    assert isinstance(config.dropout, float)
    assert isinstance(Frozen().rate, float)
    with refused("layers must be an int >= 1; got 0"):
        Example("run", layers=0)
    with refused("pad_id must be < layers"):  # the cross-field hook, after the fields
        Example("run", pad_id=2)


def test_from_dict_names_keys_by_their_path_in_the_file() -> None:
    with refused("train.layers must be an int >= 1; got 0"):
        Example.from_dict({"name": "run", "layers": 0}, "train")
    with refused("train.inner.size must be an int >= 1; got -1"):
        Example.from_dict({"name": "run", "inner": {"size": -1}}, "train")
    with refused("train.pad_id must be < train.layers"):
        Example.from_dict({"name": "run", "pad_id": 5}, "train")
    # The prefix of a from_dict does not leak into configs built later in code.
    with refused("layers must be an int >= 1; got 0"):
        Example("run", layers=0)


@dataclass
class Builder(StrictConfig):
    inner_size: int = option(1, int_at_least, 0)

    def check(self, prefix: str) -> None:
        Inner(self.inner_size)  # a config built in code while from_dict builds this one


def test_a_config_built_during_from_dict_keeps_its_own_names() -> None:
    with refused("size must be an int >= 1; got 0"):
        Builder.from_dict({"inner_size": 0}, "model")


def test_from_dict_unknown_and_missing_keys() -> None:
    valid = "valid keys: name, layers, pad_id, dropout, kind, patience, sizes, inner, extra"
    with refused(f"unknown Example key(s): 'colour', 'heads'; {valid}"):
        Example.from_dict({"name": "run", "colour": 1, "heads": 2})
    with refused(f"unknown key train.colour; {valid.replace('valid keys', 'valid keys of train')}"):
        Example.from_dict({"name": "run", "colour": 1}, "train")
    with refused("unknown key train.inner.width; valid keys of train.inner: size"):
        Example.from_dict({"name": "run", "inner": {"width": 1}}, "train")
    with refused("Example needs key(s) 'name'"):
        Example.from_dict({})
    with refused("train.name is required"):
        Example.from_dict(None, "train")


def test_from_dict_refuses_a_non_mapping() -> None:
    with pytest.raises(TypeError, match="^Example.from_dict needs a mapping; got list$"):
        Example.from_dict([1])
    with refused("train must be a mapping of keys to values; got [1]"):
        Example.from_dict([1], "train")
    with refused("train.inner must be a mapping of keys to values; got 7"):
        Example.from_dict({"name": "run", "inner": 7}, "train")


def test_sections_and_round_trip() -> None:
    config = Example.from_dict({"name": "run", "inner": None, "extra": {"size": 9}, "sizes": [4]})
    assert config.inner == Inner(3)  # a section given as null (an empty YAML section) has its defaults
    assert config.extra == Inner(9)
    assert Example.from_dict({"name": "run"}).extra is None
    assert Example.from_dict({"name": "run", "extra": None}).extra is None
    data = config.to_dict()
    assert data["extra"] == {"size": 9} and data["inner"] == {"size": 3}
    assert Example.from_dict(data) == config
    data["sizes"].append(5)  # to_dict is a copy: changing it leaves the config alone
    assert config.sizes == [4]
    assert Example("a").sizes is not Example("b").sizes  # a list default is not shared between instances
