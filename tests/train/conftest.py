"""A tiny training configuration: a few seconds of CPU for a whole run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

TINY: dict[str, Any] = {
    "data": {"corpus": "reverse", "size": 200, "seed": 0, "tokenizer": "char", "shared_vocab": True},
    "model": {
        "d_model": 16,
        "num_heads": 2,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "ffn_dim": 32,
        "dropout": 0.1,
    },
    "training": {
        "max_steps": 24,
        "max_tokens": 128,
        "lr": 3e-3,
        "warmup_steps": 4,
        "valid_every": 8,
        "valid_max_sentences": 8,
        "early_stopping_metric": "chrf",
    },
    "output": {"checkpoint_every": 4, "keep_last": 2, "export": "last", "log_every": 8, "progress_bar": False},
}


@pytest.fixture(autouse=True)
def _train_on_one_thread(one_thread: None) -> None:
    """Applies ``one_thread`` (``tests/conftest.py``) to every test in this directory."""


def tiny_config(out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """``TINY`` writing to ``out_dir``, with ``sections``' keys replacing its own."""
    config = copy.deepcopy(TINY)
    config["output"]["dir"] = str(out_dir)
    for name, values in sections.items():
        config[name].update(values)
    return config


@pytest.fixture
def make_config():
    """``tiny_config`` (a fixture, since test modules cannot import a conftest by name reliably)."""
    return tiny_config


@pytest.fixture
def write_config(tmp_path: Path):
    """``write_config(out_dir, **sections) -> path`` of a YAML file holding ``tiny_config``."""

    def write(out_dir: Path, name: str = "config.yaml", **sections: dict[str, Any]) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(tiny_config(out_dir, **sections)), encoding="utf-8")
        return path

    return write
