"""KVCache: incremental decoding equals one full call; static cross-attention caches; beam reordering."""

from __future__ import annotations

import pytest
import torch

from qkv.nn import KVCache, MultiHeadAttention

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def make_mha(kv_heads: int | None = None, *, kdim: int | None = None, seed: int = 0) -> MultiHeadAttention:
    torch.manual_seed(seed)
    mha = MultiHeadAttention(16, 4, kv_heads=kv_heads, kdim=kdim, vdim=kdim).double().eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return mha


def decode(
    mha: MultiHeadAttention, x: torch.Tensor, chunks: list[int], **kwargs: object
) -> tuple[torch.Tensor, list[torch.Tensor], KVCache]:
    """Feed ``x (B, L, E)`` in chunks of the given sizes through one cache; outputs and weights per chunk."""
    assert sum(chunks) == x.shape[1]
    cache = KVCache()
    outs, weights, start = [], [], 0
    for size in chunks:
        out, w = mha(x[:, start : start + size], cache=cache, causal=True, need_weights=True, **kwargs)
        assert cache.seq_len == start + size
        outs.append(out)
        weights.append(w)
        start += size
    return torch.cat(outs, dim=1), weights, cache


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 2, 1], [7]], ids=["tokens", "chunks", "whole"])
def test_incremental_decoding_equals_full_causal_call(kv_heads: int, chunks: list[int]) -> None:
    mha = make_mha(kv_heads)
    x = torch.randn(2, 7, 16, dtype=F64)
    full, full_w = mha(x, causal=True, need_weights=True)

    out, weights, cache = decode(mha, x, chunks)
    torch.testing.assert_close(out, full, **TOL)
    start = 0
    for w in weights:
        size = w.shape[2]
        assert w.shape == (2, 4, size, start + size)
        torch.testing.assert_close(w, full_w[:, :, start : start + size, : start + size], **TOL)
        start += size
    assert cache.k is not None and cache.v is not None
    assert cache.k.shape == (2, kv_heads, 7, 4) and cache.v.shape == (2, kv_heads, 7, 4)


def test_incremental_decoding_with_left_padding_mask() -> None:
    mha = make_mha(2, seed=1)
    x = torch.randn(2, 6, 16, dtype=F64)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False  # the second sequence is left-padded by two tokens
    full = mha(x, mask=valid[:, None, None, :], causal=True)[0]

    cache = KVCache()
    steps = [mha(x[:, t : t + 1], mask=valid[:, None, None, : t + 1], causal=True, cache=cache)[0] for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_static_cache_projects_the_encoder_output_once() -> None:
    mha = make_mha(2, kdim=6, seed=2)
    projections = []
    mha.k_proj.register_forward_hook(lambda *args: projections.append("k"))
    mha.v_proj.register_forward_hook(lambda *args: projections.append("v"))
    memory = torch.randn(3, 5, 6, dtype=F64)
    y = torch.randn(3, 4, 16, dtype=F64)
    lengths = torch.tensor([5, 2, 4])
    full, full_w = mha(y, memory, key_lengths=lengths, need_weights=True)
    projections.clear()

    cache = KVCache(static=True)
    first, w0 = mha(y[:, :1], memory, key_lengths=lengths, cache=cache, need_weights=True)
    rest, w1 = mha(y[:, 1:3], None, key_lengths=lengths, cache=cache, need_weights=True)
    last, w2 = mha(y[:, 3:], memory, key_lengths=lengths, cache=cache, need_weights=True)  # key ignored
    assert projections == ["k", "v"]
    assert cache.seq_len == 5
    torch.testing.assert_close(torch.cat([first, rest, last], dim=1), full, **TOL)
    torch.testing.assert_close(torch.cat([w0, w1, w2], dim=2), full_w, **TOL)


def test_reorder_selects_batch_rows_for_beam_search() -> None:
    mha = make_mha(2, seed=3)
    x = torch.randn(3, 5, 16, dtype=F64)
    _, _, cache = decode(mha, x[:, :4], [2, 2])

    beams = torch.tensor([2, 0, 0, 1])
    assert cache.reorder(beams) is cache
    assert cache.seq_len == 4 and cache.k is not None and cache.k.shape[0] == 4
    step = mha(x[beams, 4:5], cache=cache, causal=True)[0]
    reference = mha(x[beams], causal=True)[0][:, 4:5]
    torch.testing.assert_close(step, reference, **TOL)


def test_reorder_static_cache() -> None:
    mha = make_mha(kdim=6, seed=4)
    memory = torch.randn(2, 5, 6, dtype=F64)
    y = torch.randn(2, 3, 16, dtype=F64)
    cache = KVCache(static=True)
    mha(y[:, :1], memory, cache=cache)
    beams = torch.tensor([1, 1, 0])
    cache.reorder(beams)
    torch.testing.assert_close(mha(y[beams], cache=cache)[0], mha(y[beams], memory[beams])[0], **TOL)


def test_reorder_of_empty_cache_is_a_no_op() -> None:
    cache = KVCache()
    assert cache.reorder(torch.tensor([0, 0])).is_empty
    assert cache.seq_len == 0


def test_update_returns_concatenation() -> None:
    cache = KVCache()
    k1, v1 = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 6)
    k2, v2 = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 6)
    cache.update(k1, v1)
    k, v = cache.update(k2, v2)
    assert torch.equal(k, torch.cat([k1, k2], dim=2)) and torch.equal(v, torch.cat([v1, v2], dim=2))
    static = KVCache(static=True)
    static.update(k1, v1)
    k, v = static.update(k2, v2)
    assert k is k1 and v is v1


def test_decoder_layer_with_self_and_cross_caches() -> None:
    """A toy decoder layer (self-attention then cross-attention), one cache per attention."""
    self_attn = make_mha(2, seed=5)
    cross_attn = make_mha(kdim=6, seed=6)
    memory = torch.randn(2, 5, 6, dtype=F64)
    x = torch.randn(2, 4, 16, dtype=F64)

    def layer(h: torch.Tensor, caches: tuple[KVCache, KVCache] | None = None) -> torch.Tensor:
        c_self, c_cross = caches if caches is not None else (None, None)
        h = h + self_attn(h, causal=True, cache=c_self)[0]
        return h + cross_attn(h, memory, cache=c_cross)[0]

    full = layer(x)
    caches = (KVCache(), KVCache(static=True))
    steps = torch.cat([layer(x[:, t : t + 1], caches) for t in range(4)], dim=1)
    torch.testing.assert_close(steps, full, **TOL)


# Bad input.


def test_reorder_with_float_indices() -> None:
    cache = KVCache()
    cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"indices must be a 1-D integer tensor \(B_new,\); got torch.float32"):
        cache.reorder(torch.tensor([0.0, 1.0]))


def test_reorder_with_indices_out_of_range() -> None:
    cache = KVCache()
    cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, B=2\); got values from 0 to 2"):
        cache.reorder(torch.tensor([0, 2]))


def test_update_with_different_head_dim() -> None:
    cache = KVCache()
    cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"k has shape \(2, 1, 1, 5\) but the cache holds \(2, 1, 3, 4\)"):
        cache.update(torch.randn(2, 1, 1, 5), torch.randn(2, 1, 1, 4))


def test_update_with_different_dtype() -> None:
    cache = KVCache()
    cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    with pytest.raises(ValueError, match=r"v is torch.float64 on cpu but the cache holds torch.float32"):
        cache.update(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4, dtype=F64))


def test_update_with_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"k must be a 4-D tensor \(B, Hkv, S, D\); got \(2, 3, 4\)"):
        KVCache().update(torch.randn(2, 3, 4), torch.randn(2, 1, 3, 4))


def test_update_with_k_v_disagreeing() -> None:
    with pytest.raises(ValueError, match=r"k has shape \(2, 1, 3, 4\) and v \(2, 1, 2, 4\)"):
        KVCache().update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 2, 4))


def test_empty_static_cache_without_key() -> None:
    with pytest.raises(ValueError, match=r"key is None but the static cache is empty"):
        make_mha()(torch.randn(2, 1, 16, dtype=F64), cache=KVCache(static=True))


def test_static_cache_with_a_different_source() -> None:
    mha = make_mha()
    cache = KVCache(static=True)
    mha(torch.randn(2, 1, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64), cache=cache)
    with pytest.raises(ValueError, match=r"key has shape \(2, 7, 16\) but the static cache holds B=2, S=5"):
        mha(torch.randn(2, 1, 16, dtype=F64), torch.randn(2, 7, 16, dtype=F64), cache=cache)
