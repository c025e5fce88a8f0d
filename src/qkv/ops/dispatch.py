"""Which backend computes a call, and why.

Policy of ``backend="auto"`` (measured with ``qkv bench``; figures in the README):

1. ``torch``, PyTorch's fused SDPA kernel, when SDPA computes the call exactly as qkv defines it without
   a dense ``L×S`` mask built for it and without dropout (qkv's dropout pattern is its own, reproducible
   and equal across qkv's backends);
2. ``tiled`` (online softmax, O(N) memory) for everything else: weights or log-sum-exp requested,
   soft-capping, dropout, ALiBi, sliding windows, bottom-right causal with ``L != S``;
3. ``math`` for tiny inputs (``L·S <= 1024``), where its single pass costs least, and where tiled
   cannot run: a float mask or ALiBi slopes that require grad;
4. ``math`` whenever the weights or the log-sum-exp are asked for while q, k or v require grad (and
   rule 1 failed): only the reference path differentiates them, and running the output on an O(N)
   path beside it would save nothing, since the differentiable weights are ``L×S`` anyway.

Rule 4 holds for an explicit ``backend="tiled"`` or ``"triton"`` too: the call runs on ``math`` (after
checking that the requested backend could run it), and the returned choice says why.

On CUDA, one rule comes between 1 and 2: a call that SDPA does not cover without a dense mask (rule 1
failed) runs on ``triton``, the fused Triton kernels, whenever they cover it (Triton installed, a GPU of
compute capability 8.0+, float16/bfloat16/float32, head dims up to 256, no dropout, no mask or slopes
that require grad; see :func:`qkv.ops.triton_backend.triton_unsupported_reason`), tiny inputs included.
``triton`` is never chosen on CPU, where it runs only in Triton's interpreter (for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qkv.ops.sdpa import sdpa_dense_mask_reason, sdpa_unsupported_reason
from qkv.ops.spec import AttentionSpec
from qkv.ops.triton_backend import triton_unsupported_reason


def tiled_unsupported_reason(spec: AttentionSpec) -> str | None:
    """Why the tiled backend cannot compute this call, or ``None`` if it can."""
    if spec.mask is not None and spec.mask.requires_grad:
        return "the float mask requires grad and the tiled backward computes no mask gradient"
    if spec.alibi_slopes is not None and spec.alibi_slopes.requires_grad:
        return "alibi_slopes requires grad and the tiled backward computes no slope gradient"
    return None


def _triton_reason(spec: AttentionSpec, device: torch.device | None, dtype: torch.dtype | None) -> str | None:
    if device is None or dtype is None:
        return "the inputs' device and dtype were not given to the dispatcher"
    return triton_unsupported_reason(spec, device, dtype)


_EXTRAS_GRAPH = (
    "the weights/lse are asked for while q, k or v require grad, and only the reference path differentiates "
    "them (they are L×S anyway)"
)

BACKENDS = ("auto", "math", "torch", "tiled", "triton")
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
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    inputs_require_grad: bool = False,
) -> BackendChoice:
    """Resolve ``backend`` for a validated call; raise ``ValueError`` if an explicit one cannot run it.

    ``device`` and ``dtype`` are the inputs'; without them the ``triton`` backend is not considered.
    ``inputs_require_grad``: q, k or v require grad (only ``math`` differentiates weights and lse).
    """
    why_not_sdpa = sdpa_unsupported_reason(
        spec, return_weights=return_weights, return_lse=return_lse, generator=generator
    )
    if backend == "math":
        return BackendChoice("math", "requested: the reference implementation")
    why_not_tiled = tiled_unsupported_reason(spec)
    needs_graph_through_extras = (return_weights or return_lse) and inputs_require_grad
    if backend == "tiled":
        if why_not_tiled is not None:
            raise ValueError(f"backend='tiled' cannot run this call: {why_not_tiled}; use 'auto' or 'math'")
        if needs_graph_through_extras:
            return BackendChoice("math", f"tiled was requested, but {_EXTRAS_GRAPH}")
        return BackendChoice("tiled", "requested: online softmax over key blocks, O(N) memory")
    if backend == "triton":
        why_not_triton = _triton_reason(spec, device, dtype)
        if why_not_triton is not None:
            raise ValueError(f"backend='triton' cannot run this call: {why_not_triton}; use 'auto', 'tiled' or 'math'")
        if needs_graph_through_extras:
            return BackendChoice("math", f"triton was requested, but {_EXTRAS_GRAPH}")
        return BackendChoice("triton", "requested: fused Triton kernels, O(N) memory")
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
    if needs_graph_through_extras:
        return BackendChoice(
            "math",
            f"{why_not_sdpa}; {_EXTRAS_GRAPH}",
        )
    if device is not None and device.type == "cuda" and _triton_reason(spec, device, dtype) is None:
        return BackendChoice(
            "triton", f"{why_not_sdpa}; the fused Triton kernels compute it exactly on the GPU in O(N) memory"
        )
    if spec.q_len * spec.kv_len <= TINY_SCORES or spec.is_empty:
        return BackendChoice(
            "math",
            f"{why_not_sdpa}; the input is tiny (L·S <= {TINY_SCORES}), where the "
            "reference path has the least overhead",
        )
    if why_not_tiled is None:
        return BackendChoice("tiled", f"{why_not_sdpa}; tiled computes it exactly in O(N) memory")
    return BackendChoice("math", f"{why_not_sdpa}, and {why_not_tiled}; the reference path supports it")
