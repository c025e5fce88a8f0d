"""Export to bertviz's head_view format, and its JSON file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qkv.viz.bertviz_export import load_bertviz_json, save_bertviz_json, to_bertviz

TOKENS = ["[CLS]", "the", "cat", "sat", "[SEP]"]


@pytest.fixture
def attentions() -> torch.Tensor:
    """(layers=3, H=2, L=5, L=5)."""
    return torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0)).softmax(dim=-1)


def bertviz_format_attention(attention: list[torch.Tensor]) -> torch.Tensor:
    """What bertviz's head_view does with its ``attention`` argument (bertviz/util.py, format_attention)."""
    squeezed = []
    for layer_attention in attention:
        if len(layer_attention.shape) != 4:
            raise ValueError("The attention tensor does not have the correct number of dimensions.")
        squeezed.append(layer_attention.squeeze(0))
    return torch.stack(squeezed)


def test_format(attentions):
    layers, tokens = to_bertviz(attentions, TOKENS)
    assert isinstance(layers, list) and len(layers) == 3
    assert all(isinstance(t, torch.Tensor) and t.shape == (1, 2, 5, 5) for t in layers)
    assert tokens == TOKENS
    torch.testing.assert_close(bertviz_format_attention(layers), attentions)


def test_inputs(attentions):
    layers, _ = to_bertviz(attentions[None], TOKENS)  # a batch of one, as a Hugging Face model gives
    torch.testing.assert_close(torch.cat(layers), attentions)
    layers, tokens = to_bertviz(attentions.numpy(), tuple(TOKENS))
    assert layers[0].dtype == torch.float32 and tokens == TOKENS
    cross, decoder_tokens = to_bertviz(attentions[:, :, :3, :], TOKENS[:3])  # (layers, H, T=3, S=5)
    assert cross[0].shape == (1, 2, 3, 5) and decoder_tokens == TOKENS[:3]


def test_errors(attentions):
    with pytest.raises(ValueError, match=r"a batch of 2; .* attentions\[0\]"):
        to_bertviz(torch.stack([attentions, attentions]), TOKENS)
    with pytest.raises(ValueError, match=r"shape \(2, 5, 5\); expected \(layers, H, L, L\)"):
        to_bertviz(attentions[0], TOKENS)
    with pytest.raises(ValueError, match=r"4 tokens given but attentions has L = 5"):
        to_bertviz(attentions, TOKENS[:4])


def test_json_round_trip(attentions, tmp_path):
    path = save_bertviz_json(tmp_path / "attention.json", attentions, TOKENS)
    layers, tokens = load_bertviz_json(path)
    assert tokens == TOKENS
    torch.testing.assert_close(torch.cat(layers), attentions, rtol=0, atol=0)
    # Without qkv, as the module docstring shows: plain JSON, one nested list (1, H, L, L) per layer.
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "bertviz-head-view" and data["tokens"] == TOKENS
    assert [np.shape(a) for a in data["attention"]] == [(1, 2, 5, 5)] * 3
    torch.testing.assert_close(bertviz_format_attention([torch.tensor(a) for a in data["attention"]]), attentions)


def test_load_refuses_other_json(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"tokens": []}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a qkv bertviz export"):
        load_bertviz_json(path)
