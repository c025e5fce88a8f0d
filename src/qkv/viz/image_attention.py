"""What a Vision Transformer looks at in an image: attention over patches, upsampled onto the pixels.

A ViT's self-attention ``(layers, heads, N, N)`` runs over ``N = 1 + h·w`` tokens (a class token, then the
``h x w`` patches in row-major order) or ``N = h·w`` without a class token (mean pooling). Two pictures of
it, each an ``(h, w)`` map over the patches:

- :func:`class_token_attention`: how the class token spreads its attention over the patches in one layer,
  per head (row 0 of each head's matrix, the class token's own column dropped). Without a class token the
  model classifies the mean of the patch tokens, so the map is the mean of the patches' rows instead.
- :func:`rollout_map`: the attention rollout (:mod:`qkv.viz.rollout`) through every layer, the class token's
  row (the mean of the patch rows without one): how much each input patch contributes to what is classified.

:func:`plot_image_attention` overlays them on the image, each patch's value covering its ``P x P`` pixels
(nearest upsampling: a patch is one token, its pixels share its weight).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qkv.viz.heatmap import GRID_COLUMNS, _new_figure, save_figure
from qkv.viz.rollout import attention_rollout

CLS_LABEL = "[CLS]"
PANEL_INCHES = 2.2
OVERLAY_ALPHA = 0.6
OVERLAY_CMAP = "inferno"


def patch_labels(grid: tuple[int, int], *, class_token: bool) -> list[str]:
    """Token labels ``["[CLS]", "p(0,0)", "p(0,1)", ...]``: ``p(row,column)`` of each patch, row-major."""
    patches = [f"p({r},{c})" for r in range(grid[0]) for c in range(grid[1])]
    return [CLS_LABEL, *patches] if class_token else patches


def _check(weights: np.ndarray, grid: tuple[int, int], class_token: bool) -> int:
    """The number of tokens before the patches (1 or 0), after checking the shape against the grid."""
    extra = 1 if class_token else 0
    n = extra + grid[0] * grid[1]
    if weights.ndim != 4 or weights.shape[-2:] != (n, n):
        raise ValueError(
            f"weights have shape {tuple(weights.shape)}; expected (layers, heads, {n}, {n}) for a {grid[0]}x{grid[1]} "
            f"grid of patches{' and a class token' if class_token else ''}"
        )
    return extra


def class_token_attention(
    weights: np.ndarray, grid: tuple[int, int], *, class_token: bool, layer: int = -1
) -> np.ndarray:
    """The class token's attention over the patches in ``layer``, per head.

    Args:
        weights: ``(layers, heads, N, N)`` one image's attention.
        grid: ``(h, w)`` patches per column and per row.
        class_token: position 0 is a class token (otherwise the patches' mean row is used).
        layer: the layer (negative counts from the top).
    Returns:
        ``(heads, h, w)``.
    """
    extra = _check(weights, grid, class_token)
    matrices = weights[layer]  # (heads, N, N)
    rows = matrices[:, 0, extra:] if class_token else matrices.mean(axis=1)
    return np.asarray(rows).reshape(-1, *grid)


def rollout_map(weights: np.ndarray, grid: tuple[int, int], *, class_token: bool) -> np.ndarray:
    """The attention rollout of every layer (heads averaged, residual included) as ``(h, w)``: the class
    token's row over the patches (with a class token), else the mean row of the patches."""
    extra = _check(weights, grid, class_token)
    rollout = attention_rollout(torch.as_tensor(weights, dtype=torch.float64)).numpy()  # (N, N)
    row = rollout[0, extra:] if class_token else rollout.mean(axis=0)
    return np.asarray(row).reshape(grid)


def upsample(patch_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w)`` → ``(H, W)``: each patch's value over its ``H/h x W/w`` pixels (``H``, ``W`` multiples)."""
    h, w = patch_map.shape
    if size[0] % h or size[1] % w:
        raise ValueError(f"cannot spread a {h}x{w} map over {size[0]}x{size[1]} pixels; expected multiples")
    return np.kron(patch_map, np.ones((size[0] // h, size[1] // w)))


def _picture(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``(C, H, W)`` in ``[0, 1]`` → what ``imshow`` takes, and its colormap (grey for one channel)."""
    image = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if image.shape[0] == 1:
        return image[0], "gray"
    return image[:3].transpose(1, 2, 0), None


def plot_image_attention(
    image: np.ndarray,
    head_maps: np.ndarray,
    rollout: np.ndarray,
    *,
    path: str | Path,
    title: str = "",
    head_title: str = "head",
    heads: list[int] | None = None,
) -> Path:
    """The image, the rollout overlaid on it, and one overlay per head, in a grid; saved to ``path``.

    Args:
        image: ``(C, H, W)`` pixel values in ``[0, 1]`` (1 channel: grey; 3: RGB).
        head_maps: ``(heads, h, w)`` (:func:`class_token_attention`).
        rollout: ``(h, w)`` (:func:`rollout_map`).
        path: ``.png``, ``.svg`` or ``.pdf``.
        title: the figure's title.
        head_title: the panels' title before each head number, e.g. ``"layer 3, head"``.
        heads: the head numbers of ``head_maps``' rows (default ``0..heads-1``).
    Returns:
        the path.
    """
    picture, cmap = _picture(image)
    size = (int(image.shape[-2]), int(image.shape[-1]))
    numbers = list(range(len(head_maps))) if heads is None else heads
    panels = [("image", None), ("rollout (all layers)", rollout)]
    panels += [(f"{head_title} {h}", m) for h, m in zip(numbers, head_maps, strict=True)]
    columns = min(GRID_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    figure = _new_figure(PANEL_INCHES * columns, PANEL_INCHES * rows + 0.4)
    for index, (name, patch_map) in enumerate(panels):
        ax = figure.add_subplot(rows, columns, index + 1)
        ax.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0)
        if patch_map is not None:
            values = upsample(np.asarray(patch_map, dtype=np.float64), size)
            ax.imshow(values, cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=max(float(values.max()), 1e-12))
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)
