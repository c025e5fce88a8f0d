"""Hostile or broken config files: alias bombs, huge values in messages, bytes that are not UTF-8."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from qkv.train.config import ConfigError, load_config

LEVELS = 7  # 9**7 = 4.8 million values once expanded: tractable before the fix, far past the limit


def test_an_alias_bomb_is_refused_before_anything_walks_it(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    anchors = "\n".join(
        ["  x0: &l0 [x, x, x, x, x, x, x, x, x]"]
        + [f"  x{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, LEVELS)]
    )
    # The anchors sit inside training.max_steps' own mapping, so without a size limit validation reprs it.
    head = "data:\n  corpus: numbers\noutput:\n  dir: runs/x\ntraining:\n  max_steps:\n"
    path.write_text(head + anchors.replace("  x", "    x") + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: the document expands to more than 100,000 values") as e:
        load_config(path)
    assert time.perf_counter() - started < 2.0
    assert len(str(e.value)) < 400


def test_an_alias_bomb_in_a_set_override_is_refused(tmp_path: Path) -> None:
    value = (
        "{a: &a [x, x, x, x, x, x, x, x, x, x], "
        + ", ".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcd", "bcde", strict=True))
        + "}"
    )
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  corpus: numbers\noutput:\n  dir: runs/x\n")
    with pytest.raises(ConfigError, match=r"--set .*expands to more than 100,000 values"):
        load_config(config, [f"training.max_steps={value}"])


def test_a_long_bad_value_is_shown_cut_short(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    values = ", ".join(["123456"] * 5_000)
    config.write_text(f"data:\n  corpus: numbers\noutput:\n  dir: runs/x\ntraining:\n  max_steps: [{values}]\n")
    with pytest.raises(ConfigError, match=r"training\.max_steps must be an int >= 1; got \[123456, ") as e:
        load_config(config)
    assert len(str(e.value)) < 300


def test_a_config_that_is_not_utf8_names_the_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "latin1.yaml"
    config.write_bytes("output:\n  dir: runs/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text: byte 0xe9 on line 2"):
        load_config(config)


def test_a_config_that_is_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"zero\.yaml is a character device; expected a regular file"):
        load_config(link)
