"""The language-modelling task: its config sections, data preparation, batches, loss and validation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.train.tiny_tasks import prepared_task, tiny_config

from qkv.checks import ConfigError
from qkv.data import CharTokenizer, DataError, load_tokenizer
from qkv.models import TransformerLM
from qkv.train.config import Config
from qkv.train.config import ConfigError as TrainConfigError
from qkv.train.ddp import DistContext
from qkv.train.tasks.lm import LanguageModelingTask

TINY_LM: dict[str, Any] = {
    "task": "lm",
    "data": {"corpus": "python_docs", "max_chars": 6000, "block_size": 16},
    "model": {"d_model": 16, "num_heads": 2, "num_layers": 1, "ffn_dim": 32, "dropout": 0.0},
    "training": {"batch_size": 4, "valid_blocks": 3, "sample_tokens": 12, "max_steps": 4},
}


def lm_config(out: Path, **sections: dict[str, Any]) -> Config:
    return tiny_config(TINY_LM, out, **sections)


def prepared(out: Path, **sections: dict[str, Any]) -> LanguageModelingTask:
    return prepared_task(lm_config(out, **sections), LanguageModelingTask)


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("data", {"files": ["a.txt"]}, "give either data.corpus .* or data.files .*, not both"),
        ("data", {"corpus": None}, r"give either data.corpus \(built-in: python_docs\) or data.files"),
        ("data", {"tokenizer": "word"}, "data.tokenizer must be one of 'char', 'byte', 'sentencepiece'; got 'word'"),
        ("data", {"tokenizer": "byte", "vocab_size": 300}, "data.vocab_size must be null with the byte tokenizer"),
        ("data", {"valid_fraction": 0}, "data.valid_fraction must be > 0"),
        ("data", {"block_size": 0}, "data.block_size must be an int >= 1; got 0"),
        ("model", {"num_heads": 3}, "model.d_model=16 must be a multiple of num_heads=3"),
        ("model", {"window": -1}, "model.window must be an int >= 1; got -1"),
        ("model", {"positional": "alibi"}, "model.positional must be one of"),
        ("model", {"n_embd": 8}, "unknown key model.n_embd; valid keys of model: d_model"),
        ("training", {"batch_size": 0}, "training.batch_size must be an int >= 1; got 0"),
        ("training", {"valid_beam": 2}, "training.valid_beam is a key of task translation, not of task lm"),
        ("training", {"early_stopping_metric": "bleu"}, "early_stopping_metric must be one of loss, ppl, bpc, bpb"),
    ],
)
def test_bad_config_values_name_the_key(section: str, values: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises((ConfigError, TrainConfigError), match=message):
        lm_config(tmp_path, **{section: values})


def test_learned_positions_must_cover_the_block(tmp_path: Path) -> None:
    task = prepared(tmp_path, model={"max_positions": 8})
    with pytest.raises(ConfigError, match=r"model.max_positions \(8\) must be >= data.block_size \(16\)"):
        task.build_model()
    rotary = prepared(tmp_path / "r", model={"max_positions": 8, "positional": "rotary"})
    assert isinstance(rotary.build_model(), TransformerLM)


def test_prepare_writes_the_tokenizer_and_splits_by_position(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdefghij" * 20, encoding="utf-8")
    (tmp_path / "b.txt").write_text("0123456789" * 20, encoding="utf-8")
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    task = prepared(tmp_path / "out", data={"corpus": None, "files": files, "valid_fraction": 0.25})
    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    assert isinstance(tok, CharTokenizer)
    text = "abcdefghij" * 20 + "\n" + "0123456789" * 20
    cut = len(text) - round(len(text) * 0.25)
    assert tok.decode(task.train_tokens.tolist()) == text[:cut]
    assert tok.decode(task.valid_tokens.tolist()) == text[cut:]
    assert task.train_tokens[0] == tok.bos_id and task.valid_tokens[0] == tok.bos_id
    model = task.build_model()
    assert isinstance(model, TransformerLM) and model.config.vocab_size == tok.vocab_size
    assert model.config.max_positions == 16  # data.block_size


def test_empty_and_too_short_texts_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.txt is empty"):
        prepared(tmp_path / "a", data={"corpus": None, "files": [str(tmp_path / "empty.txt")]})
    (tmp_path / "short.txt").write_text("just a few words here", encoding="utf-8")
    with pytest.raises(DataError, match=r"training text has 19 tokens after tokenizing, shorter than one block"):
        prepared(tmp_path / "b", data={"corpus": None, "files": [str(tmp_path / "short.txt")], "block_size": 64})


@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_other_tokenizers_keep_the_text(tokenizer: str, tmp_path: Path) -> None:
    lines = [f"Line {i}: naïve text  with  spaces,\n\tand tabs." for i in range(60)]
    (tmp_path / "t.txt").write_text("\n".join(lines), encoding="utf-8")
    extra = {"vocab_size": 80, "sentencepiece_type": "bpe"} if tokenizer == "sentencepiece" else {}
    task = prepared(
        tmp_path / "out", data={"corpus": None, "files": [str(tmp_path / "t.txt")], "tokenizer": tokenizer, **extra}
    )
    train_text, valid_text = task.read_text()
    assert task.tokenizer.decode(task.train_tokens.tolist()) == train_text
    assert task.tokenizer.decode(task.valid_tokens.tolist()) == valid_text


def test_loss_is_the_summed_cross_entropy_of_the_next_tokens(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.train_batches()))
    assert batch.shape == (4, 17) and task.batch_tokens(batch) == 64
    out = task.loss(model, batch, torch.device("cpu"))
    logits = model(batch[:, :-1])
    expected = sum(F.cross_entropy(logits[i], batch[i, 1:], reduction="sum") for i in range(4))
    torch.testing.assert_close(out.loss, expected)
    assert out.tokens == 64 and out.nll == pytest.approx(float(expected.detach()))
    assert task.shard(batch) == (batch, 1.0)


def test_shard_gives_each_rank_its_rows(tmp_path: Path) -> None:
    config = lm_config(tmp_path)
    batch = torch.arange(3 * 5).reshape(3, 5)
    rank1 = config.task_class(config, DistContext(rank=1, world_size=2), print)
    part, weight = rank1.shard(batch)
    assert torch.equal(part, batch[[1]]) and weight == 1.0
    rank3 = config.task_class(config, DistContext(rank=3, world_size=4), print)
    assert rank3.shard(batch)[1] == 0.0  # a stand-in row whose loss does not count


def test_validation_reports_consistent_metrics_and_a_sample(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    torch.manual_seed(0)
    model = task.build_model().eval()
    result = task.validate(model, torch.device("cpu"), step=0)
    m = result.metrics
    assert set(m) == set(LanguageModelingTask.metrics)
    assert m["ppl"] == pytest.approx(math.exp(m["loss"]))
    tokens = result.extra["tokens"]
    assert tokens == 3 * 16  # valid_blocks windows of block_size targets; char tokens are characters
    assert m["bpc"] == pytest.approx(m["loss"] * tokens / result.extra["chars"] / math.log(2))
    assert len(result.extra["sample"]) == 12 and any("sample:" in line for line in result.lines)
    # the sample comes from its own generator: validating does not move the global RNG
    state = torch.get_rng_state()
    task.validate(model, torch.device("cpu"), step=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_an_lm_run_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from qkv.train.trainer import train

    def run(out: Path, steps: int, *, resume: bool = False) -> None:
        config = lm_config(
            out,
            model={"dropout": 0.1},  # dropout draws must resume too
            training={"max_steps": steps, "valid_every": 100, "lr": 3e-3, "warmup_steps": 2},
        )
        config.output.checkpoint_every, config.output.export, config.output.progress_bar = 3, "last", False
        train(config, resume=resume, echo=lambda line: None)

    run(tmp_path / "whole", 6)
    run(tmp_path / "killed", 3)  # a run stopped after its step-3 checkpoint
    run(tmp_path / "killed", 6, resume=True)
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)
    assert "resumed from" in (tmp_path / "killed" / "train.log").read_text(encoding="utf-8")
