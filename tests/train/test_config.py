"""The YAML config: the reference file documents every option with its default; errors name the key."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import yaml

from qkv.checks import StrictConfig, int_at_least, option
from qkv.train.config import (
    Config,
    ConfigError,
    OutputConfig,
    TrainingConfig,
    load_config,
    parse_override,
)
from qkv.train.task import Task
from qkv.train.tasks.translation_config import SplitFiles, TranslationDataConfig, TranslationTrainingConfig

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "qkv" / "configs"
MINIMAL = {"data": {"corpus": "numbers"}, "output": {"dir": "runs/x"}}


@dataclass
class FakeLMTraining(StrictConfig):
    block_batches: int = option(1, int_at_least, 1)


class FakeLMTask(Task):
    """A stand-in ``lm`` task for the registry: only its class attributes are read, it is never built."""

    name = "lm"
    data_config = TranslationDataConfig
    model_config = TranslationDataConfig
    training_config = FakeLMTraining
    metrics = ("loss",)


def test_reference_config_loads_and_lists_every_option_with_its_default():
    config = load_config(CONFIGS / "reference.yaml")
    raw = yaml.safe_load((CONFIGS / "reference.yaml").read_text(encoding="utf-8"))
    assert raw["task"] == "translation"
    for name, cls in (("data", TranslationDataConfig), ("output", OutputConfig)):
        assert list(raw[name]) == [f.name for f in fields(cls)], name
    # The trainer's keys first, then translation's own.
    assert list(raw["training"]) == [f.name for f in fields(TrainingConfig) + fields(TranslationTrainingConfig)]
    assert set(raw["model"]) == {"type", *config.model.valid_keys()}
    defaults = Config.from_dict({**MINIMAL, "output": {"dir": raw["output"]["dir"]}})
    assert config.data == defaults.data
    assert config.training == defaults.training and config.output == defaults.output
    assert config.task_training == defaults.task_training
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
        ("training", "max_steps", 2.5, "training.max_steps must be an int >= 1; got 2.5"),
        ("training", "max_epochs", 0, "training.max_epochs must be a positive number; got 0"),
        ("training", "max_time", "ten minutes", "training.max_time must be seconds (a number > 0) or a string such"),
        ("training", "max_time", "-5m", "got '-5m'"),
        ("training", "max_time", "5", "got '5'"),
        ("training", "max_time", 0, "training.max_time must be seconds (a number > 0)"),
        ("training", "valid_beam", 0, "training.valid_beam must be an int >= 1; got 0"),
        ("training", "early_stopping_metric", "accuracy", "training.early_stopping_metric must be one of bleu, chrf"),
        ("training", "schedule", "linear", "training.schedule must be one of 'inverse_sqrt', 'cosine', 'constant'"),
        ("training", "betas", [0.9], "training.betas must be a list of two numbers"),
        ("output", "progress_bar", "yes", "output.progress_bar must be true or false; got 'yes'"),
        ("data", "tokenizer", "bytes", "data.tokenizer must be one of 'char', 'word', "),
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
        ({**MINIMAL, "training": {"lrr": 1}}, "accumulate, lr,"),  # the trainer's keys...
        ({**MINIMAL, "training": {"lrr": 1}}, "max_tokens, bucket_size, label_smoothing, valid_beam"),  # ...the task's
        ({**MINIMAL, "task": "vision"}, "unknown task 'vision'; known tasks: translation, lm"),
        ({**MINIMAL, "task": ["translation"]}, "unknown task ['translation']; known tasks: translation, lm"),
        ({**MINIMAL, "training": {"max_steps": None}}, "training.max_steps is null and no other budget is set"),
        ({**MINIMAL, "training": {"schedule": "cosine", "max_steps": None, "max_epochs": 2}}, "cosine needs"),
        ({**MINIMAL, "model": {"dmodel": 8}}, "unknown key model.dmodel; valid keys of model (type transformer)"),
        ({**MINIMAL, "optim": {}}, "unknown section optim; valid top-level keys: task, data, model, training, output"),
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


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path):
    # PyYAML's safe_load reads 5e-4 as a string; qkv's loader reads it as the number it means, in files and --set.
    assert yaml.safe_load("lr: 5e-4") == {"lr": "5e-4"}
    path = tmp_path / "c.yaml"
    path.write_text("data: {corpus: copy}\noutput: {dir: x}\ntraining: {lr: 5e-4, min_lr: 1E-5}\n", encoding="utf-8")
    config = load_config(path, ["training.adam_eps=1e-8"])
    assert (config.training.lr, config.training.min_lr, config.training.adam_eps) == (5e-4, 1e-5, 1e-8)


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


def test_a_config_without_a_task_is_translation_and_says_so_when_written():
    config = Config.from_dict(MINIMAL)
    assert config.task == "translation" and config.to_dict()["task"] == "translation"
    assert config.task_training == TranslationTrainingConfig()
    assert Config.from_dict({**MINIMAL, "task": "translation"}) == config


def test_the_training_section_holds_the_trainers_keys_and_the_tasks():
    config = Config.from_dict({**MINIMAL, "training": {"lr": 1e-3, "valid_beam": 3, "max_tokens": 100}})
    assert config.training.lr == 1e-3 and config.task_training.valid_beam == 3
    assert config.task_training.max_tokens == 100
    written = config.to_dict()["training"]
    assert written["lr"] == 1e-3 and written["valid_beam"] == 3 and written["max_tokens"] == 100


def test_a_key_of_another_task_names_that_task(monkeypatch):
    from qkv.train import tasks

    # An "lm" task with its own training key, whatever the real one has: the message comes from the registry.
    monkeypatch.setitem(tasks.TASKS, "lm", f"{__name__}:FakeLMTask")
    with pytest.raises(ConfigError) as info:
        Config.from_dict({**MINIMAL, "training": {"block_batches": 4}})
    assert "training.block_batches is a key of task lm, not of task translation" in str(info.value)


def test_early_stopping_metric_defaults_to_the_tasks_first_metric():
    assert Config.from_dict(MINIMAL).metric == "bleu"
    assert Config.from_dict({**MINIMAL, "training": {"early_stopping_metric": "ppl"}}).metric == "ppl"


def test_budgets():
    # No budget at all: the default number of steps. Any other budget alone: no step limit.
    assert Config.from_dict(MINIMAL).training.max_steps == 10_000
    config = Config.from_dict({**MINIMAL, "training": {"max_epochs": 2.5}})
    assert config.training.max_steps is None and config.training.max_epochs == 2.5
    for written, seconds in ((90, 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0), ("1h30m", 5400.0)):
        config = Config.from_dict({**MINIMAL, "training": {"max_time": written}})
        assert config.training.max_time == seconds and config.training.max_steps is None, written
    both = Config.from_dict({**MINIMAL, "training": {"max_steps": 5, "max_time": "1m"}})
    assert (both.training.max_steps, both.training.max_time) == (5, 60.0)
    assert Config.from_dict(yaml.safe_load(both.to_yaml())) == both


def test_set_task_and_its_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8")
    assert parse_override("task=lm") == (["task"], "lm")
    with pytest.raises(ConfigError, match="unknown task 'vision'"):
        load_config(path, ["task=vision"])
    with pytest.raises(ConfigError, match="task is a value, not a section"):
        load_config(path, ["task.name=lm"])
