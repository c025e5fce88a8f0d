"""``qkv evaluate`` on bad input: output paths and options checked before translating, damaged models,
``--hyp`` written a chunk at a time."""

from __future__ import annotations

import pytest

import qkv.train.translate as translate_module
from qkv.cli import main
from qkv.train.translate import Translator

pytestmark = pytest.mark.usefixtures("single_thread")

SOURCES = ["a b c", "j", "c a", "b b"]


@pytest.fixture
def test_set(tmp_path) -> tuple[str, str]:
    src, ref = tmp_path / "test.src", tmp_path / "test.ref"
    src.write_text("".join(f"{s}\n" for s in SOURCES), encoding="utf-8")
    ref.write_text("".join(f"{s}\n" for s in SOURCES), encoding="utf-8")
    return str(src), str(ref)


@pytest.fixture
def no_translating(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("translated before checking the options")

    monkeypatch.setattr(Translator, "translate", refuse)


def test_hyp_path_is_checked_before_translating(trained_model, test_set, tmp_path, capsys, no_translating):
    hyp = tmp_path / "missing" / "test.hyp"
    src, ref = test_set
    assert (
        main(["evaluate", "--model", str(trained_model.directory), "--src", src, "--ref", ref, "--hyp", str(hyp)]) == 2
    )
    assert capsys.readouterr().err == (
        f"qkv evaluate: error: --hyp {hyp}: the directory {hyp.parent} does not exist; create it first\n"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--length-penalty", "nan"], "--length-penalty must be a number in [0, 10] (GNMT alpha); got nan"),
        (["--max-tokens", "0"], "--max-tokens must be an int >= 1; got 0"),
        (["--max-output-length", "-3"], "--max-output-length must be an int >= 1; got -3"),
    ],
)
def test_decoding_options_are_checked(trained_model, test_set, capsys, no_translating, argv, message):
    src, ref = test_set
    assert main(["evaluate", "--model", str(trained_model.directory), "--src", src, "--ref", ref, *argv]) == 2
    assert capsys.readouterr().err == f"qkv evaluate: error: {message}\n"


def test_a_damaged_model_file_is_one_error_line(damaged_model, test_set, capsys):
    src, ref = test_set
    assert main(["evaluate", "--model", str(damaged_model), "--src", src, "--ref", ref]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv evaluate: error: ") and err.count("\n") == 1
    assert "model.safetensors" in err and "Traceback" not in err


def test_hyp_holds_the_finished_chunks_when_stopped(trained_model, test_set, tmp_path, monkeypatch):
    monkeypatch.setattr(translate_module, "DEFAULT_CHUNK_SIZE", 2, raising=False)
    real = Translator.translate
    calls = []

    def killed_in_the_second_chunk(self, sentences, **kwargs):
        calls.append(list(sentences))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, sentences, **kwargs)

    monkeypatch.setattr(Translator, "translate", killed_in_the_second_chunk)
    hyp = tmp_path / "test.hyp"
    src, ref = test_set
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                "evaluate",
                "--model",
                str(trained_model.directory),
                "--src",
                src,
                "--ref",
                ref,
                "--beam",
                "1",
                "--hyp",
                str(hyp),
            ]
        )
    expected = [t.text for t in real(Translator.load(trained_model.directory), SOURCES[:2], beam=1)]
    assert hyp.read_text(encoding="utf-8").splitlines() == expected
