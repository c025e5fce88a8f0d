"""Any memory layout gives the right answer on every backend: strided, transposed, expanded, channels-last.

The tiled backend's fused CPU kernel reads the last dimension as if it were contiguous; it once returned
wrong values (errors of ~2, or NaN) for a transposed ``k`` or a channels-last ``q``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import qkv

from .helpers import SDPA_PARITY_BACKENDS, assert_close, grads, make_gen, reference_attention

Layout = Callable[[torch.Tensor], torch.Tensor]


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored as ``(..., D, L)``: the last dimension has stride L."""
    return t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, D)`` in channels-last memory format: the head dimension has stride 1."""
    return t.detach().contiguous(memory_format=torch.channels_last)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Every other element of a twice-as-wide tensor along the last dimension."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t.detach()
    return wide[..., ::2]


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """``(B, L, H, D)`` storage viewed as ``(B, H, L, D)``, as attention modules produce."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2)


def _expanded_batch(t: torch.Tensor) -> torch.Tensor:
    """Batch element 0 repeated with stride 0 along the batch dimension."""
    return t.detach()[:1].expand(t.shape)


LAYOUTS: dict[str, Layout] = {
    "transposed": _transposed,
    "channels_last": _channels_last,
    "strided": _strided,
    "heads_last": _heads_last,
    "expanded_batch": _expanded_batch,
}
FEATURES = {
    "window": {"window": (8, 8)},
    "top_left": {"causal": "top_left"},
    "key_lengths_causal": {"key_lengths": torch.tensor([40, 64]), "causal": True},
}


@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_any_layout_matches_reference(layout: Layout, which: str, features: dict, backend: str) -> None:
    g = make_gen(3)
    base = [torch.randn(2, 2, 64, 16, generator=g, dtype=torch.float32) for _ in range(3)]
    inputs = [layout(t) if name in which else t for name, t in zip("qkv", base, strict=True)]
    assert any(not t.is_contiguous() for t in inputs)
    q, k, v = (t.requires_grad_() for t in inputs)
    out = qkv.attention(q, k, v, backend=backend, **features)
    ref_out, _, _ = reference_attention(q, k, v, **features)
    assert_close(out, ref_out, torch.float32, msg="out")
    for name, got, want in zip("qkv", grads(out, (q, k, v)), grads(ref_out, (q, k, v)), strict=True):
        assert_close(got, want, torch.float32, msg=f"d{name}")


@pytest.mark.parametrize("backend", SDPA_PARITY_BACKENDS)
def test_expanded_upstream_gradient(backend: str) -> None:
    """``out.sum().backward()`` hands the backward pass a gradient with all strides 0."""
    q, k, v = (torch.randn(1, 2, 64, 16, generator=make_gen(i), requires_grad=True) for i in range(3))
    qkv.attention(q, k, v, window=(4, 4), backend=backend).sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference_attention(q2, k2, v2, window=(4, 4))[0].sum().backward()
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert_close(got, want, torch.float32)
