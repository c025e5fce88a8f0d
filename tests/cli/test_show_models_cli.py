"""``qkv show`` on the models ``qkv train`` writes: a language model (causal self-attention) and translation
models (encoder self-, decoder self- and cross-attention; an RNN's cross-attention), each as JSON, PNG, HTML,
a --top table and a summary; their bad inputs as one-line errors with exit status 2.

The model directories are built here, tiny and untrained: ``save_model`` and a ``CharTokenizer`` saved as
``tokenizer.json``, the files ``qkv train`` writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import qkv.cli.show as show
from qkv.cli import main
from qkv.data.tokenizer import CharTokenizer
from qkv.models import (
    LMConfig,
    RNNConfig,
    RNNSeq2Seq,
    TransformerConfig,
    TransformerLM,
    TransformerSeq2Seq,
    load_model,
    save_model,
)
from qkv.train.translate import Translator, save_tokenizers

ALPHABET = "the cat sat on a mat. ein Haus"
TEXT = "the cat"
TOKENS = ["t", "h", "e", "▁", "c", "a", "t"]
TARGET = "ein Haus"
TARGET_TOKENS = [*"ein", "▁", *"Haus", "</s>"]
MAX_POSITIONS = 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Directories ``lm``, ``transformer`` (2 encoder, 1 decoder layers) and ``rnn``."""
    root = tmp_path_factory.mktemp("show_models")
    tokenizer = CharTokenizer.train([ALPHABET])
    v = tokenizer.vocab_size
    torch.manual_seed(0)
    lm = TransformerLM(
        LMConfig(vocab_size=v, d_model=16, num_heads=2, num_layers=2, ffn_dim=32, max_positions=MAX_POSITIONS)
    )
    save_model(lm, root / "lm")
    tokenizer.save(root / "lm" / "tokenizer.json")
    layers = {"d_model": 16, "num_heads": 2, "encoder_layers": 2, "decoder_layers": 1, "ffn_dim": 32}
    config = TransformerConfig(
        src_vocab_size=v, tgt_vocab_size=v, positional="learned", max_positions=MAX_POSITIONS, **layers
    )
    save_model(TransformerSeq2Seq(config), root / "transformer")
    save_model(RNNSeq2Seq(RNNConfig(src_vocab_size=v, tgt_vocab_size=v, embed_dim=8, hidden_dim=8)), root / "rnn")
    for name in ("transformer", "rnn"):
        save_tokenizers(root / name, tokenizer, tokenizer, shared=True)
    return {name: root / name for name in ("lm", "transformer", "rnn")}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["show", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def shown_json(capsys, tmp_path: Path, *argv: str) -> dict:
    path = tmp_path / "attention.json"
    status, out, err = run(capsys, *argv, "--json", str(path))
    assert (status, out, err) == (0, f"wrote {path}\n", "")
    return json.loads(path.read_text(encoding="utf-8"))


def embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="qkv-data">(.*?)</script>', page, re.S)
    assert match, "no embedded data"
    return json.loads(match.group(1))


# ---- a language model -----------------------------------------------------------------------------------------


def test_lm_json_is_causal_and_is_the_models_attention(models, tmp_path, capsys) -> None:
    data = shown_json(capsys, tmp_path, "--model", str(models["lm"]), TEXT)
    assert data.keys() == {"model", "text", "tokens", "layers", "heads", "causal", "attentions"}
    assert (data["tokens"], data["layers"], data["heads"], data["causal"]) == (TOKENS, 2, 2, True)
    weights = np.array(data["attentions"])
    assert weights.shape == (2, 2, 7, 7)
    assert (weights[..., np.triu(np.ones((7, 7), dtype=bool), k=1)] == 0).all()  # exactly 0 above the diagonal
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)
    model = load_model(models["lm"])
    ids = torch.tensor([CharTokenizer.load(models["lm"] / "tokenizer.json").encode(TEXT)])
    with torch.no_grad():
        expected = model.decode_step(ids, model.start_state(), need_attention=True).self_attention[0]
    np.testing.assert_allclose(weights, expected.double().numpy(), atol=1e-6)


def test_lm_html_png_summary_and_top(models, tmp_path, capsys) -> None:
    html, png = tmp_path / "lm.html", tmp_path / "lm.png"
    status, _, err = run(capsys, "--model", str(models["lm"]), TEXT, "--html", str(html), "--png", str(png))
    assert (status, err) == (0, "")
    (kind,) = embedded(html.read_text(encoding="utf-8"))["kinds"]
    assert (kind["tokens"], kind["key_tokens"], kind["causal"]) == (TOKENS, TOKENS, True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    status, out, _ = run(capsys, "--model", str(models["lm"]), TEXT)
    lines = out.splitlines()
    assert status == 0 and lines[0] == f"{models['lm']}: 2 layers x 2 heads, 7 tokens; causal"
    assert lines[3].split() == ["0", "t", "-", "-"]  # the first token sees no other token
    _, out, _ = run(capsys, "--model", str(models["lm"]), TEXT, "--top", "c")
    lines = out.splitlines()
    assert lines[0].startswith("from 'c' (position 4) to each earlier token: the 3 strongest head(s) of all layers")
    assert [int(line.split()[0]) for line in lines[2:]] == [0, 1, 2, 3]  # never a later token, nor itself
    _, out, _ = run(capsys, "--model", str(models["lm"]), TEXT, "--top", "0")
    assert (
        out == "from 't' (position 0) to each earlier token: none; causal attention lets position 0 see only itself\n"
    )


# ---- translation models ---------------------------------------------------------------------------------------


def test_translation_json_with_a_given_target(models, tmp_path, capsys) -> None:
    data = shown_json(capsys, tmp_path, "--model", str(models["transformer"]), TEXT, "--target", TARGET)
    assert (data["text"], data["target"], data["target_from"]) == (TEXT, TARGET, "--target")
    kinds = data["kinds"]
    assert list(kinds) == ["encoder", "decoder", "cross"]
    assert [k["label"] for k in kinds.values()] == [
        "encoder self-attention",
        "decoder self-attention",
        "cross-attention",
    ]
    encoder, decoder, cross = (np.array(k["attentions"]) for k in kinds.values())
    t, s = len(TARGET_TOKENS), len(TOKENS)
    assert (encoder.shape, decoder.shape, cross.shape) == ((2, 2, s, s), (1, 2, t, t), (1, 2, t, s))
    assert kinds["encoder"]["tokens"] == kinds["encoder"]["key_tokens"] == TOKENS
    assert (kinds["cross"]["tokens"], kinds["cross"]["key_tokens"]) == (TARGET_TOKENS, TOKENS)
    assert kinds["decoder"]["tokens"] == TARGET_TOKENS
    assert kinds["decoder"]["key_tokens"] == ["<s>", *TARGET_TOKENS[:-1]]
    assert [k["causal"] for k in kinds.values()] == [False, True, False]
    assert (decoder[..., np.triu(np.ones((t, t), dtype=bool), k=1)] == 0).all()
    for weights in (encoder, decoder, cross):
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)


def test_translation_default_target_is_the_models_translation(models, tmp_path, capsys) -> None:
    translator = Translator.load(models["transformer"])
    (expected,) = translator.translate([TEXT], beam=1, need_attention=True)
    data = shown_json(capsys, tmp_path, "--model", str(models["transformer"]), TEXT, "--beam", "1")
    assert (data["target"], data["target_from"]) == (expected.text, "greedy search")
    cross = data["kinds"]["cross"]
    assert cross["tokens"] == expected.tgt_tokens
    # Teacher-forced over the translation = what the search's cached steps attended to.
    np.testing.assert_allclose(cross["attentions"], expected.hypothesis.cross_attention.numpy(), atol=1e-5)
    data = shown_json(capsys, tmp_path, "--model", str(models["transformer"]), TEXT)
    (beam5,) = translator.translate([TEXT], beam=5)
    assert (data["target"], data["target_from"]) == (beam5.text, "beam search, beam 5")


def test_translation_html_has_the_three_kinds(models, tmp_path, capsys) -> None:
    path = tmp_path / "view.html"
    status, _, _ = run(capsys, "--model", str(models["transformer"]), TEXT, "--target", TARGET, "--html", str(path))
    page = path.read_text(encoding="utf-8")
    data = embedded(page)
    assert status == 0 and f"<title>{models['transformer']}: {TEXT} → {TARGET}</title>" in page
    shapes = {k["name"]: (k["layers"], len(k["tokens"]), len(k["key_tokens"]), k["causal"]) for k in data["kinds"]}
    t, s = len(TARGET_TOKENS), len(TOKENS)
    assert shapes == {"encoder": (2, s, s, False), "decoder": (1, t, t, True), "cross": (1, t, s, False)}


@pytest.mark.parametrize(
    ("kind", "label", "rows", "cols"),
    [
        (None, "cross-attention", TARGET_TOKENS, TOKENS),
        ("cross", "cross-attention", TARGET_TOKENS, TOKENS),
        ("encoder", "encoder self-attention", TOKENS, TOKENS),
        ("decoder", "decoder self-attention (causal)", TARGET_TOKENS, ["<s>", *TARGET_TOKENS[:-1]]),
    ],
)
def test_translation_png_is_titled_by_its_kind(models, tmp_path, capsys, monkeypatch, kind, label, rows, cols) -> None:
    drawn = []
    monkeypatch.setattr(show, "plot_heads", lambda weights, r, c, **kw: drawn.append((weights.shape, r, c, kw)))
    path = tmp_path / "heads.png"
    argv = ["--model", str(models["transformer"]), TEXT, "--target", TARGET, "--layer", "0", "--png", str(path)]
    status, _, _ = run(capsys, *argv, *([] if kind is None else ["--kind", kind]))
    ((shape, drawn_rows, drawn_cols, options),) = drawn
    assert status == 0 and shape == (2, len(rows), len(cols))
    assert (drawn_rows, drawn_cols) == (rows, cols)
    assert options == {"title": f"{models['transformer']} {label}: layer 0", "path": path}


def test_translation_summary_and_top(models, capsys) -> None:
    status, out, _ = run(capsys, "--model", str(models["transformer"]), TEXT, "--target", TARGET)
    blocks = out.split("\n\n")
    assert status == 0 and blocks[0] == f"{models['transformer']}: {TEXT!r} -> {TARGET!r} (target: --target)"
    heads = [block.splitlines()[0] for block in blocks[1:]]
    assert heads == [
        "encoder self-attention: 2 layers x 2 heads, 7 tokens",
        "decoder self-attention: 1 layer x 2 heads, 9 target tokens x 9 decoder input tokens; causal",
        "cross-attention: 1 layer x 2 heads, 9 target tokens x 7 source tokens",
    ]
    assert blocks[2].splitlines()[3].split() == ["0", "e", "<s>"]  # the first step sees only <s>
    _, out, _ = run(capsys, "--model", str(models["transformer"]), TEXT, "--target", TARGET, "--top", "H")
    lines = out.splitlines()
    assert lines[0].startswith("from 'H' (position 4) to each source token: the 2 strongest head(s) of all layers")
    assert [line.split()[1] for line in lines[2:]] == TOKENS
    _, out, _ = run(capsys, "--model", str(models["transformer"]), TEXT, "--target", TARGET, "--kind", "decoder")
    assert out.startswith(f"{models['transformer']}: ") and out.count("\n\n") == 1 and "decoder self" in out


def test_rnn_has_only_cross_attention(models, tmp_path, capsys) -> None:
    data = shown_json(capsys, tmp_path, "--model", str(models["rnn"]), TEXT, "--target", TARGET)
    (name,) = data["kinds"]
    cross = data["kinds"]["cross"]
    assert name == "cross" and (cross["layers"], cross["heads"]) == (1, 1)
    assert np.array(cross["attentions"]).shape == (1, 1, len(TARGET_TOKENS), len(TOKENS))
    path = tmp_path / "rnn.png"
    status, out, _ = run(capsys, "--model", str(models["rnn"]), TEXT, "--target", TARGET, "--png", str(path))
    assert (status, out) == (0, f"wrote {path}\n") and path.read_bytes()[:4] == b"\x89PNG"


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "argv", "message"),
    [
        ("lm", [TEXT * 2], f"TEXT has 14 tokens but the model takes at most {MAX_POSITIONS} positions"),
        ("transformer", [TEXT * 2], "TEXT has 14 tokens but the model takes at most 12 positions"),
        ("transformer", [TEXT, "--target", "ein Haus ein Haus"], "--target (with </s>) has 18 tokens"),
        ("transformer", [TEXT, "--target", " "], "--target is empty"),
        ("transformer", [TEXT, "--beam", "0"], "--beam must be an int >= 1 (1: greedy); got 0"),
        ("lm", [TEXT, "--target", TARGET], "--target applies to translation models"),
        ("lm", [TEXT, "--beam", "2"], "--beam applies to translation models"),
        ("lm", [TEXT, "--kind", "cross"], "--kind cross: "),
        ("rnn", [TEXT, "--kind", "encoder"], "--kind encoder: "),
        (
            "transformer",
            [TEXT, "--target", TARGET, "--kind", "decoder", "--layer", "1"],
            "--layer 1 is out of range: the model's decoder self-attention (causal) has 1 layer, 0 to 0",
        ),
        ("transformer", [TEXT, "--target", TARGET, "--top", "x"], "--top 'x' is not one of the tokens: 0:e 1:i"),
        ("lm", ["   "], "TEXT is empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(models, capsys, model, argv, message) -> None:
    status, out, err = run(capsys, "--model", str(models[model]), *argv)
    assert (status, out) == (2, "")
    assert err.startswith(f"qkv show: error: {message}") and err.count("\n") == 1


def test_the_kinds_a_model_has_are_named(models, capsys) -> None:
    _, _, err = run(capsys, "--model", str(models["rnn"]), TEXT, "--kind", "encoder")
    assert err == f"qkv show: error: --kind encoder: {models['rnn']} has no such attention; its kinds: cross\n"


def test_a_model_directory_of_an_unknown_kind(models, tmp_path, capsys) -> None:
    directory = tmp_path / "clip"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "clip", "patch_size": 16}), encoding="utf-8")
    status, out, err = run(capsys, "--model", str(directory), TEXT)
    assert (status, out) == (2, "")
    assert err == (
        f"qkv show: error: {directory / 'config.json'}: qkv show cannot show a model of model_type 'clip'; it shows "
        "'transformer_lm', 'transformer_seq2seq', 'rnn', 'vit', 'bert' (a language model, translation models, an "
        "image classifier, a pretrained encoder)\n"
    )


def test_a_language_model_without_its_tokenizer(models, tmp_path, capsys) -> None:
    directory = tmp_path / "lm"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        (directory / name).write_bytes((models["lm"] / name).read_bytes())
    status, _, err = run(capsys, "--model", str(directory), TEXT)
    assert (status, err) == (
        2,
        f"qkv show: error: {directory} has no tokenizer.json (a model directory written by qkv train)\n",
    )
    CharTokenizer.train(["xyz"]).save(directory / "tokenizer.json")
    status, _, err = run(capsys, "--model", str(directory), TEXT)
    assert status == 2 and err.count("\n") == 1
    assert "do not belong together: config.json's vocab_size is 18 (pad_id 0) but the tokenizer has 7 ids" in err
