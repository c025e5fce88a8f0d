"""MultiHeadAttention: parity with torch.nn.MultiheadAttention, grouped-query heads, gradients, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qkv.nn import KVCache, MultiHeadAttention

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def reference_pair(
    embed_dim: int, num_heads: int, *, kdim: int | None = None, vdim: int | None = None, seed: int = 0
) -> tuple[nn.MultiheadAttention, MultiHeadAttention]:
    """A float64 ``nn.MultiheadAttention`` with random weights and biases, and ours with its weights."""
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, kdim=kdim, vdim=vdim, dtype=F64)
    ours = MultiHeadAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim).double()
    with torch.no_grad():
        for p in ref.parameters():  # nn.MultiheadAttention zeroes its biases: make every number count
            p.copy_(torch.randn_like(p) * 0.5)
        if ref._qkv_same_embed_dim:
            wq, wk, wv = ref.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight
        bq, bk, bv = ref.in_proj_bias.chunk(3)
        projections = ours.projection_weights()  # views of in_proj's rows when ours is fused
        for name, w, b in (
            ("q", wq, bq),
            ("k", wk, bk),
            ("v", wv, bv),
            ("out", ref.out_proj.weight, ref.out_proj.bias),
        ):
            projections[name][0].copy_(w)
            projections[name][1].copy_(b)
    return ref.eval(), ours.eval()


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64)


def test_self_attention_matches_torch() -> None:
    ref, ours = reference_pair(16, 4)
    x = randn(3, 7, 16)
    ref_out, ref_avg = ref(x, x, x, need_weights=True, average_attn_weights=True)
    _, ref_heads = ref(x, x, x, need_weights=True, average_attn_weights=False)

    out, heads = ours(x, need_weights=True)
    out_avg, avg = ours(x, need_weights=True, average_weights=True)
    out_plain, none = ours(x)

    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(out_avg, ref_out, **TOL)
    torch.testing.assert_close(out_plain, ref_out, **TOL)
    assert none is None
    assert heads.shape == (3, 4, 7, 7) and avg.shape == (3, 7, 7)
    torch.testing.assert_close(heads, ref_heads, **TOL)
    torch.testing.assert_close(avg, ref_avg, **TOL)


def test_explicit_key_value_equals_self_attention() -> None:
    _, ours = reference_pair(8, 2)
    x = randn(2, 5, 8)
    torch.testing.assert_close(ours(x, x, x)[0], ours(x)[0], **TOL)
    torch.testing.assert_close(ours(x, x)[0], ours(x)[0], **TOL)


def test_padding_mask_matches_torch_key_padding_mask() -> None:
    ref, ours = reference_pair(16, 4, seed=1)
    x = randn(3, 6, 16)
    lengths = torch.tensor([6, 2, 4])
    ignore = torch.arange(6) >= lengths[:, None]  # nn.MultiheadAttention: True = ignore
    ref_out, ref_w = ref(x, x, x, key_padding_mask=ignore, average_attn_weights=False)

    out_len, w_len = ours(x, key_lengths=lengths, need_weights=True)
    out_mask, w_mask = ours(x, mask=~ignore[:, None, None, :], need_weights=True)
    for out, w in ((out_len, w_len), (out_mask, w_mask)):
        torch.testing.assert_close(out, ref_out, **TOL)
        torch.testing.assert_close(w, ref_w, **TOL)
    assert (w_len[1, :, :, 2:] == 0).all()


def test_causal_matches_torch_attn_mask() -> None:
    ref, ours = reference_pair(12, 3, seed=2)
    x = randn(2, 6, 12)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)  # nn.MultiheadAttention: True = not allowed
    ref_out, ref_avg = ref(x, x, x, attn_mask=future)

    out, avg = ours(x, causal=True, need_weights=True, average_weights=True)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(avg, ref_avg, **TOL)
    torch.testing.assert_close(ours(x, mask=~future)[0], ref_out, **TOL)
    assert (avg[:, 0, 1:] == 0).all()


def test_float_mask_matches_torch() -> None:
    ref, ours = reference_pair(8, 2, seed=3)
    x = randn(2, 5, 8)
    # Values exact in float32: qkv.attention adds float masks in float32.
    bias = randn(5, 5).float().double()
    ref_out, ref_w = ref(x, x, x, attn_mask=bias, average_attn_weights=False)
    out, w = ours(x, mask=bias, need_weights=True)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)


def test_cross_attention_with_kdim_vdim_matches_torch() -> None:
    ref, ours = reference_pair(16, 4, kdim=6, vdim=10, seed=4)
    assert not ref._qkv_same_embed_dim
    query, key, value = randn(2, 5, 16), randn(2, 9, 6), randn(2, 9, 10)
    lengths = torch.tensor([9, 3])
    ignore = torch.arange(9) >= lengths[:, None]
    ref_out, ref_avg = ref(query, key, value, key_padding_mask=ignore)
    _, ref_heads = ref(query, key, value, key_padding_mask=ignore, average_attn_weights=False)

    out, heads = ours(query, key, value, key_lengths=lengths, need_weights=True)
    _, avg = ours(query, key, value, key_lengths=lengths, need_weights=True, average_weights=True)
    assert heads.shape == (2, 4, 5, 9)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(heads, ref_heads, **TOL)
    torch.testing.assert_close(avg, ref_avg, **TOL)


def test_backward_matches_torch() -> None:
    ref, ours = reference_pair(12, 3, kdim=5, vdim=7, seed=5)
    query, key, value = randn(2, 4, 12), randn(2, 6, 5), randn(2, 6, 7)
    future = torch.ones(4, 6, dtype=torch.bool).triu(3)  # bottom-right causal for L=4, S=6
    grad_out = randn(2, 4, 12)

    def grads(module: nn.Module, **kwargs: object) -> list[torch.Tensor]:
        inputs = [t.clone().requires_grad_() for t in (query, key, value)]
        out = module(*inputs, **kwargs)[0]
        (out * grad_out).sum().backward()
        return [t.grad for t in inputs]

    ref_grads = grads(ref, attn_mask=future)
    our_grads = grads(ours, causal=True)
    for name, g, r in zip(("query", "key", "value"), our_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, **TOL, msg=f"grad of {name}")
    torch.testing.assert_close(ours.q_proj.weight.grad, ref.q_proj_weight.grad, **TOL)
    torch.testing.assert_close(ours.k_proj.weight.grad, ref.k_proj_weight.grad, **TOL)
    torch.testing.assert_close(ours.v_proj.weight.grad, ref.v_proj_weight.grad, **TOL)
    torch.testing.assert_close(ours.out_proj.weight.grad, ref.out_proj.weight.grad, **TOL)
    our_bias_grad = torch.cat([ours.q_proj.bias.grad, ours.k_proj.bias.grad, ours.v_proj.bias.grad])
    torch.testing.assert_close(our_bias_grad, ref.in_proj_bias.grad, **TOL)


def test_fused_projection_gradients_match_torch() -> None:
    ref, ours = reference_pair(12, 3, seed=5)
    assert ours.fused
    x = randn(2, 5, 12)
    grad_out = randn(2, 5, 12)
    (ref(x, x, x, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1))[0] * grad_out).sum().backward()
    (ours(x, causal=True)[0] * grad_out).sum().backward()
    torch.testing.assert_close(ours.in_proj.weight.grad, ref.in_proj_weight.grad, **TOL)
    torch.testing.assert_close(ours.in_proj.bias.grad, ref.in_proj_bias.grad, **TOL)
    torch.testing.assert_close(ours.out_proj.weight.grad, ref.out_proj.weight.grad, **TOL)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("same_key_value", [True, False])
def test_fused_cross_attention_equals_separate_projections(kv_heads: int, same_key_value: bool) -> None:
    """Cross-attention through in_proj's row blocks == separate q/k/v Linear layers holding those rows."""
    torch.manual_seed(9)
    ours = MultiHeadAttention(16, 4, kv_heads=kv_heads).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    query, key = randn(2, 3, 16), randn(2, 6, 16)
    value = key if same_key_value else randn(2, 6, 16)
    projections = {
        n: nn.functional.linear(t, *ours.projection_weights()[n])
        for n, t in zip("qkv", (query, key, value), strict=True)
    }
    q, k, v = (
        projections[n].reshape(2, -1, h, 4).transpose(1, 2) for n, h in zip("qkv", (4, kv_heads, kv_heads), strict=True)
    )
    k, v = (t.repeat_interleave(4 // kv_heads, dim=1) for t in (k, v))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 2, dim=-1) @ v
    expected = nn.functional.linear(expected.transpose(1, 2).reshape(2, 3, 16), *ours.projection_weights()["out"])
    torch.testing.assert_close(ours(query, key, value)[0], expected, **TOL)


def test_separate_projection_state_dicts_load_into_the_fused_module() -> None:
    """A state dict with q_proj/k_proj/v_proj entries (qkv before in_proj) loads, stacked, and computes the same."""
    torch.manual_seed(10)
    fused = MultiHeadAttention(8, 2, kv_heads=1).double()
    separate = {
        f"{n}_proj.{kind}": t
        for n, (w, b) in fused.projection_weights().items()
        for kind, t in (("weight", w), ("bias", b))
    }
    assert set(separate) == {f"{n}_proj.{k}" for n in ("q", "k", "v", "out") for k in ("weight", "bias")}
    fresh = MultiHeadAttention(8, 2, kv_heads=1).double()
    fresh.load_state_dict({k: v.clone() for k, v in separate.items()})
    x = randn(2, 4, 8)
    torch.testing.assert_close(fresh(x)[0], fused(x)[0], atol=0, rtol=0)
    assert set(fresh.state_dict()) == {"in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias"}


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_gradcheck(kv_heads: int) -> None:
    torch.manual_seed(6)
    mha = MultiHeadAttention(8, 4, kv_heads=kv_heads, kdim=3, vdim=2).double()
    query = randn(2, 2, 8).requires_grad_()
    key = randn(2, 3, 3).requires_grad_()
    value = randn(2, 3, 2).requires_grad_()
    lengths = torch.tensor([3, 1])

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return mha(q, k, v, key_lengths=lengths, causal=True)[0]

    assert torch.autograd.gradcheck(f, (query, key, value))


def expanded_to_all_heads(gqa: MultiHeadAttention) -> MultiHeadAttention:
    """An equivalent module with one key/value head per query head (the GQA K/V heads repeated)."""
    full = MultiHeadAttention(gqa.embed_dim, gqa.num_heads, kdim=gqa.kdim, vdim=gqa.vdim).double()
    groups = gqa.num_heads // gqa.kv_heads
    small, big = gqa.projection_weights(), full.projection_weights()
    with torch.no_grad():
        for name in ("q", "out"):
            big[name][0].copy_(small[name][0])
            big[name][1].copy_(small[name][1])
        for name in ("k", "v"):
            w = small[name][0].reshape(gqa.kv_heads, gqa.head_dim, -1).repeat_interleave(groups, dim=0)
            big[name][0].copy_(w.reshape(big[name][0].shape))
            b = small[name][1].reshape(gqa.kv_heads, gqa.head_dim).repeat_interleave(groups, dim=0)
            big[name][1].copy_(b.reshape(-1))
    return full


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_grouped_query_equals_repeated_kv_heads(kv_heads: int) -> None:
    torch.manual_seed(7)
    gqa = MultiHeadAttention(16, 4, kv_heads=kv_heads).double()
    with torch.no_grad():
        for p in gqa.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    assert gqa.projection_weights()["k"][0].shape == (kv_heads * 4, 16)
    assert gqa.in_proj.out_features == 16 + 2 * kv_heads * 4
    full = expanded_to_all_heads(gqa)
    x = randn(2, 6, 16)
    out, w = gqa(x, causal=True, need_weights=True)
    ref_out, ref_w = full(x, causal=True, need_weights=True)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(8)
    mha = MultiHeadAttention(8, 2, dropout=0.5).double()
    plain = MultiHeadAttention(8, 2).double()
    plain.load_state_dict(mha.state_dict())
    x = randn(2, 6, 8)

    torch.testing.assert_close(mha.eval()(x)[0], plain.eval()(x)[0], **TOL)
    mha.train()
    out, w = mha(x, need_weights=True)
    assert (w == 0).any()
    assert not torch.allclose(out, plain(x)[0])
    # The returned weights are the ones applied: out == out_proj(weights @ v).
    v = nn.functional.linear(x, *mha.projection_weights()["v"]).reshape(2, 6, 2, 4).transpose(1, 2)  # (B, H, S, D)
    torch.testing.assert_close(out, mha.out_proj((w @ v).transpose(1, 2).reshape(2, 6, 8)), **TOL)


def test_fully_masked_rows_are_zero_not_nan() -> None:
    _, ours = reference_pair(8, 2)
    x = randn(2, 4, 8)
    out, w = ours(x, key_lengths=torch.tensor([0, 4]), need_weights=True)
    assert not out.isnan().any()
    assert (w[0] == 0).all()
    torch.testing.assert_close(out[0], ours.out_proj.bias.expand(4, 8), **TOL)


def test_default_init_matches_torch_conventions() -> None:
    mha = MultiHeadAttention(64, 2)
    for name, (weight, bias) in mha.projection_weights().items():
        assert bias is not None and (bias == 0).all()
        if name != "out":  # Xavier-uniform per projection, each with its own fan: bound sqrt(6 / (64 + 64))
            assert weight.abs().max() <= 0.2166 and weight.abs().max() > 0.19
    no_bias = MultiHeadAttention(8, 2, bias=False)
    assert all(b is None for _, b in no_bias.projection_weights().values())


# Bad input: one test per error; each message names the argument.


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"embed_dim": 10, "num_heads": 4}, r"embed_dim=10 is not divisible by num_heads=4"),
        ({"embed_dim": 8, "num_heads": 4, "kv_heads": 3}, r"num_heads=4 is not a multiple of kv_heads=3"),
        ({"embed_dim": 0, "num_heads": 1}, r"embed_dim must be a positive int; got 0"),
        ({"embed_dim": 8, "num_heads": -2}, r"num_heads must be a positive int; got -2"),
        ({"embed_dim": 8, "num_heads": 2, "kv_heads": 0}, r"kv_heads must be a positive int; got 0"),
        ({"embed_dim": 8, "num_heads": 2, "kdim": 2.5}, r"kdim must be a positive int; got 2.5"),
        ({"embed_dim": 8, "num_heads": 2, "vdim": True}, r"vdim must be a positive int; got True"),
        ({"embed_dim": 8, "num_heads": 2, "dropout": 1.0}, r"dropout must be a probability in \[0, 1\); got 1.0"),
    ],
)
def test_constructor_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)  # type: ignore[arg-type]


def test_query_of_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"query must have shape \(B, L, E\) .*got \(5, 8\)"):
        MultiHeadAttention(8, 2)(torch.randn(5, 8))


def test_query_of_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"query has shape \(2, 5, 6\); expected \(B, L, E\) with E=8, got E=6"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 6))


def test_query_not_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"query must be a torch.Tensor .*got list"):
        MultiHeadAttention(8, 2)([[1.0]])  # type: ignore[arg-type]


def test_key_of_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"key must have shape \(B, S, kdim\) .*got \(2, 1, 4, 8\)"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 8), torch.randn(2, 1, 4, 8))


def test_key_of_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"key has shape \(2, 4, 8\); expected \(B, S, kdim\) with kdim=3"):
        MultiHeadAttention(8, 2, kdim=3)(torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8))


def test_value_of_wrong_width() -> None:
    with pytest.raises(ValueError, match=r"value has shape \(2, 4, 8\); expected \(B, S, vdim\) with vdim=5"):
        MultiHeadAttention(8, 2, vdim=5)(torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8))


def test_key_value_lengths_differ() -> None:
    with pytest.raises(ValueError, match=r"value has shape \(2, 3, 8\) but key has \(2, 4, 8\)"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 3, 8))


def test_key_batch_differs_from_query() -> None:
    with pytest.raises(ValueError, match=r"key has batch size 3 .* but query has 2"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 8), torch.randn(3, 4, 8))


def test_value_without_key() -> None:
    with pytest.raises(ValueError, match=r"value was given without key"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 8), None, torch.randn(2, 5, 8))


def test_self_attention_needs_kdim_equal_embed_dim() -> None:
    with pytest.raises(ValueError, match=r"key is None \(self-attention\), which needs kdim == vdim == embed_dim"):
        MultiHeadAttention(8, 2, kdim=4)(torch.randn(2, 5, 8))


def test_average_weights_without_need_weights() -> None:
    with pytest.raises(ValueError, match=r"average_weights=True needs need_weights=True"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 8), average_weights=True)


def test_cache_of_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"cache must be a qkv.nn.KVCache or None; got dict"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 8), cache={})  # type: ignore[arg-type]


def test_mask_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"mask of shape \(5, 4\) is not broadcastable"):
        MultiHeadAttention(8, 2)(torch.randn(2, 5, 8), mask=torch.ones(5, 4, dtype=torch.bool))


def test_cache_batch_differs_from_query() -> None:
    mha = MultiHeadAttention(8, 2)
    cache = KVCache()
    mha(torch.randn(2, 3, 8), cache=cache)
    with pytest.raises(ValueError, match=r"query has batch size 3 but the cache holds 2"):
        mha(torch.randn(3, 1, 8), cache=cache)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_input_of_another_dtype_is_named(which: str, dtype: torch.dtype) -> None:
    """Once torch's raw 'mat1 and mat2 must have the same dtype'."""
    mha = MultiHeadAttention(8, 2)
    inputs = {name: torch.randn(2, 3, 8) for name in ("query", "key", "value")}
    inputs[which] = inputs[which].to(dtype)
    expected = rf"{which} has dtype {dtype} but the module's parameters are torch.float32; convert"
    with pytest.raises(TypeError, match=expected):
        mha(inputs["query"], inputs["key"], inputs["value"])


def test_token_ids_are_refused_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"query must be a floating-point tensor.*got dtype torch.int64.*embedding"):
        MultiHeadAttention(8, 2)(torch.ones(2, 3, 8, dtype=torch.int64))


def test_autocast_inputs_of_another_dtype_are_accepted() -> None:
    mha = MultiHeadAttention(8, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = mha(torch.randn(2, 3, 8).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
