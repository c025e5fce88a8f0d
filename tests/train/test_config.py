"""The YAML config: the reference file documents every option with its default; errors name the key."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from qkv.train.config import (
    Config,
    ConfigError,
    DataConfig,
    OutputConfig,
    SplitFiles,
    TrainingConfig,
    load_config,
    parse_override,
)

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "qkv" / "configs"
MINIMAL = {"data": {"corpus": "numbers"}, "output": {"dir": "runs/x"}}


def test_reference_config_loads_and_lists_every_option_with_its_default():
    config = load_config(CONFIGS / "reference.yaml")
    raw = yaml.safe_load((CONFIGS / "reference.yaml").read_text(encoding="utf-8"))
    for name, cls in (("data", DataConfig), ("training", TrainingConfig), ("output", OutputConfig)):
        assert list(raw[name]) == [f.name for f in fields(cls)], name
    assert set(raw["model"]) == {"type", *config.model.valid_keys()}
    defaults = Config.from_dict({**MINIMAL, "output": {"dir": raw["output"]["dir"]}})
    assert config.data == defaults.data
    assert config.training == defaults.training and config.output == defaults.output
    built = config.model.build(src_vocab_size=50, tgt_vocab_size=60)
    assert built == defaults.model.build(src_vocab_size=50, tgt_vocab_size=60)


def test_demo_config_loads():
    config = load_config(CONFIGS / "demo.yaml")
    assert config.data.corpus in ("numbers", "dates") and config.model.type == "transformer"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("training", "lr", -1, "training.lr must be a positive number; got -1"),
        ("training", "lr", "fast", "training.lr must be a positive number; got 'fast'"),
        ("training", "max_steps", 2.5, "training.max_steps must be an integer >= 1; got 2.5"),
        ("training", "schedule", "linear", "training.schedule must be one of inverse_sqrt, cosine, constant"),
        ("training", "betas", [0.9], "training.betas must be a list of two numbers"),
        ("output", "progress_bar", "yes", "output.progress_bar must be true or false; got 'yes'"),
        ("data", "tokenizer", "bytes", "data.tokenizer must be one of char, word, sentencepiece; got 'bytes'"),
        ("data", "valid_fraction", 1.5, "data.valid_fraction must be a number in [0, 1); got 1.5"),
        ("model", "d_model", -4, "model.d_model must be an int >= 1; got -4"),
        ("model", "d_model", 30, "model.d_model=30 must be a multiple of num_heads=8"),
        ("model", "activation", "tanh", "model.activation must be one of 'relu', 'gelu'; got 'tanh'"),
    ],
)
def test_bad_values_name_the_key(section, key, value, message):
    data = {**MINIMAL, section: {**MINIMAL.get(section, {}), key: value}}
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**MINIMAL, "training": {"lrr": 1}}, "unknown key training.lrr; valid keys of training: seed, max_steps"),
        ({**MINIMAL, "model": {"dmodel": 8}}, "unknown key model.dmodel; valid keys of model (type transformer)"),
        ({**MINIMAL, "optim": {}}, "unknown section optim; valid sections: data, model, training, output"),
        (
            {"data": {"corpus": "numbers", "train": {"src": "a", "tgtt": "b"}}, "output": {"dir": "x"}},
            "unknown key data.train.tgtt; valid keys of data.train: src, tgt, tsv",
        ),
        ({"data": {"corpus": "numbers"}, "output": {}}, "output.dir is required"),
        ({"data": {}, "output": {"dir": "x"}}, "data.train is required when data.corpus is not set"),
        ({"data": {"train": {"src": "a"}, "valid": {"tsv": "v"}}, "output": {"dir": "x"}}, "data.train.tgt is"),
        ({**MINIMAL, "output": {"dir": "x", "average_last": 5}}, "output.average_last (5) must be <= output.keep_last"),
        ({**MINIMAL, "output": {"dir": "x", "export": "averaged"}}, "output.export: averaged needs output."),
    ],
)
def test_unknown_and_missing_keys_are_named(data, message):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    assert message in str(info.value)


def test_exponent_numbers_without_a_dot_are_numbers():
    # PyYAML reads 5e-4 as a string; the config reads it as the number it means.
    config = Config.from_dict(yaml.safe_load("data: {corpus: copy}\noutput: {dir: x}\ntraining: {lr: 5e-4}\n"))
    assert config.training.lr == 5e-4


def test_user_files_config():
    config = Config.from_dict(
        {"data": {"train": {"src": "a.en", "tgt": "a.de"}, "valid": {"tsv": "v.tsv"}}, "output": {"dir": "x"}}
    )
    assert config.data.train == SplitFiles(src="a.en", tgt="a.de") and config.data.valid.tsv == "v.tsv"
    assert config.data.test is None


def test_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "training": {"lr": 0.1}}), encoding="utf-8")
    config = load_config(
        path,
        [
            "training.lr=1e-3",
            "training.betas=[0.8, 0.9]",
            "training.patience=null",
            "model.d_model=64",
            "output.dir=runs/other",
            "data.corpus=dates",
        ],
    )
    assert config.training.lr == 1e-3 and config.training.betas == [0.8, 0.9] and config.training.patience is None
    assert config.model.params["d_model"] == 64 and config.output.dir == "runs/other" and config.data.corpus == "dates"
    with pytest.raises(ConfigError, match="unknown key training.learning_rate"):
        load_config(path, ["training.learning_rate=1"])
    with pytest.raises(ConfigError, match="training.lr must be a positive number; got -2"):
        load_config(path, ["training.lr=-2"])
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        load_config(path, ["training.lr"])
    assert parse_override("data.train.src=my file.en") == (["data", "train", "src"], "my file.en")


def test_config_round_trips_through_yaml():
    config = Config.from_dict({**MINIMAL, "model": {"d_model": 64, "num_heads": 4}, "training": {"lr": 1e-3}})
    assert Config.from_dict(yaml.safe_load(config.to_yaml())) == config
