"""What the benchmark runs: feature cases, their inputs, the FLOP count, and the peers being compared.

A :class:`Case` is one point of the sweep: a feature (``plain``, ``causal``, ``alibi``…), a length
``S`` (``L = S``, except ``bottom_right`` where ``L = S/2``), a head dim ``D`` and a mode (``fwd`` or
``fwd+bwd``). It serializes to JSON, so a memory worker can rebuild the same inputs from it.

The peers (see :data:`PEERS`):

* ``math``, ``tiled``, ``torch``, ``auto``: ``qkv.attention(..., backend=name)``;
* ``sdpa``: raw ``F.scaled_dot_product_attention``, only for the features SDPA takes natively (a boolean
  mask, ``is_causal``, bottom-right causal via ``causal_lower_right``, dropout);
* ``naive``: :func:`naive_attention`, the textbook code with dense masks.

A peer that cannot run a case raises :class:`Unsupported` with the reason (reported as ``n/a``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qkv.ops import attention, explain_backend

# Feature case -> what it measures. The order is the default sweep order.
FEATURES: dict[str, str] = {
    "plain": "no mask",
    "causal": "causal=True (L = S)",
    "padding": "boolean padding mask (B, 1, 1, S), the last keys of each sequence masked",
    "key_lengths": "key_lengths=(B,): the same padding given as lengths",
    "alibi": "ALiBi slopes 2^(-8h/H)",
    "softcap": "softcap=30",
    "window": "sliding window (256, 0): each query sees itself and the 256 keys before it",
    "dropout": "dropout=0.1 (global RNG)",
    "weights": "return_weights=True",
    "bottom_right": "causal=True with L = S/2: the last query aligned with the last key",
}
MODES = ("fwd", "fwd+bwd")
QKV_BACKENDS = ("math", "tiled", "torch", "auto")
PEERS = (*QKV_BACKENDS, "sdpa", "naive")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

SOFTCAP = 30.0
WINDOW = (256, 0)
DROPOUT = 0.1
# Backward costs 2.5 forwards (FlashAttention's convention), so fwd+bwd counts 3.5 forwards.
BWD_FACTOR = 2.5


class Unsupported(Exception):
    """A peer cannot compute a case; the message says why (reported as ``n/a``)."""


@dataclass(frozen=True)
class Case:
    """One point of the sweep. ``length`` is ``S``; ``L = S`` except for ``bottom_right``."""

    feature: str
    length: int
    head_dim: int
    mode: str
    batch: int = 1
    heads: int = 8
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.feature not in FEATURES:
            raise ValueError(f"feature must be one of {', '.join(FEATURES)}; got {self.feature!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        for name in ("length", "head_dim", "batch", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")

    @property
    def q_len(self) -> int:
        """``L``."""
        return max(1, self.length // 2) if self.feature == "bottom_right" else self.length

    @property
    def kv_len(self) -> int:
        """``S``."""
        return self.length

    @property
    def causal(self) -> bool:
        return self.feature in ("causal", "bottom_right")

    @property
    def backward(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def flops(self) -> float:
        """FLOPs of one call under the FlashAttention convention (see :func:`attention_flops`)."""
        return attention_flops(
            self.batch, self.heads, self.q_len, self.kv_len, self.head_dim, causal=self.causal, mode=self.mode
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Case:
        return cls(**data)


def attention_flops(
    batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, *, causal: bool, mode: str
) -> float:
    """FlashAttention's count: ``fwd = 4·B·H·L·S·D`` (two matmuls of ``2·L·S·D``), halved when causal;
    ``fwd+bwd = fwd · (1 + 2.5)``. Masks, windows and padding are not subtracted: every backend is
    credited with the same work, so skipping masked blocks shows up as a higher rate.
    """
    fwd = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal:
        fwd /= 2
    return fwd * (1 + BWD_FACTOR) if mode == "fwd+bwd" else fwd


def alibi_slopes(heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes ``2^(-8·h/H)`` for ``h = 1..H``, ``(H,)`` float32."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)


def valid_lengths(batch: int, kv_len: int) -> torch.Tensor:
    """``(B,)`` int64: element ``b`` keeps ``S - (b+1)·S/8`` keys (at least one): some padding in each."""
    return torch.tensor([max(1, kv_len - (b + 1) * kv_len // 8) for b in range(batch)], dtype=torch.int64)


@dataclass
class Inputs:
    """Tensors of a case. ``q: (B, H, L, D)``, ``k, v: (B, H, S, D)``; ``features`` are the keyword
    arguments of ``qkv.attention`` (and of :func:`naive_attention`) that define the feature case;
    ``grad_out: (B, H, L, D)`` is the upstream gradient for ``fwd+bwd`` (``None`` for ``fwd``)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    features: dict[str, Any]
    grad_out: torch.Tensor | None


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Random unit-scale inputs for ``case`` on its device, created directly in its dtype.

    The tensors require grad in ``fwd+bwd`` mode only, so ``fwd`` timings record no autograd graph.
    """
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    b, h, d, L, S = case.batch, case.heads, case.head_dim, case.q_len, case.kv_len

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q, k, v = randn(b, h, L, d), randn(b, h, S, d), randn(b, h, S, d)
    grad_out = randn(b, h, L, d) if case.backward else None
    for t in (q, k, v):
        t.requires_grad_(case.backward)

    lengths = valid_lengths(b, S).to(device)
    by_feature: dict[str, dict[str, Any]] = {
        "plain": {},
        "causal": {"causal": True},
        "padding": {"mask": (torch.arange(S, device=device) < lengths[:, None]).reshape(b, 1, 1, S)},
        "key_lengths": {"key_lengths": lengths},
        "alibi": {"alibi_slopes": alibi_slopes(h).to(device)},
        "softcap": {"softcap": SOFTCAP},
        "window": {"window": WINDOW},
        "dropout": {"dropout": DROPOUT},
        "weights": {"return_weights": True},
        "bottom_right": {"causal": True},
    }
    return Inputs(q, k, v, by_feature[case.feature], grad_out)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    causal: bool = False,
    window: tuple[int, int] | None = None,
    scale: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    keep: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Textbook attention for ``q: (B, H, L, D)``, ``k, v: (B, H, S, D)``, every mask made dense.

    Features mean what they mean in ``qkv.attention`` (causal is bottom-right). Dropout uses
    ``F.dropout`` unless ``keep`` (bool ``(B, H, L, S)``, ``True`` = kept) fixes the pattern. Rows whose
    keys are all masked give NaN, as the textbook code does; the benchmark cases have none.
    """
    L, S = q.shape[-2], k.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-2, -1) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(L, device=q.device)[:, None] + (S - L)  # the key on query i's diagonal
    j = torch.arange(S, device=q.device)
    if alibi_slopes is not None:
        scores = scores - alibi_slopes[:, None, None] * (i - j).abs()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if key_lengths is not None:
        scores = scores.masked_fill(j >= key_lengths[:, None, None, None], float("-inf"))
    if causal:
        scores = scores.masked_fill(j > i, float("-inf"))
    if window is not None:
        left, right = window
        if left >= 0:
            scores = scores.masked_fill(j < i - left, float("-inf"))
        if right >= 0:
            scores = scores.masked_fill(j > i + right, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout > 0:
        weights = F.dropout(weights, dropout) if keep is None else weights * keep / (1 - dropout)
    out = weights @ v
    return (out, weights) if return_weights else out


def sdpa_call(inputs: Inputs) -> Callable[[], torch.Tensor]:
    """Raw ``F.scaled_dot_product_attention`` on the features SDPA has arguments for; else Unsupported."""
    q, k, v, feats = inputs.q, inputs.k, inputs.v, inputs.features
    unsupported = {
        "key_lengths": "SDPA has no key_lengths argument (qkv's torch backend turns it into a mask)",
        "alibi_slopes": "SDPA has no ALiBi argument (qkv's torch backend passes a dense float bias)",
        "window": "SDPA has no sliding-window argument (qkv's torch backend passes a dense mask)",
        "softcap": "SDPA has no soft-capping",
        "return_weights": "SDPA does not return the attention weights",
    }
    for name, reason in unsupported.items():
        if name in feats:
            raise Unsupported(reason)
    mask, is_causal = feats.get("mask"), False
    if feats.get("causal"):
        L, S = q.shape[-2], k.shape[-2]
        if L == S:
            is_causal = True
        else:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(L, S)
    dropout = feats.get("dropout", 0.0)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)


def make_call(peer: str, inputs: Inputs) -> Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]:
    """A no-argument function computing one forward of ``peer`` on ``inputs``; raises Unsupported."""
    q, k, v, feats = inputs.q, inputs.k, inputs.v, inputs.features
    if peer in QKV_BACKENDS:
        runs_on(peer, inputs)  # raises Unsupported before any timing
        return lambda: attention(q, k, v, backend=peer, **feats)
    if peer == "sdpa":
        return sdpa_call(inputs)
    if peer == "naive":
        return lambda: naive_attention(q, k, v, **feats)
    raise ValueError(f"peer must be one of {', '.join(PEERS)}; got {peer!r}")


def runs_on(peer: str, inputs: Inputs) -> str:
    """The implementation that computes ``peer`` on these inputs: ``auto`` resolves to a qkv backend."""
    if peer not in QKV_BACKENDS:
        return peer
    try:
        return explain_backend(inputs.q, inputs.k, inputs.v, backend=peer, **inputs.features).backend
    except ValueError as e:
        raise Unsupported(str(e)) from None


def make_step(call: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], inputs: Inputs) -> Callable[[], object]:
    """One timed unit: the forward, and for ``fwd+bwd`` the backward of ``out`` with ``grad_out``."""
    if inputs.grad_out is None:
        return call
    leaves = (inputs.q, inputs.k, inputs.v)
    grad_out = inputs.grad_out

    def step() -> None:
        for t in leaves:  # fresh gradients: no accumulation adds to the timing
            t.grad = None
        out = call()
        torch.autograd.backward(out[0] if isinstance(out, tuple) else out, grad_out)

    return step
