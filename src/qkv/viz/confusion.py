"""A classifier's confusion matrix as a picture: true classes down, predicted classes across, counts in the
cells, each row coloured by its share of the true class (so a rare class's mistakes show as clearly as a
common one's). Built on :class:`matplotlib.figure.Figure` with the Agg canvas, as :mod:`qkv.viz.heatmap`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qkv.viz.heatmap import _new_figure, save_figure

INCHES_PER_CLASS = 0.45
MIN_INCHES = 3.5
ANNOTATE_UP_TO = 30  # classes; beyond, the counts no longer fit their cells


def plot_confusion_matrix(
    confusion: np.ndarray, class_names: Sequence[str], *, title: str = "confusion matrix", path: str | Path
) -> Path:
    """Save ``confusion (K, K)`` (``[true, predicted]`` counts) with the ``K`` class names to ``path`` (.png,
    .svg or .pdf). Returns the path."""
    counts = np.asarray(confusion)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"confusion has shape {counts.shape}; expected ({k}, {k}) for {k} class names")
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    side = max(MIN_INCHES, 1.5 + INCHES_PER_CLASS * k)
    figure = _new_figure(side + 1.0, side)
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), list(class_names), rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), list(class_names))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if k <= ANNOTATE_UP_TO:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    color = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=color, fontsize=8)
    figure.colorbar(image, ax=ax, label="share of the true class")
    return save_figure(figure, path)
