"""Positional encodings: the formulas, offsets for cached decoding, RoPE's relative property, range errors."""

from __future__ import annotations

import math

import pytest
import torch

from qkv.nn import (
    KVCache,
    LearnedPositionalEmbedding,
    MultiHeadAttention,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


def test_sinusoidal_matches_the_paper_formula() -> None:
    pe = SinusoidalPositionalEncoding(8)(50, dtype=F64)
    assert pe.shape == (50, 8)
    for pos in (0, 1, 17, 49):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)


def test_sinusoidal_offset_and_unbounded_length() -> None:
    enc = SinusoidalPositionalEncoding(16)
    whole = enc(3000, dtype=F64)  # no maximum length
    assert torch.equal(enc(5, offset=2990, dtype=F64), whole[2990:2995])
    assert enc(4).dtype == torch.float32


def test_learned_offsets_and_range_error() -> None:
    emb = LearnedPositionalEmbedding(10, 4)
    assert torch.equal(emb(3, offset=7), emb.weight[7:10])
    with pytest.raises(ValueError, match=r"sequence length 11 exceeds max_positions=10"):
        emb(4, offset=7)


@pytest.mark.parametrize("make", [lambda: SinusoidalPositionalEncoding(7), lambda: RotaryEmbedding(5)])
def test_odd_dimensions_are_rejected(make) -> None:
    with pytest.raises(ValueError, match="even"):
        make()


def test_rotary_preserves_norms_and_is_identity_at_position_zero() -> None:
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 6, 8, dtype=F64)
    y = rope(x, offset=5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), **TOL)
    torch.testing.assert_close(rope(x[:, :, :1])[:, :, 0], x[:, :, 0], **TOL)
    assert not torch.allclose(y, x)


def test_rotary_scores_depend_only_on_relative_position() -> None:
    rope = RotaryEmbedding(16)
    q, k = torch.randn(16, dtype=F64), torch.randn(16, dtype=F64)

    def score(p: int, s: int) -> float:
        return float(rope(q[None, :], offset=p)[0] @ rope(k[None, :], offset=s)[0])

    assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-10)
    assert score(3, 7) == pytest.approx(score(1000, 1004), abs=1e-9)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_rotary_rotates_channel_pairs_i_and_i_plus_half() -> None:
    rope = RotaryEmbedding(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    pos = 3
    y = rope(x, offset=pos)[0]
    for i, (a, b) in enumerate(((1.0, 3.0), (2.0, 4.0))):
        theta = pos * 10000 ** (-2 * i / 4)
        assert y[i].item() == pytest.approx(a * math.cos(theta) - b * math.sin(theta), abs=1e-12)
        assert y[i + 2].item() == pytest.approx(b * math.cos(theta) + a * math.sin(theta), abs=1e-12)


def test_rotary_wrong_head_dim_is_named() -> None:
    with pytest.raises(ValueError, match="head dimension 6 but the rotary embedding has dim=8"):
        RotaryEmbedding(8)(torch.randn(1, 2, 3, 6))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_multi_head_attention_with_rotary_caches_positions(kv_heads: int) -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, kv_heads=kv_heads, rotary=RotaryEmbedding(4)).double().eval()
    plain = MultiHeadAttention(16, 4, kv_heads=kv_heads).double().eval()
    plain.load_state_dict(mha.state_dict())
    x = torch.randn(2, 6, 16, dtype=F64)
    full, full_w = mha(x, causal=True, need_weights=True)
    assert not torch.allclose(full, plain(x, causal=True)[0])  # the rotation changes the scores

    cache, outs = KVCache(), []
    for t in range(6):
        out, w = mha(x[:, t : t + 1], cache=cache, causal=True, need_weights=True)
        torch.testing.assert_close(w, full_w[:, :, t : t + 1, : t + 1], **TOL)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)


def test_rotary_refuses_a_static_cache() -> None:
    mha = MultiHeadAttention(8, 2, rotary=RotaryEmbedding(4))
    with pytest.raises(ValueError, match="non-static cache"):
        mha(torch.randn(1, 2, 8), torch.randn(1, 3, 8), cache=KVCache(static=True))
