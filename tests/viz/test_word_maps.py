"""Per-word maps from cross-attention: aggregation over heads and layers, upsampling, the pointing game, the
PNG grid and the interactive page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.viz.word_maps import (
    WordMapRow,
    layer_word_maps,
    plot_word_map_grid,
    plot_word_maps,
    pointing_hit,
    save_word_maps_html,
    upsample_maps,
    word_maps,
    word_maps_page,
)


def attention_on(patch: int, word: int, *, layers: int = 2, heads: int = 2, patches: int = 16, words: int = 3):
    """Cross-attention where every patch spreads evenly over the words except ``patch``, which looks at
    ``word`` only (layer 0) and evenly (layer 1)."""
    weights = torch.full((layers, heads, patches, words), 1.0 / words)
    weights[0, :, patch] = 0.0
    weights[0, :, patch, word] = 1.0
    return weights


def test_a_word_map_is_the_head_and_layer_mean_of_its_column_on_the_patch_grid() -> None:
    weights = attention_on(patch=6, word=2)  # patch 6 of a 4x4 grid: row 1, column 2
    per_layer = layer_word_maps(weights, (4, 4))
    assert per_layer.shape == (2, 3, 4, 4)
    assert per_layer[0, 2, 1, 2] == pytest.approx(1.0) and per_layer[1, 2, 1, 2] == pytest.approx(1 / 3)
    maps = word_maps(weights, (4, 4))
    assert maps.shape == (3, 4, 4)
    assert maps[2, 1, 2] == pytest.approx((1.0 + 1 / 3) / 2)
    assert maps[0, 1, 2] == pytest.approx((0.0 + 1 / 3) / 2)
    assert np.unravel_index(int(maps[2].argmax()), (4, 4)) == (1, 2)
    np.testing.assert_allclose(maps.sum(axis=0), np.ones((4, 4)))  # each patch still sums to 1 over words


def test_the_grid_must_match_the_patches() -> None:
    with pytest.raises(ValueError, match=r"expected \(layers, heads, N, S\) with N = 3x3 = 9 patches"):
        word_maps(attention_on(patch=0, word=0), (3, 3))


def test_upsampling_keeps_the_peak_over_its_patch_and_the_pointing_game_reads_it() -> None:
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 2] = 1.0
    pixels = upsample_maps(maps, (16, 16))
    assert pixels.shape == (1, 16, 16)
    row, col = np.unravel_index(int(pixels[0].argmax()), (16, 16))
    assert 4 <= row < 8 and 8 <= col < 12  # inside patch (1, 2) of 4x4 pixels
    inside = np.zeros((16, 16), dtype=bool)
    inside[4:8, 8:12] = True
    assert pointing_hit(pixels[0], inside)
    assert not pointing_hit(pixels[0], ~inside)
    with pytest.raises(ValueError, match=r"pixel_map has shape \(16, 16\) but mask \(8, 8\)"):
        pointing_hit(pixels[0], np.ones((8, 8), dtype=bool))


def test_plots_write_an_image_per_prompt_row(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((3, 16, 16))
    maps = word_maps(attention_on(patch=6, word=2), (4, 4))
    single = plot_word_maps(image, maps, ["a", "red", "circle"], path=tmp_path / "one.png", title="t")
    rows = [WordMapRow(image, maps, ["a", "red", "circle"], "a red circle")] * 3
    grid = plot_word_map_grid(rows, path=tmp_path / "grid.png")
    from PIL import Image

    with Image.open(single) as one, Image.open(grid) as three:
        assert three.size[1] > 2 * one.size[1] * 0.8 and three.size[0] == one.size[0]
    with pytest.raises(ValueError, match="row 0: 2 words but 3 maps"):
        plot_word_map_grid([WordMapRow(image, maps, ["a", "red"], "x")], path=tmp_path / "bad.png")
    with pytest.raises(ValueError, match="rows is empty"):
        plot_word_map_grid([], path=tmp_path / "none.png")


def test_the_html_page_embeds_the_image_and_every_layer_offline(tmp_path: Path) -> None:
    image = np.zeros((3, 16, 16))
    image[0, 0, 0] = 1.0
    weights = attention_on(patch=6, word=2)
    path = save_word_maps_html(
        tmp_path / "maps.html", image, layer_word_maps(weights, (4, 4)), ["a", "</script>", "circle"], title="<t>"
    )
    page = path.read_text(encoding="utf-8")
    assert "default-src 'none'" in page and "<title>&lt;t&gt;</title>" in page
    assert "</script>" not in page.split("const data = ")[1].split(";\n")[0]
    data = json.loads(re.search(r"const data = (.*?);\n", page).group(1))  # type: ignore[union-attr]
    assert data["words"] == ["a", "</script>", "circle"] and data["grid"] == [4, 4] and data["size"] == [16, 16]
    assert data["image"][0][0] == [255, 0, 0] and len(data["layers"]) == 2
    assert data["layers"][0][2][1][2] == 1.0 and data["mean"][2][1][2] == pytest.approx(round((1 + 1 / 3) / 2, 4))
    with pytest.raises(ValueError, match=r"expected \(layers, S, h, w\) with S = 2 words"):
        word_maps_page(image, layer_word_maps(weights, (4, 4)), ["a", "b"], title="x")
