"""Where each word of a prompt acts in a generated image: per-word cross-attention maps, DAAM-style.

A text-to-image model's patches attend to the prompt's words: ``(layers, heads, N, S)`` weights (already
averaged over the sampling steps), each patch's row summing to 1 over the ``S`` words. As DAAM does for
Stable Diffusion (Tang et al., 2023), a word's map aggregates its column over heads and layers (here the
mean), giving an ``(h, w)`` map over the patch grid; it is upsampled to the image's pixels (bilinear) and
overlaid on the image::

    maps = word_maps(cross_attention, grid)  # (S, h, w); layer_word_maps: (layers, S, h, w)
    pixels = upsample_maps(maps, (32, 32))  # (S, 32, 32)
    pointing_hit(pixels[i], mask)  # the pointing game: does word i's maximum fall inside the object?
    plot_word_maps(image, maps, words, path="maps.png")  # the image, then one overlay per word
    save_word_maps_html("maps.html", image, layer_maps, words)  # hover a word to see its map

Each overlay is scaled by its own maximum (a word's map says where, not how much: a word's total weight
depends on how many other words share the patches). :func:`save_word_maps_html` writes one self-contained
page (inline script, no network, the same Content-Security-Policy as :mod:`qkv.viz.html_view`), with the maps
of every layer as well as their mean.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template

import numpy as np
import torch
import torch.nn.functional as F

from qkv.viz.heatmap import _new_figure, save_figure
from qkv.viz.image_attention import OVERLAY_ALPHA, OVERLAY_CMAP, _picture

PANEL_INCHES = 1.6
DECIMALS = 4


def layer_word_maps(cross_attention: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(layers, heads, N, S)`` cross-attention of one image → ``(layers, S, h, w)``: each layer's head mean of
    each word's column, laid on the ``(h, w)`` patch grid (row-major)."""
    weights = torch.as_tensor(cross_attention, dtype=torch.float64)
    if weights.ndim != 4 or weights.shape[2] != grid[0] * grid[1]:
        raise ValueError(
            f"cross_attention has shape {tuple(weights.shape)}; expected (layers, heads, N, S) with N = "
            f"{grid[0]}x{grid[1]} = {grid[0] * grid[1]} patches"
        )
    per_layer = weights.mean(dim=1)  # (layers, N, S)
    return per_layer.transpose(1, 2).reshape(weights.shape[0], -1, *grid).numpy()


def word_maps(cross_attention: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``(layers, heads, N, S)`` cross-attention of one image → ``(S, h, w)`` per-word maps: the mean over
    layers and heads of each word's column, laid on the ``(h, w)`` patch grid."""
    return layer_word_maps(cross_attention, grid).mean(axis=0)


def upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(S, h, w)`` → ``(S, H, W)`` by bilinear interpolation (``align_corners=False``: each patch's value sits
    at its centre)."""
    tensor = torch.as_tensor(np.asarray(maps, dtype=np.float64))[None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0].numpy()


def pointing_hit(pixel_map: np.ndarray, mask: np.ndarray) -> bool:
    """The pointing game: whether the maximum of ``pixel_map (H, W)`` lies inside ``mask (H, W)`` (bool)."""
    if pixel_map.shape != mask.shape:
        raise ValueError(f"pixel_map has shape {pixel_map.shape} but mask {mask.shape}; they must be equal")
    row, col = np.unravel_index(int(np.argmax(pixel_map)), pixel_map.shape)
    return bool(mask[row, col])


def _normalized(pixel_map: np.ndarray) -> np.ndarray:
    return pixel_map / max(float(pixel_map.max()), 1e-12)


@dataclass
class WordMapRow:
    """One prompt of a grid: ``image (C, H, W)`` in ``[0, 1]``, ``maps (S, h, w)``, the ``S`` words, a label."""

    image: np.ndarray
    maps: np.ndarray
    words: list[str]
    label: str


def plot_word_map_grid(rows: Sequence[WordMapRow], *, path: str | Path, title: str = "") -> Path:
    """One row per prompt: its image, then each word's map overlaid on it; saved to ``path``."""
    if not rows:
        raise ValueError("rows is empty; give at least one prompt to draw")
    columns = 1 + max(len(r.words) for r in rows)
    figure = _new_figure(PANEL_INCHES * columns, PANEL_INCHES * len(rows) + (0.4 if title else 0.0))
    for r, row in enumerate(rows):
        if len(row.words) != row.maps.shape[0]:
            raise ValueError(f"row {r}: {len(row.words)} words but {row.maps.shape[0]} maps; give one map per word")
        picture, cmap = _picture(row.image)
        size = (int(row.image.shape[-2]), int(row.image.shape[-1]))
        pixels = upsample_maps(row.maps, size)
        for c in range(1 + len(row.words)):
            ax = figure.add_subplot(len(rows), columns, r * columns + c + 1)
            ax.imshow(picture, cmap=cmap, vmin=0.0, vmax=1.0)
            if c == 0:
                ax.set_title(row.label, fontsize=7, wrap=True)
            else:
                ax.imshow(_normalized(pixels[c - 1]), cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0)
                ax.set_title(row.words[c - 1], fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)


def plot_word_maps(
    image: np.ndarray, maps: np.ndarray, words: Sequence[str], *, path: str | Path, title: str = ""
) -> Path:
    """The image and one overlay per word (``maps (S, h, w)``), in one row; saved to ``path``."""
    return plot_word_map_grid([WordMapRow(image, maps, list(words), "generated")], path=path, title=title)


_PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<meta name="generator" content="qkv.viz.word_maps"><title>$title</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
canvas{width:384px;height:384px;image-rendering:pixelated;border:1px solid #ccc}
#words button{font:inherit;margin:0 .2em .4em 0;padding:.2em .6em;border:1px solid #999;background:#fff;cursor:pointer}
#words button.on{background:#222;color:#fff}
</style></head><body data-status="loading">
<h1>$title</h1>
<p>Hover or click a word: its cross-attention over the image (mean over heads, and over the layers or one layer;
averaged over the sampling steps), scaled to its own maximum.</p>
<div id="words"></div>
<p><label>Layers <select id="layer"></select></label></p>
<canvas id="view"></canvas>
<script>
const data = $data;
const canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
const [H, W] = data.size, [gh, gw] = data.grid;
canvas.width = W; canvas.height = H;
let word = null, pinned = null, layer = "mean";
const select = document.getElementById("layer");
["mean", ...data.layers.map((_, i) => String(i))].forEach(v => {
  const o = document.createElement("option"); o.value = v; o.textContent = v === "mean" ? "all (mean)" : "layer " + v;
  select.appendChild(o);
});
select.onchange = () => { layer = select.value; draw(); };
function heat(v) { return [255 * Math.min(1, 1.5 * v), 255 * Math.max(0, 1.5 * v - 0.5), 40 * (1 - v)]; }
function draw() {
  const img = ctx.createImageData(W, H);
  const maps = layer === "mean" ? data.mean : data.layers[Number(layer)];
  const m = word === null ? null : maps[word];
  const peak = m === null ? 1 : Math.max(1e-12, ...m.flat());
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    const p = data.image[y][x], i = 4 * (y * W + x);
    let rgb = p;
    if (m !== null) {
      const v = m[Math.min(gh - 1, Math.floor(y * gh / H))][Math.min(gw - 1, Math.floor(x * gw / W))] / peak;
      const h = heat(v); rgb = p.map((c, k) => 0.4 * c + 0.6 * h[k]);
    }
    img.data.set([rgb[0], rgb[1], rgb[2], 255], i);
  }
  ctx.putImageData(img, 0, 0);
  document.querySelectorAll("#words button").forEach((b, i) => b.classList.toggle("on", i === word));
}
data.words.forEach((w, i) => {
  const b = document.createElement("button"); b.textContent = w;
  b.onmouseenter = () => { word = i; draw(); };
  b.onmouseleave = () => { word = pinned; draw(); };
  b.onclick = () => { pinned = pinned === i ? null : i; word = pinned; draw(); };
  document.getElementById("words").appendChild(b);
});
draw();
document.body.dataset.status = "ready";
</script></body></html>
""")


def word_maps_page(image: np.ndarray, layer_maps: np.ndarray, words: Sequence[str], *, title: str) -> str:
    """The self-contained HTML page of :func:`save_word_maps_html`."""
    layer_maps = np.asarray(layer_maps, dtype=np.float64)
    if layer_maps.ndim != 4 or layer_maps.shape[1] != len(words):
        raise ValueError(
            f"layer_maps has shape {layer_maps.shape}; expected (layers, S, h, w) with S = {len(words)} words"
        )
    pixels = (np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255).round().astype(int)
    pixels = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels[:3]
    data = {
        "words": list(words),
        "size": list(pixels.shape[1:]),
        "grid": list(layer_maps.shape[2:]),
        "image": pixels.transpose(1, 2, 0).tolist(),
        "mean": np.round(layer_maps.mean(axis=0), DECIMALS).tolist(),
        "layers": np.round(layer_maps, DECIMALS).tolist(),
    }
    text = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
    return _PAGE.substitute(title=html.escape(title), data=text.replace("&", "\\u0026"))


def save_word_maps_html(
    path: str | Path, image: np.ndarray, layer_maps: np.ndarray, words: Sequence[str], *, title: str = "Word maps"
) -> Path:
    """Write the interactive page: ``image (C, H, W)`` in ``[0, 1]`` and ``layer_maps (layers, S, h, w)`` (each
    layer's head mean; the page also shows their mean); hovering a word overlays its map. Returns the path."""
    path = Path(path)
    path.write_text(word_maps_page(image, layer_maps, words, title=title), encoding="utf-8")
    return path
