"""One tiny model trained through ``qkv train`` for the train / translate / evaluate command tests."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from qkv.cli import main

TINY_TRAIN = {
    "data": {"corpus": "copy", "size": 200, "seed": 1, "tokenizer": "char", "shared_vocab": False},
    "model": {"d_model": 16, "num_heads": 2, "encoder_layers": 1, "decoder_layers": 1, "ffn_dim": 32},
    "training": {
        "max_steps": 30,
        "max_tokens": 160,
        "lr": 3e-3,
        "warmup_steps": 5,
        "valid_every": 15,
        "valid_max_sentences": 10,
        "early_stopping_metric": "chrf",
    },
    "output": {
        "checkpoint_every": 10,
        "keep_last": 2,
        "average_last": 2,
        "export": "averaged",
        "log_every": 10,
        "progress_bar": False,
    },
}


@dataclass
class TrainedModel:
    directory: Path
    config: Path
    status: int
    stdout: str


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models are much faster without thread hand-offs
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> TrainedModel:
    """``qkv train`` on a 200-pair copy corpus, 30 steps (a few seconds)."""
    root = tmp_path_factory.mktemp("qkv_train")
    config = root / "tiny.yaml"
    data = {**TINY_TRAIN, "output": {**TINY_TRAIN["output"], "dir": str(root / "model")}}
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = io.StringIO()
    with one_thread(), contextlib.redirect_stdout(out):
        status = main(["train", str(config)])
    return TrainedModel(root / "model", config, status, out.getvalue())


@pytest.fixture
def damaged_model(trained_model, tmp_path) -> Path:
    """A copy of the trained model directory whose ``model.safetensors`` is cut off halfway."""
    directory = tmp_path / "damaged"
    shutil.copytree(trained_model.directory, directory, ignore=shutil.ignore_patterns("checkpoints"))
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return directory
