"""Attention weights as heatmaps: one matrix, a grid of heads, the head average of each layer.

Rows are the attending tokens (queries), columns the attended-to tokens (keys): ``weights (L, S)``.
Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas, never through ``pyplot``, so
nothing is left in pyplot's global list of figures and no GUI backend is touched; a figure is freed as soon
as it is no longer referenced. ``path`` saves it as PNG, SVG or PDF, chosen by the file suffix.

Long token lists stay readable: the figure grows with the number of tokens (between ``MIN_INCHES`` and
``MAX_INCHES`` a side), column labels are rotated, and beyond ``MAX_LABELS`` tokens only every k-th label is
shown (``k = ceil(n / MAX_LABELS)``). Cells of tiny matrices (at most ``ANNOTATE_UP_TO`` tokens a side) show
their values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

# More labels than this on one axis overlap at any sensible size; show every k-th instead.
MAX_LABELS = 40
# Inches per token on each axis, and the bounds that keep a figure on a screen / page.
INCHES_PER_TOKEN = 0.22
MIN_INCHES = 2.5
MAX_INCHES = 24.0
# Room for the tick labels, title and colorbar, in inches.
MARGIN_INCHES = 1.6
# annotate=None writes the values into the cells when both sides have at most this many tokens.
ANNOTATE_UP_TO = 12
# Panels in a row of a grid of heads or layers.
GRID_COLUMNS = 4
SAVE_FORMATS = (".png", ".svg", ".pdf")
DEFAULT_CMAP = "viridis"


def to_numpy(weights: object, name: str = "weights") -> np.ndarray:
    """A tensor, array or nested list as a float64 numpy array of finite numbers."""
    detach = getattr(weights, "detach", None)
    if callable(detach):  # a torch tensor, possibly on a GPU or requiring grad
        weights = detach().to("cpu").double().numpy()
    try:
        array = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers (a tensor, array or nested lists); got {error}") from None
    if array.size and not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def check_ndim(array: np.ndarray, ndims: Sequence[int], shapes: str, name: str = "weights") -> None:
    """Raise a ValueError naming the given and expected shapes unless ``array.ndim`` is in ``ndims``.

    ``shapes`` describes what is expected, e.g. ``"(H, L, S)"``. One extra leading dimension is most likely
    a batch, so the message says how to pick one row.
    """
    if array.ndim in ndims:
        if 0 in array.shape:
            raise ValueError(f"{name} has shape {tuple(array.shape)}; expected {shapes} with no empty dimension")
        return
    hint = ""
    if array.ndim == max(ndims) + 1:
        hint = f"; the first dimension ({array.shape[0]}) looks like a batch: pick one row, e.g. {name}[0]"
    raise ValueError(f"{name} has shape {tuple(array.shape)} ({array.ndim}-D); expected {shapes}{hint}")


def check_tokens(tokens: Sequence[str] | None, count: int, what: str) -> list[str]:
    """``tokens`` as a list of ``count`` strings; ``None`` gives the positions ``0..count-1``.

    ``what`` names the tokens and the dimension they label, e.g. ``"col_tokens (the S axis of weights)"``.
    """
    if tokens is None:
        return [str(i) for i in range(count)]
    if isinstance(tokens, str):
        raise ValueError(f"{what} must be a list of strings, not one string {tokens[:40]!r}")
    tokens = list(tokens)
    if len(tokens) != count:
        raise ValueError(f"{what}: {len(tokens)} tokens given but the weights have {count}; give one per position")
    return [str(t) for t in tokens]


def label_step(count: int) -> int:
    """Show every ``label_step(count)``-th label: 1 up to ``MAX_LABELS`` tokens, then ``ceil(count / MAX_LABELS)``."""
    return max(1, math.ceil(count / MAX_LABELS))


def _heads(count: int) -> str:
    return f"{count} head" if count == 1 else f"{count} heads"


def _side_inches(count: int) -> float:
    return min(MAX_INCHES, max(MIN_INCHES, count * INCHES_PER_TOKEN + MARGIN_INCHES))


def _escape(token: str) -> str:
    # A token like "$5" would otherwise start matplotlib's math mode.
    return token.replace("$", r"\$")


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, *, dpi: float = 150) -> Path:
    """Save ``figure`` to ``path``; the suffix picks the format: ``.png``, ``.svg`` or ``.pdf``.

    ``dpi`` matters for PNG only (SVG and PDF are vector formats). Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_FORMATS:
        raise ValueError(f"cannot save a figure as {path.name!r}: the suffix must be one of {', '.join(SAVE_FORMATS)}")
    figure.savefig(path, format=suffix[1:], dpi=dpi)
    return path


def _draw(
    ax: Axes,
    weights: np.ndarray,
    row_tokens: list[str],
    col_tokens: list[str],
    *,
    title: str | None,
    annotate: bool | None,
    cmap: str,
    vmin: float,
    vmax: float,
    xlabel: str | None = None,
    ylabel: str | None = None,
    row_labels: bool = True,
    col_labels: bool = True,
) -> AxesImage:
    """Draw ``weights (L, S)`` on ``ax``; returns the image (for a colorbar)."""
    rows, cols = weights.shape
    image = ax.imshow(weights, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    for axis, count, tokens, show, rotation in (
        (ax.yaxis, rows, row_tokens, row_labels, 0),
        (ax.xaxis, cols, col_tokens, col_labels, 90),
    ):
        ticks = list(range(0, count, label_step(count)))
        axis.set_ticks(ticks)
        axis.set_ticklabels([_escape(tokens[i]) for i in ticks] if show else [], rotation=rotation)
        axis.set_tick_params(labelsize=8 if max(rows, cols) <= MAX_LABELS else 6, length=2)
    if title:
        # wrap: a long title (a model directory, a kind of attention) breaks into lines instead of running off
        # a narrow figure.
        ax.set_title(title, fontsize=10, wrap=True)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if annotate if annotate is not None else max(rows, cols) <= ANNOTATE_UP_TO:
        colors = image.to_rgba(weights)
        # Rec. 709 luma of each cell's color: white text on dark cells, black on light ones.
        luma = colors[..., :3] @ np.array([0.2126, 0.7152, 0.0722])
        fontsize = 8 if max(rows, cols) <= 6 else 6
        for i in range(rows):
            for j in range(cols):
                color = "white" if luma[i, j] < 0.5 else "black"
                ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=fontsize, color=color)
    return image


def _range(weights: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    low = 0.0 if vmin is None else vmin
    high = float(weights.max()) if vmax is None else vmax
    return low, (high if high > low else low + 1.0)


def plot_heatmap(
    weights: object,
    row_tokens: Sequence[str] | None,
    col_tokens: Sequence[str] | None,
    *,
    title: str | None = None,
    path: str | Path | None = None,
    ax: Axes | None = None,
    annotate: bool | None = None,
    cmap: str = DEFAULT_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """One attention matrix as a heatmap: row ``i`` = attending token, column ``j`` = attended-to token.

    Args:
        weights: ``(L, S)`` attention weights (tensor, array or nested lists).
        row_tokens: ``L`` labels for the rows (queries); ``None`` labels them ``0..L-1``.
        col_tokens: ``S`` labels for the columns (keys); ``None`` labels them ``0..S-1``.
        title: drawn above the matrix.
        path: save the figure there; ``.png``, ``.svg`` or ``.pdf``.
        ax: draw into this existing axes (and its figure) instead of a new figure; no colorbar is added.
        annotate: write each value in its cell; ``None`` does so when both sides have at most
            ``ANNOTATE_UP_TO`` tokens.
        cmap: a matplotlib colormap name.
        vmin, vmax: the color scale; default ``0`` and the largest weight.
        xlabel, ylabel: axis titles, e.g. ``"source"`` and ``"target"``.
    Returns:
        the figure drawn on; with ``ax``, its root figure (``ax.figure``, or the figure holding the subfigure
        ``ax`` is in).
    Raises:
        ValueError: ``weights`` is not 2-D, or a token list's length differs from its dimension.
    """
    array = to_numpy(weights)
    check_ndim(array, (2,), "(L, S): one row per attending token, one column per attended-to token")
    rows = check_tokens(row_tokens, array.shape[0], "row_tokens (the L axis, weights.shape[0])")
    cols = check_tokens(col_tokens, array.shape[1], "col_tokens (the S axis, weights.shape[1])")
    low, high = _range(array, vmin, vmax)
    if ax is None:
        figure = _new_figure(_side_inches(array.shape[1]) + 1.0, _side_inches(array.shape[0]))
        target = figure.add_subplot()
    else:
        # The root figure: a SubFigure has no savefig, so `path` could not be written from one.
        parent = ax.figure
        figure, target = (parent if isinstance(parent, Figure) else parent.figure), ax
    image = _draw(
        target,
        array,
        rows,
        cols,
        title=title,
        annotate=annotate,
        cmap=cmap,
        vmin=low,
        vmax=high,
        xlabel=xlabel,
        ylabel=ylabel,
    )
    if ax is None:
        figure.colorbar(image, ax=target, shrink=0.8, label="attention weight")
    if path is not None:
        save_figure(figure, path)
    return figure


def _grid(
    panels: np.ndarray,
    names: list[str],
    row_tokens: list[str],
    col_tokens: list[str],
    *,
    title: str | None,
    path: str | Path | None,
    annotate: bool | None,
    cmap: str,
    vmin: float | None,
    vmax: float | None,
) -> Figure:
    """Panels ``(N, L, S)`` in a grid on one color scale; labels on the left column and bottom row only."""
    count, rows, cols = panels.shape
    columns = min(count, GRID_COLUMNS)
    grid_rows = math.ceil(count / columns)
    # Panels are smaller than a single heatmap (half the inches per token, capped) so a grid stays printable.
    panel_w = min(MAX_INCHES / 3, max(MIN_INCHES, cols * INCHES_PER_TOKEN / 2 + 1.0))
    panel_h = min(MAX_INCHES / 3, max(MIN_INCHES, rows * INCHES_PER_TOKEN / 2 + 1.0))
    figure = _new_figure(min(2 * MAX_INCHES, columns * panel_w + 1.0), min(2 * MAX_INCHES, grid_rows * panel_h + 0.6))
    low, high = _range(panels, vmin, vmax)
    axes = figure.subplots(grid_rows, columns, squeeze=False)
    images = [
        _draw(
            ax,
            panels[n],
            row_tokens,
            col_tokens,
            title=names[n],
            annotate=annotate,
            cmap=cmap,
            vmin=low,
            vmax=high,
            row_labels=n % columns == 0,
            col_labels=n + columns >= count,
        )
        for n, ax in enumerate(axes.flat[:count])
    ]
    for ax in axes.flat[count:]:
        ax.set_axis_off()
    figure.colorbar(images[-1], ax=axes, shrink=0.6, label="attention weight")
    if title:
        figure.suptitle(title, wrap=True)
    if path is not None:
        save_figure(figure, path)
    return figure


def plot_heads(
    weights: object,
    row_tokens: Sequence[str] | None,
    col_tokens: Sequence[str] | None,
    *,
    title: str | None = None,
    path: str | Path | None = None,
    annotate: bool | None = None,
    cmap: str = DEFAULT_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """Every head of one layer, a grid of heatmaps titled ``head 0``, ``head 1``…, on one color scale.

    Args:
        weights: ``(H, L, S)`` one layer's attention.
        row_tokens, col_tokens, title, path, annotate, cmap, vmin, vmax: as in :func:`plot_heatmap`.
    Raises:
        ValueError: ``weights`` is not 3-D, or a token list's length differs from its dimension.
    """
    array = to_numpy(weights)
    check_ndim(array, (3,), "(H, L, S): one L×S matrix per head")
    rows = check_tokens(row_tokens, array.shape[1], "row_tokens (the L axis, weights.shape[1])")
    cols = check_tokens(col_tokens, array.shape[2], "col_tokens (the S axis, weights.shape[2])")
    names = [f"head {h}" for h in range(array.shape[0])]
    return _grid(array, names, rows, cols, title=title, path=path, annotate=annotate, cmap=cmap, vmin=vmin, vmax=vmax)


def plot_layer_average(
    weights: object,
    row_tokens: Sequence[str] | None,
    col_tokens: Sequence[str] | None,
    *,
    title: str | None = None,
    path: str | Path | None = None,
    annotate: bool | None = None,
    cmap: str = DEFAULT_CMAP,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """The mean over heads: one heatmap for ``(H, L, S)``, one panel per layer for ``(layers, H, L, S)``.

    Args:
        weights: ``(layers, H, L, S)`` or one layer's ``(H, L, S)``.
        row_tokens, col_tokens, title, path, annotate, cmap, vmin, vmax: as in :func:`plot_heatmap`.
    Raises:
        ValueError: ``weights`` is not 3-D or 4-D, or a token list's length differs from its dimension.
    """
    array = to_numpy(weights)
    check_ndim(array, (3, 4), "(layers, H, L, S) or one layer's (H, L, S)")
    rows = check_tokens(row_tokens, array.shape[-2], "row_tokens (the L axis, weights.shape[-2])")
    cols = check_tokens(col_tokens, array.shape[-1], "col_tokens (the S axis, weights.shape[-1])")
    heads = array.shape[-3]
    mean = array.mean(axis=-3)
    if array.ndim == 3:
        return plot_heatmap(
            mean,
            rows,
            cols,
            title=title or f"mean of {_heads(heads)}",
            path=path,
            annotate=annotate,
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
        )
    names = [f"layer {n}, mean of {_heads(heads)}" for n in range(array.shape[0])]
    return _grid(mean, names, rows, cols, title=title, path=path, annotate=annotate, cmap=cmap, vmin=vmin, vmax=vmax)
