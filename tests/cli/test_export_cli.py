"""``qkv export --format ctranslate2`` and ``qkv translate --engine ctranslate2``: the exported model translates
as qkv does, and bad formats, output directories and models are one error line."""

from __future__ import annotations

import io
import sys

import pytest

pytest.importorskip("ctranslate2", reason="qkv export --format ctranslate2 needs the deploy extra (ctranslate2)")

from qkv.cli import main  # noqa: E402
from qkv.train.translate import Translator  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SENTENCES = ["a b c d e f g h", "j", "", "c a", "b b b b"]


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ct2"
    assert main(["export", "--model", str(trained_model.directory), "--format", "ctranslate2", "--out", str(out)]) == 0
    return out


def test_export_then_translate_greedy_as_qkv(trained_model, exported, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{s}\n" for s in SENTENCES)))
    assert main(["translate", "--model", str(exported), "--engine", "ctranslate2", "--beam", "1"]) == 0
    lines = capsys.readouterr().out.split("\n")[:-1]
    expected = [r.text for r in Translator.load(trained_model.directory).translate(SENTENCES, beam=1)]
    assert lines == expected and lines[2] == ""


def test_export_prints_what_it_wrote(trained_model, tmp_path, capsys):
    out = tmp_path / "int8"
    args = ["export", "--model", str(trained_model.directory), "--format", "ctranslate2", "--out", str(out)]
    assert main([*args, "--quantization", "int8"]) == 0
    assert "wrote a CTranslate2 model (int8, " in capsys.readouterr().out
    assert (out / "model.bin").is_file() and (out / "qkv_export.json").is_file()


def test_translate_with_attention_plot(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nc a f\n"))
    plot = tmp_path / "align.png"
    assert main(["translate", "--model", str(exported), "--engine", "ctranslate2", "--attention", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "alignment of sentence 2" in capsys.readouterr().err


def test_bad_format_is_an_argparse_error(trained_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", str(trained_model.directory), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "argument --format: invalid choice: 'onnx'" in capsys.readouterr().err


def test_bad_out_and_model_are_one_error_line(trained_model, exported, tmp_path, capsys):
    base = ["export", "--format", "ctranslate2"]
    assert main([*base, "--model", str(trained_model.directory), "--out", str(exported)]) == 2
    assert capsys.readouterr().err == (
        f"qkv export: error: --out {exported} is a directory that is not empty; expected a new or empty "
        "directory (an export never overwrites files)\n"
    )
    (tmp_path / "file").write_text("x")
    assert main([*base, "--model", str(trained_model.directory), "--out", str(tmp_path / "file" / "sub")]) == 2
    assert f"--out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is not a directory" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    assert "is not a directory; expected a model directory of qkv train" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_translate_engine_errors(trained_model, exported, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\n"))
    assert main(["translate", "--model", str(trained_model.directory), "--engine", "ctranslate2"]) == 2
    assert "is not a CTranslate2 export of qkv export: it has no qkv_export.json" in capsys.readouterr().err
    assert main(["translate", "--model", str(exported), "--engine", "ctranslate2", "--max-output-length", "0"]) == 2
    assert "--max-output-length must be an int >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["translate", "--model", str(exported), "--engine", "marian"])
    assert "argument --engine: invalid choice: 'marian'" in capsys.readouterr().err


def test_missing_ctranslate2_is_one_error_line(trained_model, exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)
    args = ["export", "--model", str(trained_model.directory), "--format", "ctranslate2", "--out", str(tmp_path / "z")]
    assert main(args) == 2
    assert (
        "qkv export: error: the CTranslate2 export and engine need the ctranslate2 package" in capsys.readouterr().err
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\n"))
    assert main(["translate", "--model", str(exported), "--engine", "ctranslate2"]) == 2
    assert "pip install 'qkv[deploy]'" in capsys.readouterr().err
