"""Which backend computes a call, and why.

Policy of ``backend="auto"`` (a measured choice, revisited as backends are added):

1. ``torch`` (PyTorch's fused SDPA kernels) when SDPA computes the call exactly as qkv defines it;
2. ``math`` otherwise: the reference, which supports every feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkv.ops.sdpa import sdpa_unsupported_reason
from qkv.ops.spec import AttentionSpec


def tiled_unsupported_reason(spec: AttentionSpec) -> str | None:
    """Why the tiled backend cannot compute this call, or ``None`` if it can."""
    if spec.mask is not None and spec.mask.requires_grad:
        return "the float mask requires grad and the tiled backward computes no mask gradient"
    if spec.alibi_slopes is not None and spec.alibi_slopes.requires_grad:
        return "alibi_slopes requires grad and the tiled backward computes no slope gradient"
    return None

BACKENDS = ("auto", "math", "torch", "tiled")


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
    if why_not_sdpa is None:
        return BackendChoice("torch", "SDPA covers every feature of this call")
    return BackendChoice("math", f"{why_not_sdpa}; the reference path supports every feature")
