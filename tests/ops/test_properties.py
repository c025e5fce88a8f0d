"""Property tests: random shapes, masks and flags; backends equal the reference, never NaN.

Sizes start at 1 (empty dimensions have their own tests in ``test_reference.py``). Examples are
derandomized so that a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv

from .helpers import (
    EVERY_CALL_BACKENDS,
    assert_close,
    grads,
    make_qkv,
    rand_bool_mask,
    rand_float_mask,
    rand_key_lengths,
    rand_slopes,
    reference_attention,
)

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True)


@dataclass(frozen=True)
class RandomCall:
    batch: tuple[int, ...]
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    seed: int
    kwargs: dict[str, Any]

    def tensors(self, dtype: torch.dtype = torch.float64, requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
        return make_qkv(
            self.batch,
            self.heads,
            self.kv_heads,
            self.q_len,
            self.kv_len,
            self.head_dim,
            self.value_dim,
            dtype=dtype,
            seed=self.seed,
            requires_grad=requires_grad,
        )

    @property
    def sdpa_accepts(self) -> bool:
        return "softcap" not in self.kwargs


@st.composite
def random_calls(draw: st.DrawFn) -> RandomCall:
    batch = draw(st.sampled_from([(), (1,), (2,), (2, 1), (1, 2)]))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    q_len, kv_len = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    head_dim, value_dim = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**20))
    score_shape = (*batch, heads, q_len, kv_len)

    kwargs: dict[str, Any] = {}
    causal = draw(st.sampled_from([False, True, "bottom_right", "top_left"]))
    if causal is not False:
        kwargs["causal"] = causal
    if draw(st.booleans()):
        kwargs["window"] = (draw(st.integers(-1, 4)), draw(st.integers(-1, 4)))
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    if mask_kind is not None:
        # Any broadcastable shape: some dims kept, the others 1, and some leading dims dropped.
        kept = [draw(st.booleans()) for _ in score_shape]
        shape = tuple(n if keep else 1 for n, keep in zip(score_shape, kept, strict=True))
        shape = shape[draw(st.integers(0, len(shape))) :]
        if mask_kind == "bool":
            kwargs["mask"] = rand_bool_mask(shape, seed + 1, p_true=draw(st.sampled_from([0.3, 0.8])))
        else:
            mask_dtype = draw(st.sampled_from([torch.float64, torch.float32]))
            neg_inf = draw(st.sampled_from([0.0, 0.3]))
            kwargs["mask"] = rand_float_mask(shape, seed + 1, mask_dtype, neg_inf=neg_inf)
    if draw(st.booleans()):
        kwargs["key_lengths"] = rand_key_lengths(batch, kv_len, seed + 2)
    alibi = draw(st.sampled_from([None, "H", "BH"]))
    if alibi is not None:
        kwargs["alibi_slopes"] = rand_slopes((heads,) if alibi == "H" else (*batch, heads), seed + 3)
    if draw(st.booleans()):
        kwargs["softcap"] = draw(st.sampled_from([0.3, 1.0, 4.0]))
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 3.0))
    return RandomCall(batch, heads, kv_heads, q_len, kv_len, head_dim, value_dim, seed, kwargs)


@SETTINGS
@given(call=random_calls())
def test_backends_match_reference(call: RandomCall) -> None:
    q, k, v = call.tensors(requires_grad=True)
    ref_out, ref_weights, ref_lse = reference_attention(q, k, v, **call.kwargs)
    empty = torch.isneginf(ref_lse)
    ref_grads = grads(ref_out, (q, k, v))
    for backend in EVERY_CALL_BACKENDS:
        out, weights, lse = qkv.attention(q, k, v, return_weights=True, return_lse=True, backend=backend, **call.kwargs)
        got_grads = grads(out, (q, k, v))
        for t in (out, weights, *got_grads):
            assert not torch.isnan(t).any()
        assert_close(out, ref_out, torch.float64, msg=f"out, {backend}")
        assert_close(weights, ref_weights, torch.float64, msg=f"weights, {backend}")
        assert_close(lse, ref_lse, torch.float64, msg=f"lse, {backend}")
        assert (out[empty] == 0).all() and (weights[empty] == 0).all() and torch.isneginf(lse[empty]).all()
        for got, want in zip(got_grads, ref_grads, strict=True):
            assert_close(got, want, torch.float64, msg=f"grads, {backend}")


@SETTINGS
@given(call=random_calls().filter(lambda c: c.sdpa_accepts))
def test_torch_backend_equals_math(call: RandomCall) -> None:
    q, k, v = call.tensors(requires_grad=True)
    expected = qkv.attention(q, k, v, backend="math", **call.kwargs)
    for backend in ("torch", "auto"):
        out = qkv.attention(q, k, v, backend=backend, **call.kwargs)
        assert not torch.isnan(out).any()
        assert_close(out, expected, torch.float64, msg=backend)
        for got, want in zip(grads(out, (q, k, v)), grads(expected, (q, k, v)), strict=True):
            assert not torch.isnan(got).any()
            assert_close(got, want, torch.float64, msg=f"grads, {backend}")


@settings(max_examples=60, deadline=None, derandomize=True)
@given(call=random_calls(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_low_precision_never_nan_and_empty_rows_are_zero(call: RandomCall, dtype: torch.dtype) -> None:
    q, k, v = call.tensors(dtype)
    kwargs = dict(call.kwargs)
    if isinstance(kwargs.get("mask"), torch.Tensor) and kwargs["mask"].dtype == torch.float64:
        kwargs["mask"] = kwargs["mask"].to(dtype)
    _, _, ref_lse = reference_attention(q, k, v, **kwargs)
    empty = torch.isneginf(ref_lse)
    backends = [*EVERY_CALL_BACKENDS, "torch"] if call.sdpa_accepts else EVERY_CALL_BACKENDS
    for backend in backends:
        if backend == "torch":
            out = qkv.attention(q, k, v, backend=backend, **kwargs)
        else:
            out, weights, lse = qkv.attention(q, k, v, return_weights=True, return_lse=True, backend=backend, **kwargs)
            assert not torch.isnan(weights).any() and not torch.isnan(lse).any()
            assert (weights[empty] == 0).all() and torch.isneginf(lse[empty]).all()
            assert torch.isfinite(lse[~empty]).all()
        assert out.dtype == dtype
        assert not torch.isnan(out).any(), backend
        assert (out[empty] == 0).all(), backend


def test_property_strategy_reaches_every_feature() -> None:
    """The strategy must produce every feature (else the properties above test less than they claim)."""
    seen: set[str] = set()

    @settings(max_examples=120, deadline=None, derandomize=True)
    @given(call=random_calls())
    def collect(call: RandomCall) -> None:
        seen.update(call.kwargs)
        if call.kv_heads != call.heads:
            seen.add("gqa")
        if call.q_len > call.kv_len:
            seen.add("L>S")

    collect()
    features = {"causal", "window", "mask", "key_lengths", "alibi_slopes", "softcap", "scale", "gqa", "L>S"}
    assert seen >= features
