"""qkv as an attention implementation of Hugging Face ``transformers``: ``attn_implementation="qkv"``.

Example::

    from transformers import AutoModel
    from qkv.integrations.transformers_attention import register

    register()  # once per process, before loading
    model = AutoModel.from_pretrained(path, attn_implementation="qkv")
    out = model(**batch, output_attentions=True)  # out.attentions computed by qkv's tiled backend

Every attention call of the model then goes through :func:`qkv.attention` with the ``"tiled"`` backend by
default: exact, with O(L) working memory per query block instead of the O(L·S) score matrix, and the weights
``(B, H, L, S)`` returned only when the caller asks for ``output_attentions``.

:func:`register` adds two entries under one name: the attention function (``AttentionInterface``) and
transformers' SDPA mask builder (``AttentionMaskInterface``), so models hand the function a boolean mask
``(B, 1, L, S)``, ``True`` = may attend (qkv's and SDPA's convention), or ``None`` when nothing is masked.
Without the mask entry transformers 5 treats an unknown implementation as one that builds no mask and drops
the padding mask silently.

Needs ``transformers >= MIN_TRANSFORMERS`` (``pip install 'qkv[hf]'``): the first release checked to route
BERT's attention through ``AttentionInterface`` and to build masks through ``AttentionMaskInterface``.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable
from typing import Any

import torch

from qkv.ops.attention import attention
from qkv.ops.dispatch import check_backend

NAME = "qkv"
DEFAULT_BACKEND = "tiled"
MIN_TRANSFORMERS = (5, 0)
INSTALL_HINT = "pip install 'qkv[hf]'"


def qkv_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    backend: str = DEFAULT_BACKEND,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function transformers calls, computed by :func:`qkv.attention`.

    Args:
        module: the calling attention module (its ``is_causal`` is read when no mask is given).
        query: ``(B, H, L, D)``.
        key, value: ``(B, Hkv, S, D)``; ``H`` a multiple of ``Hkv`` is grouped-query attention (the module's
            ``num_key_value_groups = H / Hkv``): qkv maps query head ``h`` to key/value head
            ``h // (H // Hkv)``, as transformers' ``repeat_kv`` does, without copying.
        attention_mask: ``None``; boolean ``(B, 1, L, S')``, ``True`` = may attend; additive float
            ``(B, 1, L, S')``, ``0`` or a large negative number (eager masks); or ``(B, S)`` ``1`` = real token.
            A 4-D mask longer than ``S`` (static caches) is cut to ``S``.
        scaling: the score multiplier; ``None`` = ``1/sqrt(D)``.
        dropout: the attention dropout probability (transformers passes ``0.0`` in eval mode).
        backend: the :func:`qkv.attention` backend.
        **kwargs: ``output_attentions`` (return the weights), ``is_causal`` (overrides ``module.is_causal``),
            ``softcap``; others (e.g. ``position_ids``, ``sliding_window``, which the mask already holds) are
            ignored. Attention sinks (``s_aux``) are not supported.

    Returns:
        ``(attn_output (B, L, H, D), attn_weights (B, H, L, S) or None)``, the layout transformers expects.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("qkv's transformers attention does not support attention sinks (s_aux)")
    mask = _qkv_mask(attention_mask, query, key)
    # As transformers' SDPA integration: without a mask, a causal module relies on is_causal.
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = "top_left" if (mask is None and is_causal and query.shape[2] > 1) else False
    need_weights = bool(kwargs.get("output_attentions", False))
    result = attention(
        query,
        key,
        value,
        mask=mask,
        causal=causal,
        scale=scaling,
        softcap=kwargs.get("softcap"),
        dropout=dropout,
        return_weights=need_weights,
        backend=backend,
    )
    # A tuple exactly when need_weights: (out, weights).
    out, weights = result if isinstance(result, tuple) else (result, None)
    return out.transpose(1, 2).contiguous(), weights


def _qkv_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """transformers' mask as one :func:`qkv.attention` takes: bool ``True`` = may attend, or additive float."""
    if attention_mask is None:
        return None
    if attention_mask.ndim == 2:  # (B, S) padding mask, 1 = real token
        return (attention_mask != 0)[:, None, None, :].to(query.device)
    if attention_mask.ndim != 4:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, S) or (B, 1 or H, L, S)"
        )
    attention_mask = attention_mask[..., : key.shape[-2]]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask.to(query.dtype if query.dtype.is_floating_point else torch.float32)


def register(name: str = NAME, *, backend: str = DEFAULT_BACKEND) -> str:
    """Make ``attn_implementation=name`` run attention through :func:`qkv.attention` with ``backend``.

    Registers the attention function and the matching mask builder (boolean masks) under ``name``, for all
    models of this process. Calling it again replaces the entry. Returns ``name``.

    Raises:
        ModuleNotFoundError: transformers is not installed.
        ImportError: transformers is older than ``MIN_TRANSFORMERS``.
    """
    check_backend(backend)
    _check_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, _bind_backend(backend))
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def _bind_backend(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    def qkv_attention(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return qkv_attention_forward(*args, backend=backend, **kwargs)

    return qkv_attention


def _check_transformers() -> None:
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(f"transformers is not installed: {INSTALL_HINT}") from None
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or (int(match[1]), int(match[2])) < MIN_TRANSFORMERS:
        wanted = ".".join(map(str, MIN_TRANSFORMERS))
        raise ImportError(f"qkv's attention for transformers needs transformers >= {wanted}; found {version}")
