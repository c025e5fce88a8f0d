"""The training loop's decisions: early stopping, user files and tokenizers, loss going down."""

from __future__ import annotations

import json

import torch

from qkv.data.corpus import generate_corpus, write_corpus
from qkv.train.checkpoint_io import step_checkpoints
from qkv.train.config import Config
from qkv.train.ddp import DistContext
from qkv.train.trainer import TrainResult, train
from qkv.train.translate import Translator


def run(config: dict, resume: bool = False) -> TrainResult:
    return train(Config.from_dict(config), resume=resume, ctx=DistContext(), echo=lambda line: None)


def test_early_stopping_stops_and_stays_stopped(tmp_path, make_config):
    # An untrained model translates nothing exactly: exact match stays 0, so the second validation (step 16)
    # is one without improvement, and patience 1 ends the run there.
    config = make_config(tmp_path / "run", training={"early_stopping_metric": "exact_match", "patience": 1})
    result = run(config)
    assert result.stopped_early and result.step == 16 and result.best_step == 8
    assert [s for s, _ in step_checkpoints(tmp_path / "run" / "checkpoints")][-1] == 16
    again = run(config, resume=True)
    assert again.stopped_early and again.step == 16
    assert "stopped early at step 16" in (tmp_path / "run" / "train.log").read_text(encoding="utf-8")


def test_user_files_tsv_and_sentencepiece(tmp_path, make_config):
    corpus = generate_corpus("reverse", 200, seed=3)
    write_corpus(corpus, tmp_path / "data")
    tsv = tmp_path / "valid.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in corpus.valid), encoding="utf-8")
    config = make_config(tmp_path / "run", training={"max_steps": 4, "valid_every": 4})
    config["data"] = {
        "train": {"src": str(tmp_path / "data" / "train.src"), "tgt": str(tmp_path / "data" / "train.tgt")},
        "valid": {"tsv": str(tsv)},
        "tokenizer": "sentencepiece",
        "vocab_size": 20,
        "shared_vocab": False,
    }
    assert run(config).step == 4
    for name in ("src_tokenizer.json", "src_tokenizer.model", "tgt_tokenizer.json", "tgt_tokenizer.model"):
        assert (tmp_path / "run" / name).is_file(), name
    assert len(Translator.load(tmp_path / "run").translate(["a b", "c d e"], beam=1)) == 2


def test_word_tokenizer_with_shared_vocabulary(tmp_path, make_config):
    config = make_config(
        tmp_path / "run", data={"tokenizer": "word", "shared_vocab": True}, training={"max_steps": 4, "valid_every": 4}
    )
    assert run(config).step == 4
    assert (tmp_path / "run" / "tokenizer.json").is_file() and not (tmp_path / "run" / "src_tokenizer.json").exists()
    meta = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert meta["shared_vocab"] is True and meta["src_vocab_size"] == meta["tgt_vocab_size"]


def test_validation_loss_goes_down(tmp_path, make_config):
    config = make_config(tmp_path / "run", model={"dropout": 0.0}, training={"max_steps": 40, "valid_every": 20})
    run(config)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_rnn_model_trains_resumes_and_translates_with_attention(tmp_path, make_config):
    config = make_config(tmp_path / "run", training={"max_steps": 8, "valid_every": 4})
    config["model"] = {
        "type": "rnn",
        "embed_dim": 16,
        "hidden_dim": 16,
        "cell": "lstm",
        "attention": "luong_general",
        "dropout": 0.1,
    }
    config["output"]["checkpoint_every"] = 4
    assert run(config).step == 8
    meta = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert meta["model_type"] == "rnn" and meta["cell"] == "lstm"
    config["training"]["max_steps"] = 12
    assert run(config, resume=True).step == 12
    [result] = Translator.load(tmp_path / "run").translate(["a b c"], beam=2, need_attention=True)
    attention = result.hypothesis.cross_attention
    assert attention.shape[-2:] == (len(result.tgt_tokens), len(result.src_tokens))
    assert torch.allclose(attention.sum(-1), torch.ones(()))
