"""Export attention in the format of bertviz (https://github.com/jessevig/bertviz) ``head_view`` and
``model_view``, without importing bertviz.

bertviz takes what a Hugging Face model returns with ``output_attentions=True``: a list with one tensor per
layer, each ``(batch=1, heads, L, L)``, and the ``L`` tokens as strings::

    from bertviz import head_view

    attention, tokens = to_bertviz(attentions, tokens)  # attentions: (layers, H, L, L)
    head_view(attention, tokens)

For a notebook where qkv is not installed, :func:`save_bertviz_json` writes the same data as JSON; read it
back with :func:`load_bertviz_json`, or by hand::

    data = json.load(open("attention.json"))
    head_view([torch.tensor(a) for a in data["attention"]], data["tokens"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

FORMAT = "bertviz-head-view"


def to_bertviz(attentions: object, tokens: Sequence[str]) -> tuple[list[torch.Tensor], list[str]]:
    """``(layers, H, L, L)`` attention as bertviz's ``head_view(attention, tokens)`` arguments.

    Args:
        attentions: ``(layers, H, L, L)`` self-attention of one sequence, or ``(1, layers, H, L, L)``. A
            ``(layers, H, T, S)`` cross-attention converts the same way, for ``head_view``'s
            ``cross_attention`` argument; ``tokens`` are then the ``T`` decoder tokens.
        tokens: ``L`` tokens, one per row of each matrix.
    Returns:
        ``(attention, tokens)``: a list over layers of CPU tensors ``(1, H, L, S)`` (dtype of a floating-point
        input tensor, else float32), and the tokens as a list of strings.
    Raises:
        ValueError: a shape other than 4-D (or 5-D with a batch of 1), or ``len(tokens) != L``.
    """
    tensor = _as_tensor(attentions)
    if tensor.dim() == 5:
        if tensor.shape[0] != 1:
            raise ValueError(
                f"attentions has shape {tuple(tensor.shape)}: a batch of {tensor.shape[0]}; bertviz shows one "
                "sequence, pick it first, e.g. attentions[0]"
            )
        tensor = tensor[0]
    if tensor.dim() != 4 or 0 in tensor.shape:
        raise ValueError(f"attentions has shape {tuple(tensor.shape)}; expected (layers, H, L, L)")
    if isinstance(tokens, str):
        raise ValueError(f"tokens must be a list of strings, not one string {tokens[:40]!r}")
    tokens = [str(t) for t in tokens]
    if len(tokens) != tensor.shape[-2]:
        raise ValueError(
            f"{len(tokens)} tokens given but attentions has L = {tensor.shape[-2]} (shape {tuple(tensor.shape)}); "
            "give one token per position"
        )
    return [layer.unsqueeze(0).contiguous() for layer in tensor.unbind(0)], tokens


def _as_tensor(attentions: object) -> torch.Tensor:
    if isinstance(attentions, torch.Tensor):
        tensor = attentions.detach().cpu()
        return tensor if tensor.is_floating_point() else tensor.float()
    try:
        return torch.as_tensor(attentions, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"attentions must be numbers (a tensor, array or nested lists); got {error}") from None


def save_bertviz_json(path: str | Path, attentions: object, tokens: Sequence[str]) -> Path:
    """Write :func:`to_bertviz`'s output as JSON: ``{"format", "tokens", "attention"}``.

    ``attention`` is a list over layers of nested lists ``(1, H, L, L)``, so
    ``[torch.tensor(a) for a in data["attention"]]`` is what bertviz's ``head_view`` takes. Returns the path.
    """
    layers, names = to_bertviz(attentions, tokens)
    path = Path(path)
    data = {"format": FORMAT, "tokens": names, "attention": [layer.tolist() for layer in layers]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def load_bertviz_json(path: str | Path) -> tuple[list[torch.Tensor], list[str]]:
    """Read a file written by :func:`save_bertviz_json`: ``(attention, tokens)`` ready for ``head_view``."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a qkv bertviz export (expected a JSON object with format {FORMAT!r})")
    return [torch.tensor(layer, dtype=torch.float32) for layer in data["attention"]], list(data["tokens"])
