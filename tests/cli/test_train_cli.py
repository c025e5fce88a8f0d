"""End to end through the command line: ``qkv train`` → ``qkv translate`` → ``qkv evaluate``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from qkv.cli import main
from qkv.train.checkpoint_io import AVERAGED_FILE, BEST_FILE, load_checkpoint, step_checkpoints

pytestmark = pytest.mark.usefixtures("single_thread")

SIGNATURE = r"nrefs:1\|case:mixed\|eff:no\|tok:13a\|smooth:exp\|version:\d+\.\d+\.\d+"


def test_train_writes_a_model_directory(trained_model):
    assert trained_model.status == 0
    assert "done at step 30" in trained_model.stdout
    d = trained_model.directory
    for name in (
        "model.safetensors",
        "config.json",
        "src_tokenizer.json",
        "tgt_tokenizer.json",
        "train_config.yaml",
        "train.log",
        "metrics.jsonl",
        "data/train.src",
        "data/test.tgt",
    ):
        assert (d / name).is_file(), name
    assert [s for s, _ in step_checkpoints(d / "checkpoints")] == [20, 30]
    assert (d / "checkpoints" / BEST_FILE).is_file()
    log = (d / "train.log").read_text(encoding="utf-8")
    assert re.search(r"step 30/30 \| epoch [\d.]+ \| loss [\d.]+ \| nll [\d.]+ \| lr [\d.e+-]+ \| tokens/s \d+", log)
    records = [json.loads(line) for line in (d / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records] == [15, 30]
    assert re.fullmatch(SIGNATURE, records[-1]["bleu_signature"])
    assert {"loss", "ppl", "bleu", "chrf", "exact_match"} <= set(records[-1])


def test_the_exported_model_is_the_average_of_the_last_checkpoints(trained_model):
    d = trained_model.directory
    steps = [load_checkpoint(p).model for _, p in step_checkpoints(d / "checkpoints")]
    averaged = load_checkpoint(d / "checkpoints" / AVERAGED_FILE).model
    exported = load_file(str(d / "model.safetensors"))
    for key, t in exported.items():
        torch.testing.assert_close(averaged[key], (steps[0][key] + steps[1][key]) / 2, rtol=0, atol=1e-7)
        assert torch.equal(t, averaged[key]), key


def test_translate_and_evaluate_the_test_split(trained_model, capsys):
    d = trained_model.directory
    src, ref = d / "data" / "test.src", d / "data" / "test.tgt"
    n = len(src.read_text(encoding="utf-8").splitlines())
    assert main(["translate", "--model", str(d), "--input", str(src), "--beam", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == n

    hyp = d / "test.hyp"
    assert (
        main(["evaluate", "--model", str(d), "--src", str(src), "--ref", str(ref), "--beam", "2", "--hyp", str(hyp)])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"BLEU\|{SIGNATURE} = [\d.]+ .*", out[0]), out[0]
    assert re.fullmatch(r"chrF2\|nrefs:1\|case:mixed\|eff:yes\|nc:6\|nw:0\|space:no\|version:[\d.]+ = [\d.]+", out[1])
    assert re.fullmatch(rf"exact match = [\d.]+% \(\d+/{n}\)", out[2])
    assert len(hyp.read_text(encoding="utf-8").splitlines()) == n

    assert main(["evaluate", "--model", str(d), "--src", str(src), "--ref", str(ref), "--beam", "1", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["count"] == n and re.fullmatch(SIGNATURE, scores["bleu_signature"])


def test_config_errors_are_one_line_naming_the_key(trained_model, tmp_path, capsys):
    assert main(["train", str(trained_model.config), "--set", "training.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err == "qkv train: error: training.lr must be a positive number; got -1\n"
    assert main(["train", str(trained_model.config), "--set", "training.warmup=3"]) == 2
    assert "unknown key training.warmup; valid keys of training: seed, max_steps" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_evaluate_errors(trained_model, tmp_path, capsys):
    src = tmp_path / "s.txt"
    src.write_text("a b\nc\n", encoding="utf-8")
    ref = tmp_path / "r.txt"
    ref.write_text("a b\n", encoding="utf-8")
    assert main(["evaluate", "--model", str(trained_model.directory), "--src", str(src), "--ref", str(ref)]) == 2
    assert "has 2 lines but" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(tmp_path), "--src", str(src), "--ref", str(src)]) == 2
    assert "has no tokenizers" in capsys.readouterr().err
