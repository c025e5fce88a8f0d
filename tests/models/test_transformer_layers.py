"""Transformer layers: parity with torch.nn.Transformer{Encoder,Decoder}Layer, cached decoding, weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.nn import KVCache, TransformerDecoderLayer, TransformerEncoderLayer

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def copy_attention(ours, ref: nn.MultiheadAttention) -> None:
    ours.in_proj.weight.copy_(ref.in_proj_weight)  # both stack q, k, v in that order
    ours.in_proj.bias.copy_(ref.in_proj_bias)
    ours.out_proj.weight.copy_(ref.out_proj.weight)
    ours.out_proj.bias.copy_(ref.out_proj.bias)


def randomize(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def copy_layer(ours: nn.Module, ref: nn.Module) -> None:
    """Copy a torch Transformer layer's weights into ours (same names except the attention projections)."""
    with torch.no_grad():
        copy_attention(ours.self_attn, ref.self_attn)
        if hasattr(ref, "multihead_attn"):
            copy_attention(ours.multihead_attn, ref.multihead_attn)
        for name in ("linear1", "linear2", "norm1", "norm2", "norm3"):
            if hasattr(ref, name):
                getattr(ours, name).load_state_dict(getattr(ref, name).state_dict())


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(
        16, 4, 32, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first, dtype=F64
    )
    randomize(ref)
    ours = TransformerEncoderLayer(16, 4, 32, activation=activation, norm_first=norm_first).double()
    copy_layer(ours, ref)
    ref.eval(), ours.eval()
    x = torch.randn(3, 5, 16, dtype=F64)
    lengths = torch.tensor([5, 3, 1])
    expected = ref(x, src_key_padding_mask=torch.arange(5) >= lengths[:, None])
    out, weights = ours(x, key_lengths=lengths, need_weights=True)
    for b, n in enumerate(lengths.tolist()):  # torch may leave padded rows as it likes
        torch.testing.assert_close(out[b, :n], expected[b, :n], **TOL)
    assert weights.shape == (3, 4, 5, 5)
    assert (weights[1, :, :, 3:] == 0).all()


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first: bool) -> None:
    torch.manual_seed(1)
    ref = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first, dtype=F64)
    randomize(ref)
    ours = TransformerDecoderLayer(16, 4, 32, norm_first=norm_first).double()
    copy_layer(ours, ref)
    ref.eval(), ours.eval()
    x, memory = torch.randn(2, 6, 16, dtype=F64), torch.randn(2, 4, 16, dtype=F64)
    memory_lengths = torch.tensor([4, 2])
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    ignore = torch.arange(4) >= memory_lengths[:, None]  # torch: True = ignore
    expected = ref(x, memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=ignore)
    out, self_w, cross_w = ours(x, memory, memory_lengths=memory_lengths, need_weights=True)
    torch.testing.assert_close(out, expected, **TOL)
    assert self_w.shape == (2, 4, 6, 6) and cross_w.shape == (2, 4, 6, 4)
    assert (self_w.triu(diagonal=1) == 0).all()
    assert (cross_w[1, :, :, 2:] == 0).all()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_decoder_layer_cached_steps_equal_the_full_call(norm_first: bool, kv_heads: int) -> None:
    torch.manual_seed(2)
    layer = TransformerDecoderLayer(16, 4, 32, kv_heads=kv_heads, norm_first=norm_first).double().eval()
    randomize(layer)
    x, memory = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 3, 16, dtype=F64)
    lengths = torch.tensor([3, 2])
    full, full_self, full_cross = layer(x, memory, memory_lengths=lengths, need_weights=True)
    self_cache, cross_cache = KVCache(), KVCache(static=True)
    for t in range(5):
        out, sw, cw = layer(
            x[:, t : t + 1],
            memory if t == 0 else None,
            memory_lengths=lengths,
            self_cache=self_cache,
            cross_cache=cross_cache,
            need_weights=True,
        )
        torch.testing.assert_close(out[:, 0], full[:, t], **TOL)
        torch.testing.assert_close(sw, full_self[:, :, t : t + 1, : t + 1], **TOL)
        torch.testing.assert_close(cw, full_cross[:, :, t : t + 1], **TOL)


def test_encoder_layer_as_a_causal_block_with_cache() -> None:
    torch.manual_seed(3)
    layer = TransformerEncoderLayer(16, 4, 32, kv_heads=2, norm_first=True).double().eval()
    randomize(layer)
    x = torch.randn(2, 5, 16, dtype=F64)
    full, _ = layer(x, causal=True)
    cache = KVCache()
    steps = [layer(x[:, t : t + 1], causal=True, cache=cache)[0] for t in range(5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_dropouts_reach_their_places() -> None:
    layer = TransformerDecoderLayer(8, 2, 16, dropout=0.1, attention_dropout=0.2, activation_dropout=0.3)
    assert layer.self_attn.dropout == layer.multihead_attn.dropout == 0.2
    assert layer.dropout.p == 0.3
    assert layer.dropout1.p == layer.dropout2.p == layer.dropout3.p == 0.1
    x, memory = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    layer.train()
    torch.manual_seed(0)
    a = layer(x, memory)[0]
    torch.manual_seed(1)
    assert not torch.allclose(a, layer(x, memory)[0])
    layer.eval()
    torch.testing.assert_close(layer(x, memory)[0], layer(x, memory)[0])


def test_errors() -> None:
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'gelu'; got 'tanh'"):
        TransformerEncoderLayer(8, 2, 16, activation="tanh")
    layer = TransformerDecoderLayer(8, 2, 16)
    with pytest.raises(ValueError, match="memory is None"):
        layer(torch.randn(1, 2, 8), None)
