"""Shared pieces of the ``qkv.ops`` tests: the backends under test, random cases, and an oracle.

The oracle, :func:`reference_attention`, is written here from the documented semantics of
``qkv.attention`` and never calls qkv: positional rules and ALiBi distances come from explicit loops over
``(i, j)``, grouped heads from ``repeat_interleave``, and everything is computed in float64.

Adding a backend: put its name in :data:`BACKENDS_UNDER_TEST` if it implements every feature of
``qkv.attention`` (weights, lse, soft-capping, generator dropout); every comparison test then runs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

# Backends that implement every feature and must match the reference exactly. A new one joins here.
BACKENDS_UNDER_TEST = ["math", "tiled"]
# Entry points that accept every call: those backends and "auto", whatever it dispatches to.
EVERY_CALL_BACKENDS = [*BACKENDS_UNDER_TEST, "auto"]
# Backends whose returned weights and lse carry gradients (auto switches to math when they are asked for
# while the inputs require grad; tiled then computes them with the reference formula beside its output).
DIFFERENTIABLE_EXTRAS_BACKENDS = ["math", "tiled", "auto"]
# Backends compared with F.scaled_dot_product_attention on the calls SDPA can express.
SDPA_PARITY_BACKENDS = [*BACKENDS_UNDER_TEST, "torch", "auto"]

# (atol, rtol) for comparisons between exact implementations.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}


def make_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_qkv(
    batch: tuple[int, ...] = (2,),
    heads: int = 4,
    kv_heads: int = 2,
    q_len: int = 5,
    kv_len: int = 7,
    head_dim: int = 8,
    value_dim: int = 6,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit-scale ``q (*batch, H, L, D)``, ``k (*batch, Hkv, S, D)``, ``v (*batch, Hkv, S, Dv)``."""
    g = make_gen(seed)
    q = torch.randn(*batch, heads, q_len, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(*batch, kv_heads, kv_len, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(*batch, kv_heads, kv_len, value_dim, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v))  # type: ignore[return-value]


def rand_bool_mask(shape: tuple[int, ...], seed: int, p_true: float = 0.7) -> torch.Tensor:
    """``True`` (may attend) with probability ``p_true``."""
    return torch.rand(shape, generator=make_gen(seed)) < p_true


def rand_float_mask(
    shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64, neg_inf: float = 0.0
) -> torch.Tensor:
    """Additive mask of unit-scale values, ``-inf`` with probability ``neg_inf``.

    Values are multiples of 1/64, like :func:`rand_slopes`, so that biases (mask plus ALiBi) are exact in
    float32 and above whatever the order of the sums; comparisons then measure the backend, not how it
    rounds biases. Full float64 biases have their own tests (``test_float64_*_keeps_float64_precision``).
    """
    g = make_gen(seed)
    values = (torch.randn(shape, generator=g, dtype=torch.float64) * 64).round() / 64
    values = values.masked_fill(torch.rand(shape, generator=g) < neg_inf, float("-inf"))
    return values.to(dtype)


def rand_slopes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ALiBi slopes ``k/64`` (k in 1..64): products with integer distances are exact in float32."""
    return torch.randint(1, 65, shape, generator=make_gen(seed)).to(torch.float64) / 64


def rand_key_lengths(batch: tuple[int, ...], kv_len: int, seed: int) -> torch.Tensor:
    """Integer ``batch``-shaped lengths in ``[0, S]``."""
    return torch.randint(0, kv_len + 1, batch, generator=make_gen(seed))


def diagonal_offset(q_len: int, kv_len: int, causal: bool | str) -> int:
    """Key index of query 0's diagonal: ``S - L``, or 0 with ``causal="top_left"``."""
    return 0 if causal == "top_left" else kv_len - q_len


def reference_positional(
    q_len: int, kv_len: int, causal: bool | str = False, window: tuple[int, int] | None = None
) -> torch.Tensor:
    """``(L, S)`` bool allowed-matrix of the causal and window rules, one ``(i, j)`` at a time."""
    offset = diagonal_offset(q_len, kv_len, causal)
    left, right = window if window is not None else (-1, -1)
    rows = []
    for i in range(q_len):
        diag = i + offset
        row = []
        for j in range(kv_len):
            ok = not (causal and j > diag)
            ok = ok and not (left != -1 and j < diag - left)
            ok = ok and not (right != -1 and j > diag + right)
            row.append(ok)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(q_len, kv_len)


def reference_distance(q_len: int, kv_len: int, causal: bool | str = False) -> torch.Tensor:
    """``(L, S)`` float64 ALiBi distances ``|i + offset - j|``."""
    offset = diagonal_offset(q_len, kv_len, causal)
    rows = [[float(abs(i + offset - j)) for j in range(kv_len)] for i in range(q_len)]
    return torch.tensor(rows, dtype=torch.float64).reshape(q_len, kv_len)


def reference_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    causal: bool | str = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """float64 ``(..., H, L, S)`` scores after soft-capping, biases and masks (``-inf`` = not allowed)."""
    q, k = q.double(), k.double()
    heads, q_len, head_dim = q.shape[-3:]
    kv_len = k.shape[-2]
    batch = q.shape[:-3]
    k = expand_kv(k, heads)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().reshape(*alibi_slopes.shape, 1, 1)
        scores = scores - slopes * reference_distance(q_len, kv_len, causal)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask.double()

    allowed = reference_positional(q_len, kv_len, causal, window).expand(*batch, heads, q_len, kv_len)
    if key_lengths is not None:
        cols = torch.arange(kv_len)
        allowed = allowed & (cols < key_lengths.reshape(*batch, 1, 1, 1))
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    return scores.masked_fill(~allowed, float("-inf"))


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout: float = 0.0,
    keep: torch.Tensor | None = None,
    **features: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``(out, weights, lse)`` of ``qkv.attention``'s documented semantics.

    ``features`` as :func:`reference_scores`. ``keep`` (bool, broadcastable to ``(..., H, L, S)``) is the
    dropout keep-mask, required when ``dropout > 0``. Differentiable; rows with no allowed key give
    zero weights, zero output, ``lse = -inf`` and zero gradients.
    """
    scores = reference_scores(q, k, **features)  # type: ignore[arg-type]
    has_key = torch.isfinite(scores).any(dim=-1, keepdim=True)
    if scores.shape[-1] == 0:
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    else:
        row_max = torch.where(has_key, scores.detach().amax(dim=-1, keepdim=True), 0.0)
    exp = torch.exp(scores - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    safe_total = torch.where(has_key, total, 1.0)
    weights = exp / safe_total
    lse = torch.where(has_key, row_max + torch.log(safe_total), float("-inf")).squeeze(-1)
    if dropout > 0:
        assert keep is not None, "dropout needs the keep mask"
        weights = weights * keep / (1.0 - dropout)
    out = torch.matmul(weights, expand_kv(v.double(), q.shape[-3]))
    return out, weights, lse


def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., Hkv, S, X)`` → ``(..., H, S, X)``: query head ``h`` reads kv head ``h // (H // Hkv)``."""
    return t.repeat_interleave(heads // t.shape[-3], dim=-3)


def grads(outputs: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 123) -> tuple[torch.Tensor, ...]:
    """Gradients of ``<outputs, G>`` for a fixed random ``G`` (zeros where an input gets none)."""
    upstream = torch.randn(outputs.shape, generator=make_gen(seed), dtype=torch.float64).to(outputs.dtype)
    got = torch.autograd.grad(outputs, inputs, upstream, allow_unused=True, retain_graph=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(got, inputs, strict=True))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """``torch.testing.assert_close`` at :data:`TOL` of ``dtype``, comparing values in float64."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda default: f"{msg}\n{default}"
    )


@dataclass(frozen=True)
class Call:
    """Shapes of a call plus ``features(call) -> kwargs`` of ``qkv.attention`` (masks built from seeds)."""

    name: str
    batch: tuple[int, ...] = (2,)
    heads: int = 4
    kv_heads: int = 2
    q_len: int = 5
    kv_len: int = 7
    head_dim: int = 8
    value_dim: int = 6
    features: Callable[[Call], dict[str, Any]] = field(default=lambda c: {}, repr=False)

    def tensors(
        self, dtype: torch.dtype = torch.float64, *, seed: int = 0, requires_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return make_qkv(
            self.batch,
            self.heads,
            self.kv_heads,
            self.q_len,
            self.kv_len,
            self.head_dim,
            self.value_dim,
            dtype=dtype,
            seed=seed,
            requires_grad=requires_grad,
        )

    def kwargs(self, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
        """The features, with float masks in ``dtype`` unless a case fixed their dtype."""
        kw = self.features(self)
        if isinstance(kw.get("mask"), torch.Tensor) and kw["mask"].dtype == torch.float64:
            kw["mask"] = kw["mask"].to(dtype)
        return kw

    @property
    def score_shape(self) -> tuple[int, ...]:
        return (*self.batch, self.heads, self.q_len, self.kv_len)


def _everything(c: Call, causal: bool | str = True) -> dict[str, Any]:
    return {
        "key_lengths": rand_key_lengths(c.batch, c.kv_len, seed=11).clamp(min=1),
        "causal": causal,
        "window": (3, 1),
        "alibi_slopes": rand_slopes((*c.batch, c.heads), seed=12),
        "softcap": 2.5,
        "mask": rand_float_mask((*c.batch[:1], *[1] * (len(c.batch) - 1), 1, c.q_len, c.kv_len), 13, neg_inf=0.1),
        "scale": 0.6,
    }


# Every feature alone, at both alignments and with L < S, L = S and L > S, then in combination.
REFERENCE_CASES = [
    Call("plain"),
    Call("plain_mha", kv_heads=4),
    Call("mqa", kv_heads=1),
    Call("scale", features=lambda c: {"scale": 1.9}),
    # Scales <= 0 with is_causal once reached PyTorch's CPU flash kernel, which returns NaN for them.
    Call("negative_scale_top_left", features=lambda c: {"scale": -0.5, "causal": "top_left"}),
    Call("negative_scale_causal", q_len=7, kv_len=7, features=lambda c: {"scale": -1.3, "causal": True}),
    Call("zero_scale_top_left", features=lambda c: {"scale": 0.0, "causal": "top_left"}),
    Call("tiny_scale_top_left", features=lambda c: {"scale": 1e-9, "causal": "top_left"}),
    Call(
        "negative_scale_masks",
        features=lambda c: {"scale": -0.8, "key_lengths": torch.tensor([3, 7]), "window": (2, 1)},
    ),
    Call("key_lengths", features=lambda c: {"key_lengths": torch.tensor([0, 4])}),
    Call("key_lengths_full", features=lambda c: {"key_lengths": torch.tensor([7, 1])}),
    Call("causal_L<S", features=lambda c: {"causal": True}),
    Call("causal_L=S", q_len=6, kv_len=6, features=lambda c: {"causal": "bottom_right"}),
    Call("causal_L>S", q_len=7, kv_len=4, features=lambda c: {"causal": True}),
    Call("top_left_L<S", features=lambda c: {"causal": "top_left"}),
    Call("top_left_L>S", q_len=7, kv_len=4, features=lambda c: {"causal": "top_left"}),
    Call("window_2_1", features=lambda c: {"window": (2, 1)}),
    Call("window_2_1_L>S", q_len=8, kv_len=4, features=lambda c: {"window": (2, 1)}),
    Call("window_unbounded_left", features=lambda c: {"window": (-1, 0)}),
    Call("window_unbounded_right", features=lambda c: {"window": (1, -1)}),
    Call("window_unbounded_both", features=lambda c: {"window": (-1, -1)}),
    Call("window_0_0", q_len=7, kv_len=5, features=lambda c: {"window": (0, 0)}),
    Call("window_causal", features=lambda c: {"window": (3, 2), "causal": True}),
    Call(
        "window_causal_right_unbounded_L>S", q_len=7, kv_len=5, features=lambda c: {"window": (2, -1), "causal": True}
    ),
    Call("window_top_left", features=lambda c: {"window": (1, 2), "causal": "top_left"}),
    Call("alibi_H", features=lambda c: {"alibi_slopes": rand_slopes((c.heads,), 5)}),
    Call("alibi_BH", features=lambda c: {"alibi_slopes": rand_slopes((*c.batch, c.heads), 5)}),
    Call("alibi_top_left", features=lambda c: {"alibi_slopes": rand_slopes((c.heads,), 6), "causal": "top_left"}),
    Call(
        "alibi_causal_L>S",
        q_len=7,
        kv_len=4,
        features=lambda c: {"alibi_slopes": rand_slopes((c.heads,), 6), "causal": True},
    ),
    Call("softcap", features=lambda c: {"softcap": 0.5}),
    Call(
        "softcap_alibi_float_mask",
        features=lambda c: {
            "softcap": 1.5,
            "alibi_slopes": rand_slopes((c.heads,), 7),
            "mask": rand_float_mask(c.score_shape, 8),
        },
    ),
    Call("bool_mask", features=lambda c: {"mask": rand_bool_mask((*c.batch, 1, c.q_len, c.kv_len), 9, 0.5)}),
    Call("float_mask_neg_inf", features=lambda c: {"mask": rand_float_mask(c.score_shape, 10, neg_inf=0.4)}),
    Call(
        "float32_mask_LS",
        features=lambda c: {"mask": rand_float_mask((c.q_len, c.kv_len), 10, torch.float32, neg_inf=0.2)},
    ),
    Call("everything", heads=6, kv_heads=2, features=_everything),
    Call(
        "everything_top_left_bool",
        heads=6,
        kv_heads=3,
        q_len=8,
        kv_len=5,
        features=lambda c: {**_everything(c, "top_left"), "mask": rand_bool_mask((c.heads, 1, c.kv_len), 14)},
    ),
    Call("everything_L>S", heads=4, kv_heads=1, q_len=9, kv_len=6, features=_everything),
    Call("everything_3d", batch=(), features=_everything),
    Call("everything_5d", batch=(2, 2), features=_everything),
]


def _without_softcap(call: Call) -> Call:
    def features(c: Call, of: Callable[[Call], dict[str, Any]] = call.features) -> dict[str, Any]:
        return {k: v for k, v in of(c).items() if k != "softcap"}

    return replace(call, features=features)


# What SDPA accepts is every case with soft-capping left out: there the torch backend must equal math.
SDPA_CASES = [_without_softcap(c) for c in REFERENCE_CASES if c.name != "softcap"]
