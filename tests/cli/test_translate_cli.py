"""``qkv translate``: stdin and files, one output line per input line in input order, alignment plots."""

from __future__ import annotations

import io
import shutil
import sys

import pytest

from qkv.cli import main
from qkv.models.search import Hypothesis
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
    assert (
        main(
            [
                "translate",
                "--model",
                str(trained_model.directory),
                "--input",
                str(path),
                "--beam",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
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
    assert "--beam must be an int >= 1" in capsys.readouterr().err
    assert main(["translate", "--model", str(trained_model.directory), "--input", str(tmp_path / "nope")]) == 2
    assert "cannot read" in capsys.readouterr().err


# ---- bad input: lines, encodings, options, output paths, devices, damaged models ---------------------------


def byte_stdin(data: bytes) -> io.TextIOWrapper:
    """A stdin over ``data`` as a terminal in the C locale gives it (undecodable bytes as surrogate escapes)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")


def test_lines_end_at_newline_only(trained_model, monkeypatch, capsys):
    # Form feed, U+2028, U+0085 and \x1c are line breaks to str.splitlines, not to a text file.
    lines = ["a\x0cb", "c\u2028d e", "f\x85g\x1ch", "j"]
    data = "\r\n".join(lines).encode("utf-8") + b"\n"
    monkeypatch.setattr(sys, "stdin", byte_stdin(data))
    assert main(["translate", "--model", str(trained_model.directory), "--beam", "1"]) == 0
    translator = Translator.load(trained_model.directory)
    assert capsys.readouterr().out.split("\n")[:-1] == [translator.translate([s], beam=1)[0].text for s in lines]


def test_input_that_is_not_utf8_is_refused_naming_the_line(trained_model, tmp_path, monkeypatch, capsys):
    data = b"a b\nc \xff d\n"
    monkeypatch.setattr(sys, "stdin", byte_stdin(data))
    assert main(["translate", "--model", str(trained_model.directory)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "qkv translate: error: stdin line 2 is not valid UTF-8 (0xff at byte 3" in captured.err
    path = tmp_path / "in.txt"
    path.write_bytes(data)
    assert main(["translate", "--model", str(trained_model.directory), "--input", str(path)]) == 2
    assert f"--input {path} line 2 is not valid UTF-8" in capsys.readouterr().err


@pytest.fixture
def no_translating(monkeypatch):
    """Translating fails the test: a check that must come first did not."""

    def refuse(*args, **kwargs):
        raise AssertionError("translated before checking the options")

    monkeypatch.setattr(Translator, "translate", refuse)


@pytest.mark.parametrize("option", ["--output", "--attention"])
def test_output_paths_are_checked_before_translating(
    trained_model, tmp_path, monkeypatch, capsys, no_translating, option
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\n"))
    target = tmp_path / "missing" / "dir" / "x.png"
    assert main(["translate", "--model", str(trained_model.directory), option, str(target)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"qkv translate: error: {option} {target}: the directory {target.parent} does not exist; "
        "create it first\n"
    )


ALPHA_RANGE = "--length-penalty must be a number in [0, 10] (GNMT alpha); got"
BAD_OPTIONS = {
    "nan": (["--length-penalty", "nan"], f"{ALPHA_RANGE} nan"),
    "negative": (["--length-penalty", "-1"], f"{ALPHA_RANGE} -1.0"),
    "huge": (["--length-penalty", "1e9"], f"{ALPHA_RANGE} 1000000000.0"),
    "zero tokens": (["--max-tokens", "0"], "--max-tokens must be an int >= 1; got 0"),
    "negative tokens": (["--max-tokens", "-5"], "--max-tokens must be an int >= 1; got -5"),
    "zero length": (["--max-output-length", "0"], "--max-output-length must be an int >= 1; got 0"),
}


@pytest.mark.parametrize("argv, message", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_decoding_options_are_checked(trained_model, monkeypatch, capsys, no_translating, argv, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\n"))
    assert main(["translate", "--model", str(trained_model.directory), *argv]) == 2
    assert capsys.readouterr().err == f"qkv translate: error: {message}\n"


def test_max_output_length_bounds_each_translation(trained_model, monkeypatch, capsys):
    lines = ["a b c d e f g h", "j"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{s}\n" for s in lines)))
    argv = ["translate", "--model", str(trained_model.directory), "--beam", "1", "--max-output-length", "2"]
    assert main(argv) == 0
    translator = Translator.load(trained_model.directory)
    unbounded = [r.hypothesis.tokens for r in translator.translate(lines, beam=1)]
    assert min(len(tokens) for tokens in unbounded) > 2  # the tiny model does not stop by itself
    # Greedy search is a prefix of itself: the bounded output is the first 2 tokens of the unbounded one.
    assert capsys.readouterr().out.splitlines() == [translator.tgt_tokenizer.decode(t[:2]) for t in unbounded]


def test_a_long_line_decodes_at_most_the_default_length(trained_model, monkeypatch):
    import qkv.train.translate as translate_module

    caps = []

    def recording_greedy(*args, max_len_cap=None, **kwargs):
        caps.append(max_len_cap)
        return [Hypothesis([], 0.0, 0.0)]

    monkeypatch.setattr(translate_module, "greedy_search", recording_greedy)
    Translator.load(trained_model.directory).translate(["a " * 5000], beam=1)
    assert caps == [translate_module.DEFAULT_MAX_OUTPUT_LENGTH]  # not 1.5 · 10,000 + 10 steps


def test_learned_positions_cap_the_output_length():
    from qkv.models.config import TransformerConfig
    from qkv.models.transformer import TransformerSeq2Seq
    from qkv.train.translate import output_length_cap

    config = TransformerConfig(
        8,
        8,
        d_model=8,
        num_heads=2,
        encoder_layers=1,
        decoder_layers=1,
        ffn_dim=8,
        positional="learned",
        max_positions=40,
    )
    model = TransformerSeq2Seq(config)
    assert output_length_cap(model) == 40 and output_length_cap(model, 30) == 30
    with pytest.raises(ValueError, match="--max-output-length 41 exceeds the model's 40 learned positions"):
        output_length_cap(model, 41, flags=True)


def test_finished_chunks_are_written_before_the_rest_is_translated(trained_model, tmp_path, monkeypatch):
    import qkv.train.translate as translate_module

    monkeypatch.setattr(translate_module, "DEFAULT_CHUNK_SIZE", 2, raising=False)
    real = Translator.translate
    calls = []

    def killed_in_the_second_chunk(self, sentences, **kwargs):
        calls.append(list(sentences))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the run were stopped here
        return real(self, sentences, **kwargs)

    monkeypatch.setattr(Translator, "translate", killed_in_the_second_chunk)
    path, out = tmp_path / "in.txt", tmp_path / "out.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                "translate",
                "--model",
                str(trained_model.directory),
                "--input",
                str(path),
                "--beam",
                "1",
                "--output",
                str(out),
            ]
        )
    assert calls[0] == SENTENCES[:2]
    expected = [t.text for t in real(Translator.load(trained_model.directory), SENTENCES[:2], beam=1)]
    assert out.read_text(encoding="utf-8").splitlines() == expected


def test_cuda_without_cuda_is_a_clear_error(trained_model, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\n"))
    assert main(["translate", "--model", str(trained_model.directory), "--device", "cuda"]) == 2
    assert "qkv translate: error: device 'cuda': CUDA is not available" in capsys.readouterr().err


def test_a_damaged_model_file_is_one_error_line(damaged_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\n"))
    assert main(["translate", "--model", str(damaged_model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv translate: error: ") and err.count("\n") == 1
    assert "model.safetensors" in err and "Traceback" not in err


def test_a_tokenizer_from_another_run_is_named(trained_model, tmp_path, monkeypatch, capsys):
    """Each file valid on its own, but the tokenizer's vocabulary is not the model's: once silently wrong text."""
    from qkv.data.tokenizer import CharTokenizer

    directory = tmp_path / "mixed"
    shutil.copytree(trained_model.directory, directory, ignore=shutil.ignore_patterns("checkpoints"))
    tokenizer_files = sorted(directory.glob("*tokenizer.json"))
    assert tokenizer_files
    other = CharTokenizer.train(["an entirely different alphabet: xyzzy 0123456789"])
    for path in tokenizer_files:
        other.save(path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\n"))
    assert main(["translate", "--model", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qkv translate: error: ") and "do not belong together" in err and "vocab_size" in err


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone (``qkv translate | head -1`` after the first line)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_goes_away_ends_quietly(trained_model, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a b\n"))
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["translate", "--model", str(trained_model.directory), "--beam", "1"]) == 0
    assert capsys.readouterr().err == ""
