"""Which backend computes a call, and why.

Policy of ``backend="auto"`` (measured with ``qkv bench``; figures in the README):

1. ``torch``, PyTorch's fused SDPA kernel, when SDPA computes the call exactly as qkv defines it without
   a dense ``L×S`` mask built for it and without dropout (qkv's dropout pattern is its own, reproducible
   and equal across qkv's backends);
2. ``tiled`` (online softmax, O(N) memory) for everything else: weights or log-sum-exp requested,
   soft-capping, dropout, ALiBi, sliding windows, bottom-right causal with ``L != S``;
3. ``math`` for tiny inputs (``L·S <= 1024``), where its single pass costs least, and where tiled
   cannot run: a float mask or ALiBi slopes that require grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkv.ops.sdpa import sdpa_dense_mask_reason, sdpa_unsupported_reason
from qkv.ops.spec import AttentionSpec


def tiled_unsupported_reason(spec: AttentionSpec) -> str | None:
    """Why the tiled backend cannot compute this call, or ``None`` if it can."""
    if spec.mask is not None and spec.mask.requires_grad:
        return "the float mask requires grad and the tiled backward computes no mask gradient"
    if spec.alibi_slopes is not None and spec.alibi_slopes.requires_grad:
        return "alibi_slopes requires grad and the tiled backward computes no slope gradient"
    return None

BACKENDS = ("auto", "math", "torch", "tiled")
# Below this many scores per head, the reference path beats the tiled one's per-call overhead.
TINY_SCORES = 32 * 32


@dataclass(frozen=True)
class BackendChoice:
    """The backend a call runs on and the reason, e.g. ``BackendChoice('math', 'SDPA does not …')``."""

    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


def check_backend(backend: object) -> str:
    """Return ``backend`` if known, else raise a ``ValueError`` listing the known ones."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def choose_backend(
    spec: AttentionSpec,
    backend: str,
    *,
    return_weights: bool,
    return_lse: bool,
    generator: torch.Generator | None,
) -> BackendChoice:
    """Resolve ``backend`` for a validated call; raise ``ValueError`` if an explicit one cannot run it."""
    why_not_sdpa = sdpa_unsupported_reason(
        spec, return_weights=return_weights, return_lse=return_lse, generator=generator
    )
    if backend == "math":
        return BackendChoice("math", "requested: the reference implementation")
    why_not_tiled = tiled_unsupported_reason(spec)
    if backend == "tiled":
        if why_not_tiled is not None:
            raise ValueError(f"backend='tiled' cannot run this call: {why_not_tiled}; use 'auto' or 'math'")
        return BackendChoice("tiled", "requested: online softmax over key blocks, O(N) memory")
    if backend == "torch":
        if why_not_sdpa is not None:
            raise ValueError(f"backend='torch' cannot run this call: {why_not_sdpa}; use 'auto' or 'math'")
        return BackendChoice("torch", "requested: F.scaled_dot_product_attention")
    if why_not_sdpa is None and spec.dropout > 0:
        why_not_sdpa = "dropout: SDPA draws its own pattern, qkv's is reproducible across backends"
    if why_not_sdpa is None:
        why_not_sdpa = sdpa_dense_mask_reason(spec)
    if why_not_sdpa is None:
        return BackendChoice("torch", "SDPA's fused kernel covers every feature of this call")
    if spec.q_len * spec.kv_len <= TINY_SCORES:
        return BackendChoice("math", f"{why_not_sdpa}; the input is tiny (L·S <= {TINY_SCORES}), where the "
                             "reference path has the least overhead")
    if why_not_tiled is None:
        return BackendChoice("tiled", f"{why_not_sdpa}; tiled computes it exactly in O(N) memory")
    return BackendChoice("math", f"{why_not_sdpa}, and {why_not_tiled}; the reference path supports it")
