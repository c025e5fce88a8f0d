"""`qkv demo` end to end at a tiny size: trains, scores the test split, translates, plots, and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkv.cli import main

TINY = [
    "--set",
    "data.size=300",
    "--set",
    "training.max_steps=8",
    "--set",
    "training.valid_every=8",
    "--set",
    "training.valid_max_sentences=10",
    "--set",
    "output.checkpoint_every=8",
    "--set",
    "model.encoder_layers=1",
    "--set",
    "model.decoder_layers=1",
]


def test_demo_trains_scores_translates_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    test_lines = (out / "data" / "test.src").read_text(encoding="utf-8").splitlines()
    assert f"{len(test_lines)} sentences: exact match" in printed
    assert "BLEU|nrefs:1" in printed and "chrF2|nrefs:1" in printed
    assert (out / "alignment.png").stat().st_size > 1000
    assert (out / "model.safetensors").is_file()
    # A second run finds the finished model and does not train again.
    assert main(["demo", "--out", str(out), *TINY]) == 0
    assert "steps 8 → 8" in capsys.readouterr().out


def test_demo_rejects_an_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--set", "training.lrr=1"]) == 2
    assert "training.lrr" in capsys.readouterr().err


def test_demo_interrupted_is_one_line_saying_how_to_continue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qkv.train import trainer

    def interrupted(config: object, *, resume: bool) -> None:
        raise trainer.TrainInterrupted("interrupted at step 5; --resume continues from step_00000004 (step 4)")

    monkeypatch.setattr(trainer, "train", interrupted)
    assert main(["demo", "--out", str(tmp_path / "d"), *TINY]) == 130
    err = capsys.readouterr().err
    assert (
        err == f"qkv demo: error: interrupted at step 5; --resume continues from step_00000004 (step 4) "
        f"(qkv demo --out {tmp_path / 'd'} continues)\n"
    )
