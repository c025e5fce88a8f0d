"""Alignment plots for translations: which source tokens each target token attended to.

Takes the cross-attention of one hypothesis, e.g. ``Hypothesis.cross_attention`` from
:mod:`qkv.models.hypothesis`: ``(layers, heads, T, S)``, where row ``t`` is the attention of the decoding
step that produced target token ``t`` (EOS included). Source tokens run along the x-axis, target tokens down
the y-axis. By default the last layer is shown, averaged over its heads, since the last layer's cross-attention
is the one usually read as an alignment; the title says which layer and heads are shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from qkv.viz.heatmap import check_ndim, plot_heatmap, to_numpy


def select(cross_attention: np.ndarray, layer: int | None, head: int | None) -> tuple[np.ndarray, str]:
    """The ``(T, S)`` matrix to show and a description of it, e.g. ``"layer 5 (last of 6), mean of 8 heads"``.

    ``cross_attention`` is ``(layers, heads, T, S)`` or already ``(T, S)``; ``layer`` defaults to the last one,
    ``head`` to the mean over heads; negative indices count from the end.
    """
    check_ndim(cross_attention, (2, 4), "(layers, heads, T, S) or one (T, S) matrix", "cross_attention")
    if cross_attention.ndim == 2:
        if layer is not None or head is not None:
            raise ValueError(
                f"cross_attention is one (T, S) matrix, shape {tuple(cross_attention.shape)}; layer and head "
                "apply only to (layers, heads, T, S)"
            )
        return cross_attention, "cross-attention"
    layers, heads = cross_attention.shape[:2]
    chosen = layers - 1 if layer is None else _index(layer, layers, "layer")
    which = f"layer {chosen} (last of {layers})" if chosen == layers - 1 else f"layer {chosen} of {layers}"
    per_head = cross_attention[chosen]
    if head is None:
        heads_shown = f"mean of {heads} heads" if heads > 1 else "its only head"
        return per_head.mean(axis=0), f"{which}, {heads_shown}"
    chosen_head = _index(head, heads, "head")
    return per_head[chosen_head], f"{which}, head {chosen_head} of {heads}"


def _index(value: int, count: int, name: str) -> int:
    if not -count <= value < count:
        raise ValueError(f"{name}={value} is out of range: cross_attention has {count} {name}s (0..{count - 1})")
    return value % count


def plot_alignment(
    cross_attention: object,
    src_tokens: Sequence[str] | None,
    tgt_tokens: Sequence[str] | None,
    *,
    layer: int | None = None,
    head: int | None = None,
    title: str | None = None,
    path: str | Path | None = None,
    ax: Axes | None = None,
    annotate: bool | None = None,
) -> Figure:
    """The cross-attention of one translation as a source × target alignment heatmap.

    Args:
        cross_attention: ``(layers, heads, T, S)`` cross-attention of the chosen hypothesis, or one ``(T, S)``.
        src_tokens: ``S`` source tokens, on the x-axis; ``None`` labels them by position.
        tgt_tokens: ``T`` target tokens, on the y-axis (EOS included when the attention has a row for it).
        layer: which layer; default the last.
        head: which head; default the mean over all heads of the layer.
        title: default ``"cross-attention, <which layer and heads>"``.
        path: save the figure there; ``.png``, ``.svg`` or ``.pdf``.
        ax: draw into this existing axes instead of a new figure.
        annotate: write the values in the cells (default: only for tiny matrices).
    Returns:
        the figure.
    Raises:
        ValueError: a shape other than 4-D or 2-D, ``layer``/``head`` out of range (or given with a 2-D
            matrix), or a token count that differs from ``S`` or ``T``.
    """
    matrix, which = select(to_numpy(cross_attention, "cross_attention"), layer, head)
    return plot_heatmap(
        matrix,
        _tokens(tgt_tokens, matrix.shape[0], "tgt_tokens", "T"),
        _tokens(src_tokens, matrix.shape[1], "src_tokens", "S"),
        title=title or (which if which == "cross-attention" else f"cross-attention, {which}"),
        path=path,
        ax=ax,
        annotate=annotate,
        xlabel="source",
        ylabel="target",
    )


def _tokens(tokens: Sequence[str] | None, count: int, name: str, axis: str) -> Sequence[str] | None:
    """Check the count here so the error names src/tgt rather than the heatmap's rows/columns."""
    if tokens is not None and not isinstance(tokens, str) and len(tokens) != count:
        raise ValueError(
            f"{name}: {len(tokens)} tokens given but cross_attention has {axis} = {count}; give one per position"
        )
    return tokens
