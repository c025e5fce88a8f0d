"""KVCache: incremental decoding equals one full call; static cross-attention caches; beam reordering;
preallocated buffers equal the concatenating cache, in MultiHeadAttention and in whole models' decoding."""

from __future__ import annotations

import pytest
import torch

from qkv import attention
from qkv.models import LMConfig, TransformerConfig, TransformerLM, TransformerSeq2Seq
from qkv.models.search import beam_search, greedy_search
from qkv.nn import KVCache, MultiHeadAttention, RotaryEmbedding
from qkv.nn.kv_cache import INITIAL_CAPACITY, concatenating_caches

# Tiny models are overhead-bound: one thread (see tests/conftest.py) keeps the decoding tests fast.
pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def make_mha(
    kv_heads: int | None = None, *, kdim: int | None = None, seed: int = 0, rotary: bool = False
) -> MultiHeadAttention:
    torch.manual_seed(seed)
    rope = RotaryEmbedding(4) if rotary else None
    mha = MultiHeadAttention(16, 4, kv_heads=kv_heads, kdim=kdim, vdim=kdim, rotary=rope).double().eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return mha


def decode(
    mha: MultiHeadAttention, x: torch.Tensor, chunks: list[int], cache: KVCache | None = None, **kwargs: object
) -> tuple[torch.Tensor, list[torch.Tensor], KVCache]:
    """Feed ``x (B, L, E)`` in chunks of the given sizes through one cache (a new one by default); outputs and
    weights per chunk."""
    assert sum(chunks) == x.shape[1]
    cache = KVCache() if cache is None else cache
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


# Preallocation: the buffers give what concatenating gives.


def is_preallocated(cache: KVCache) -> bool:
    """Whether ``cache.k`` is a view of a larger buffer (what an update under no_grad writes into)."""
    return cache.k is not None and cache.capacity > cache.seq_len


@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("chunks", [[1] * 40, [5, 1, 11, 3, 20]], ids=["tokens", "chunks"])
def test_preallocated_equals_concatenating_and_no_cache(kv_heads: int, rotary: bool, chunks: list[int]) -> None:
    """40 positions: the buffers grow past their first capacity (16, then 32, then 64)."""
    mha = make_mha(kv_heads, seed=7, rotary=rotary)
    x = torch.randn(2, 40, 16, dtype=F64)
    with torch.no_grad():
        full = mha(x, causal=True)[0]
        after, _, cache = decode(mha, x, chunks)
        before, _, old = decode(mha, x, chunks, KVCache(preallocate=False))
    assert cache.capacity == 64 and is_preallocated(cache)
    assert old.capacity == old.seq_len == 40
    assert torch.equal(after, before)
    torch.testing.assert_close(after, full, **TOL)
    assert cache.k is not None and old.k is not None and torch.equal(cache.k, old.k)


def test_capacity_starts_at_the_first_update_or_initial_capacity_and_doubles() -> None:
    cache, capacities = KVCache(), []
    with torch.no_grad():
        cache.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5))
        capacities.append(cache.capacity)
        for _ in range(INITIAL_CAPACITY):
            cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 5))
            capacities.append(cache.capacity)
        long = KVCache()
        long.update(torch.randn(1, 2, 40, 4), torch.randn(1, 2, 40, 5))
    assert capacities[0] == INITIAL_CAPACITY and capacities[-1] == 2 * INITIAL_CAPACITY
    assert sorted(set(capacities)) == [INITIAL_CAPACITY, 2 * INITIAL_CAPACITY]
    assert cache.seq_len == 3 + INITIAL_CAPACITY and cache.v is not None and cache.v.shape == (1, 2, 19, 5)
    assert long.capacity == 40


def test_returned_tensors_keep_their_values_through_appends_and_growth() -> None:
    cache = KVCache()
    with torch.no_grad():
        k1, v1 = cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
        saved = k1.clone(), v1.clone()
        for _ in range(30):
            cache.update(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    assert cache.capacity == 64
    assert torch.equal(k1, saved[0]) and torch.equal(v1, saved[1])
    assert cache.k is not None and torch.equal(cache.k[:, :, :3], saved[0])


def test_max_len_allocates_once() -> None:
    cache = KVCache(max_len=6)
    with torch.no_grad():
        cache.update(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
        assert cache.capacity == 6
        buffer = cache.k.data_ptr() if cache.k is not None else None
        for _ in range(4):
            cache.update(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    assert cache.seq_len == cache.capacity == 6
    assert cache.k is not None and cache.k.data_ptr() == buffer


@pytest.mark.parametrize("preallocate", [True, False])
def test_max_len_exceeded(preallocate: bool) -> None:
    cache = KVCache(max_len=4, preallocate=preallocate)
    with torch.no_grad():
        cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
        with pytest.raises(ValueError, match=r"the cache holds S=3 positions and 2 more would exceed max_len=4"):
            cache.update(torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    assert cache.seq_len == 3
    with pytest.raises(ValueError, match=r"the cache holds S=0 positions and 5 more would exceed max_len=4"):
        KVCache(max_len=4).update(torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4))


def test_reorder_with_repeated_rows_equals_concatenating_and_no_cache() -> None:
    mha = make_mha(2, seed=8, rotary=True)
    x = torch.randn(3, 20, 16, dtype=F64)
    beams = [torch.tensor([2, 0, 0, 1]), torch.tensor([3, 3, 1, 0]), torch.tensor([1, 2])]
    outs: dict[bool, torch.Tensor] = {}
    with torch.no_grad():
        for preallocate in (True, False):
            cache, rows, steps = KVCache(preallocate=preallocate), torch.arange(3), []
            mha(x[:, :6], cache=cache, causal=True)
            for t in range(6, 20):  # 20 positions: the buffers grow from 16 to 32 after the reorders
                if t in (8, 12, 14):
                    index = beams[(8, 12, 14).index(t)]
                    cache.reorder(index)
                    rows = rows[index]
                    steps = [step[index] for step in steps]
                steps.append(mha(x[rows, t : t + 1], cache=cache, causal=True)[0])
            assert is_preallocated(cache) == preallocate
            outs[preallocate] = torch.cat(steps, dim=1)
            reference = mha(x[rows], causal=True)[0][:, 6:]
            torch.testing.assert_close(outs[preallocate], reference, **TOL)
    assert torch.equal(outs[True], outs[False])


def test_reorder_reuses_the_buffers_of_the_previous_reorder() -> None:
    cache = KVCache()
    with torch.no_grad():
        cache.update(torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8))
        pointers = []
        for index in ([1, 0, 3, 2], [0, 0, 1, 1], [3, 2, 1, 0], [2, 2]):
            assert cache.k is not None
            pointers.append(cache.k.data_ptr())
            reference = cache.k[index].clone()
            cache.reorder(torch.tensor(index))
            assert cache.k is not None and torch.equal(cache.k, reference)
    assert cache.k is not None
    pointers.append(cache.k.data_ptr())
    assert pointers[0] == pointers[2] == pointers[4] != pointers[1] == pointers[3]
    assert cache.k.shape == (2, 2, 5, 8) and cache.capacity == INITIAL_CAPACITY


def test_reorder_with_the_identity_copies_nothing() -> None:
    cache = KVCache()
    with torch.no_grad():
        cache.update(torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8))
        k, v = cache.k, cache.v
        cache.reorder(torch.arange(3))
        cache.reorder(torch.tensor([0, 1, 2], dtype=torch.int32))
        assert cache.k is k and cache.v is v
        cache.reorder(torch.tensor([0, 1, 1]))
    assert cache.k is not k and cache.k is not None and torch.equal(cache.k[:, :, :, :], k[[0, 1, 1]])


def test_grad_mode_concatenates_and_keeps_the_graph() -> None:
    """With grad mode on, updates concatenate: gradients through every step equal the full call's."""
    mha = make_mha(2, seed=9)
    x = torch.randn(2, 20, 16, dtype=F64, requires_grad=True)
    out, _, cache = decode(mha, x, [4] * 5)
    assert cache.capacity == cache.seq_len == 20  # no buffer: concatenated
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (full_grad,) = torch.autograd.grad(mha(x, causal=True)[0].square().sum(), x)
    torch.testing.assert_close(grad, full_grad, **TOL)
    with torch.no_grad():
        mha(x[:, :1], cache=cache, causal=True)  # grad mode off: the next update writes into a buffer
    assert is_preallocated(cache) and cache.capacity == 40


def test_grad_mode_keeps_keys_saved_for_a_query_gradient_intact() -> None:
    """Keys that do not require grad, saved by attention for the gradient of a query that does: a later
    update must not write into them, or backward fails (the buffer's version counter)."""
    cache = KVCache()
    q = torch.randn(1, 2, 1, 8, requires_grad=True)
    k, v = cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    out = attention(q, k, v, backend="math")
    cache.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


def test_concatenating_caches_sets_the_default() -> None:
    with concatenating_caches():
        inside, explicit = KVCache(), KVCache(preallocate=True)
    outside = KVCache()
    assert (inside.preallocate, explicit.preallocate, outside.preallocate) == (False, True, True)
    with torch.no_grad():
        for cache in (inside, outside):
            cache.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
            cache.update(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    assert inside.capacity == 3 and outside.capacity == INITIAL_CAPACITY


def test_repr_shows_the_capacity() -> None:
    cache = KVCache()
    assert repr(cache) == "KVCache(static=False, k=None, capacity=0)"
    with torch.no_grad():
        cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4))
    assert repr(cache) == "KVCache(static=False, k=(2, 1, 3, 4), capacity=16)"
    assert repr(KVCache(static=True)) == "KVCache(static=True, k=None)"


def test_decoding_off_cpu_reads_no_value_on_the_host() -> None:
    """On a meta device (no values: ``int()`` of one raises, as reading a CUDA one would synchronize), cached
    self- and cross-attention steps with ``key_lengths`` and beam reorders all run."""
    mha = MultiHeadAttention(16, 4, kv_heads=2).to("meta").eval()
    x, memory = torch.empty(3, 1, 16, device="meta"), torch.empty(3, 5, 16, device="meta")
    lengths, beams = torch.tensor([5, 2, 4]).to("meta"), torch.tensor([2, 0, 0]).to("meta")
    own, cross = KVCache(), KVCache(static=True)
    with torch.no_grad():
        for _ in range(3):
            mha(x, cache=own, causal=True)
            out = mha(x, memory, key_lengths=lengths, cache=cross)[0]
            own.reorder(beams)
            cross.reorder(beams)
    assert out.shape == (3, 1, 16) and is_preallocated(own) and own.seq_len == 3 and cross.seq_len == 5


# Whole models decode the same tokens with either cache.


def seq2seq() -> TransformerSeq2Seq:
    torch.manual_seed(10)
    config = TransformerConfig(
        src_vocab_size=17, tgt_vocab_size=13, d_model=16, num_heads=4, kv_heads=2, encoder_layers=2,
        decoder_layers=2, ffn_dim=32, dropout=0.0, max_positions=64,
    )  # fmt: skip
    return TransformerSeq2Seq(config).double().eval()


def test_transformer_beam_and_greedy_search_equal_with_either_cache() -> None:
    model = seq2seq()
    g = torch.Generator().manual_seed(11)
    src = torch.randint(3, 17, (4, 9), generator=g)
    lengths = torch.tensor([9, 4, 7, 2])
    for row, n in enumerate(lengths.tolist()):
        src[row, n:] = 0
    found = {}
    for preallocate in (True, False):
        with concatenating_caches() if not preallocate else torch.no_grad():
            beams = beam_search(model, src, lengths, beam_size=3, n_best=3, max_len=30)
            greedy = greedy_search(model, src, lengths, max_len=30)
        found[preallocate] = (
            [[(h.tokens, round(h.score, 9)) for h in hyps] for hyps in beams],
            [h.tokens for h in greedy],
        )
    assert found[True] == found[False]
    assert len({len(hyps[0][0]) for hyps in found[True][0]}) > 1  # the sentences end at different lengths


def test_lm_generation_equals_with_either_cache_and_without_one() -> None:
    torch.manual_seed(12)
    config = LMConfig(vocab_size=23, d_model=16, num_heads=4, num_layers=2, ffn_dim=32, dropout=0.0, max_positions=64)
    lm = TransformerLM(config).double().eval()
    prompt = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(13))
    after = lm.generate(prompt, 40, temperature=0, eos_id=None)
    with concatenating_caches():
        before = lm.generate(prompt, 40, temperature=0, eos_id=None)
    tokens = prompt
    with torch.no_grad():
        for _ in range(40):
            tokens = torch.cat([tokens, lm(tokens)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert after.shape == (2, 45)
    assert torch.equal(after, before) and torch.equal(after, tokens)


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


def test_max_len_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match=r"max_len must be an int >= 1 or None; got 0"):
        KVCache(max_len=0)
    with pytest.raises(ValueError, match=r"max_len applies to a self-attention cache \(static=False\); got max_len=4"):
        KVCache(static=True, max_len=4)
    with pytest.raises(ValueError, match=r"preallocate must be"):
        KVCache(preallocate="yes")  # type: ignore[arg-type]
