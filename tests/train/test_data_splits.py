"""Your own files: dropped pairs are reported, and data.test is scored with the exported model."""

from __future__ import annotations

import json
from pathlib import Path

from qkv.data.corpus import generate_corpus
from qkv.train.config import Config
from qkv.train.ddp import DistContext
from qkv.train.trainer import TrainResult, train


def write_tsv(path: Path, pairs: list[tuple[str, str]]) -> dict[str, str]:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    return {"tsv": str(path)}


def run(config: dict) -> TrainResult:
    return train(Config.from_dict(config), ctx=DistContext(), echo=lambda line: None)


def test_dropped_pairs_are_logged_and_the_test_split_is_scored(tmp_path, make_config):
    corpus = generate_corpus("reverse", 200, seed=3)
    train = [*corpus.train, ("", "x"), ("y", "  ")]  # two pairs with an empty side
    config = make_config(tmp_path / "run", training={"max_steps": 4, "valid_every": 4})
    config["data"] = {
        "train": write_tsv(tmp_path / "train.tsv", train),
        "valid": write_tsv(tmp_path / "valid.tsv", corpus.valid),
        "test": write_tsv(tmp_path / "test.tsv", corpus.test[:5]),
        "tokenizer": "char",
        "shared_vocab": True,
    }
    result = run(config)
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert (
        f"train split: {tmp_path / 'train.tsv'}: {len(train)} pairs read, {len(corpus.train)} kept, "
        "2 dropped empty" in log
    )
    assert "valid split:" not in log  # nothing dropped there, nothing to say
    assert result.test_scores["sentences"] == 5
    assert "test (exported model) | loss " in log and "  5 sentences | BLEU|nrefs:1" in log
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "test" and records[-1]["sentences"] == 5
