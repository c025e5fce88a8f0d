"""`qkv generate`, `qkv evaluate --text` and `qkv demo lm` on a language model trained by `qkv train`."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from qkv.cli import main

TINY_LM = {
    "task": "lm",
    "data": {"corpus": "python_docs", "max_chars": 8000, "block_size": 24},
    "model": {"d_model": 16, "num_heads": 2, "num_layers": 1, "ffn_dim": 32, "dropout": 0.0},
    "training": {"batch_size": 8, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2, "valid_every": 12, "valid_blocks": 4},
    "output": {"checkpoint_every": 12, "log_every": 12, "progress_bar": False},
}


@pytest.fixture(scope="module")
def lm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``qkv train`` on the first 8,000 characters of the built-in text, 12 steps (about a second)."""
    root = tmp_path_factory.mktemp("qkv_lm")
    config = root / "lm.yaml"
    config.write_text(yaml.safe_dump({**TINY_LM, "output": {**TINY_LM["output"], "dir": str(root / "m")}}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["train", str(config)]) == 0
    return root / "m"


def generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["generate", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_generate_streams_a_reproducible_continuation(lm_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = generate(
        capsys, "--model", str(lm_model), "--prompt", "The ", "--max-new-tokens", "15", "--seed", "4"
    )
    assert (status, err) == (0, "")
    assert out.startswith("The ") and out.endswith("\n") and len(out) == len("The ") + 15 + 1
    assert (
        generate(capsys, "--model", str(lm_model), "--prompt", "The ", "--max-new-tokens", "15", "--seed", "4")[1]
        == out
    )
    assert (
        generate(capsys, "--model", str(lm_model), "--prompt", "The ", "--max-new-tokens", "15", "--seed", "5")[1]
        != out
    )


def test_generate_reads_one_prompt_a_line_from_stdin(
    lm_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"def\nclass\n")))
    status, out, _ = generate(capsys, "--model", str(lm_model), "--max-new-tokens", "5", "--temperature", "0")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 2 and lines[0].startswith("def") and lines[1].startswith("class")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\ncaf\xe9\n")))
    status, out, err = generate(capsys, "--model", str(lm_model))
    assert status == 2 and out == "" and "stdin line 2 is not valid UTF-8" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--prompt", "x" * 30],
            "the prompt has 30 tokens and --max-new-tokens is 200, but this model sees at most 24",
        ),
        (["--prompt", "x", "--top-p", "0"], r"--top-p must be in (0, 1] or None; got 0.0"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens must be an int >= 0; got -3"),
    ],
)
def test_generate_errors_are_one_line(
    args: list[str], message: str, lm_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = generate(capsys, "--model", str(lm_model), *args)
    assert status == 2 and out == ""
    assert err.startswith("qkv generate: error: ") and message in err and err.count("\n") == 1


def test_generate_refuses_a_translation_model(trained_model, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = generate(capsys, "--model", str(trained_model.directory), "--prompt", "x")
    assert status == 2 and "holds a transformer_seq2seq model, not a language model" in err and "qkv translate" in err


def test_evaluate_text_reports_loss_perplexity_and_bits(
    lm_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The if statement is used for conditional execution.\n", encoding="utf-8")
    assert main(["evaluate", "--model", str(lm_model), "--text", str(text), "--json"]) == 0

    scores = json.loads(capsys.readouterr().out)
    assert scores["tokens"] == scores["chars"] == scores["bytes"] == 52
    assert scores["ppl"] == pytest.approx(math.exp(scores["loss"]))
    assert scores["bpc"] == pytest.approx(scores["loss"] / math.log(2))  # char level: one token a character
    assert main(["evaluate", "--model", str(lm_model), "--text", str(text)]) == 0
    printed = capsys.readouterr().out
    assert f"perplexity = {scores['ppl']:.2f}" in printed and f"bits per character = {scores['bpc']:.3f}" in printed


def test_evaluate_text_errors(lm_model: Path, tmp_path: Path, trained_model, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    assert main(["evaluate", "--model", str(lm_model), "--text", str(empty)]) == 2
    assert "empty.txt is empty" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(lm_model), "--src", str(empty), "--ref", str(empty)]) == 2
    assert "holds a language model; score a text with qkv evaluate" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("some text", encoding="utf-8")
    assert main(["evaluate", "--model", str(trained_model.directory), "--text", str(text)]) == 2
    assert "not a language model" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(lm_model), "--text", str(text), "--src", str(text)]) == 2
    assert "not both" in capsys.readouterr().err


def test_demo_lm_samples_trains_and_samples_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = [
        "--set",
        "data.max_chars=20000",
        "--set",
        "training.max_steps=6",
        "--set",
        "training.valid_every=6",
        "--set",
        "training.valid_blocks=4",
        "--set",
        "output.checkpoint_every=6",
        "--set",
        "model.num_layers=1",
        "--set",
        "model.d_model=32",
        "--set",
        "output.progress_bar=false",
    ]
    assert main(["demo", "lm", "--out", str(tmp_path / "d"), *tiny]) == 0
    printed = capsys.readouterr().out
    assert "1. A small GPT before training" in printed and "3. After training" in printed
    assert printed.count("'The if statement' → ") == 2 and "bits per character" in printed
    assert (tmp_path / "d" / "model.safetensors").is_file()


def test_translate_refuses_a_language_model(
    lm_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\n"))
    assert main(["translate", "--model", str(lm_model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv translate: error: ") and "holds a language model" in err and "qkv generate" in err
