"""``qkv translate``: stdin and files, one output line per input line in input order, alignment plots."""

from __future__ import annotations

import io
import sys

import pytest

from qkv.cli import main
from qkv.train.translate import Translator

pytestmark = pytest.mark.usefixtures("single_thread")

SENTENCES = ["a b c d e f g h", "j", "c a", "", "b b b b", "d e f g h i j a b c"]


def test_reads_stdin_and_keeps_empty_lines(trained_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{s}\n" for s in SENTENCES)))
    assert main(["translate", "--model", str(trained_model.directory), "--input", "-", "--beam", "2"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == len(SENTENCES) + 1 and lines[-1] == ""
    assert lines[3] == ""  # the empty input line


def test_file_input_keeps_input_order(trained_model, tmp_path, capsys):
    path = tmp_path / "in.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    assert main(["translate", "--model", str(trained_model.directory), "--input", str(path), "--beam", "1"]) == 0
    batched = capsys.readouterr().out.splitlines()
    # Batching sorts by length; each line must still be the translation of its own input line.
    translator = Translator.load(trained_model.directory)
    alone = [translator.translate([s], beam=1)[0].text for s in SENTENCES]
    assert batched == alone

    out = tmp_path / "out.txt"
    assert main(["translate", "--model", str(trained_model.directory), "--input", str(path), "--beam", "1",
                 "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8").splitlines() == alone and capsys.readouterr().out == ""


def test_attention_plot(trained_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nc a f\nb\n"))
    plot = tmp_path / "align.png"
    assert main(["translate", "--model", str(trained_model.directory), "--beam", "3", "--attention", str(plot)]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "alignment of sentence 2" in captured.err  # the first non-empty one


def test_translations_carry_cross_attention_for_alignment(trained_model):
    result = Translator.load(trained_model.directory).translate(["c a f"], beam=2, need_attention=True)[0]
    attention = result.hypothesis.cross_attention
    layers, heads, t, s = attention.shape
    assert (layers, heads) == (1, 2) and s == len(result.src_tokens) == 5
    assert t == len(result.tgt_tokens)
    assert result.src_tokens == ["c", "▁", "a", "▁", "f"]


def test_errors(trained_model, tmp_path, capsys):
    assert main(["translate", "--model", str(tmp_path), "--input", "-"]) == 2
    assert "qkv translate: error:" in capsys.readouterr().err
    assert main(["translate", "--model", str(trained_model.directory), "--beam", "0"]) == 2
    assert "--beam must be >= 1" in capsys.readouterr().err
    assert main(["translate", "--model", str(trained_model.directory), "--input", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capsys.readouterr().err
