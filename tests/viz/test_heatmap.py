"""Heatmaps: files in every format, the right colors in the right cells, readable labels, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib._pylab_helpers import Gcf
from matplotlib.figure import Figure
from matplotlib.image import imread

from qkv.viz import alignment, heatmap
from qkv.viz.alignment import plot_alignment
from qkv.viz.heatmap import (
    MAX_INCHES,
    MAX_LABELS,
    MIN_INCHES,
    plot_heads,
    plot_heatmap,
    plot_layer_average,
    save_figure,
)


def shown_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_saves_by_suffix(tmp_path, suffix, magic):
    path = tmp_path / f"attention{suffix}"
    plot_heatmap([[0.7, 0.3], [0.1, 0.9]], ["a", "b"], ["x", "y"], title="t", path=path)
    data = path.read_bytes()
    assert len(data) > 500 and data.startswith(magic)
    if suffix == ".svg":
        assert b"<svg" in data


def test_unknown_suffix_is_refused(tmp_path):
    figure = plot_heatmap([[1.0]], ["a"], ["b"])
    with pytest.raises(ValueError, match=r"'attention\.jpg'.*\.png, \.svg, \.pdf"):
        save_figure(figure, tmp_path / "attention.jpg")


def test_pixels_identity_matrix(tmp_path):
    """[[1, 0], [0, 1]] at 20 dpi: the diagonal cells have the colormap's top color, the others its bottom."""
    path = tmp_path / "identity.png"
    figure = plot_heatmap(np.eye(2), ["a", "b"], ["a", "b"], annotate=False, cmap="viridis")
    save_figure(figure, path, dpi=20)
    pixels = imread(path)[..., :3]
    height, width = pixels.shape[:2]
    ax = figure.axes[0]
    high, low = np.array(colormaps["viridis"](1.0)[:3]), np.array(colormaps["viridis"](0.0)[:3])
    for i in range(2):
        for j in range(2):
            # Cell (i, j) is centred on data point (x=j, y=i); figure fractions do not depend on the dpi.
            fx, fy = figure.transFigure.inverted().transform(ax.transData.transform((j, i)))
            pixel = pixels[int((1 - fy) * height), int(fx * width)]
            expected = high if i == j else low
            np.testing.assert_allclose(pixel, expected, atol=0.02, err_msg=f"cell ({i}, {j})")


def test_annotations_for_tiny_matrices():
    small = plot_heatmap([[0.25, 0.75], [1.0, 0.0]], ["a", "b"], ["x", "y"])
    assert sorted(t.get_text() for t in small.axes[0].texts) == ["0.00", "0.25", "0.75", "1.00"]
    assert len(plot_heatmap(np.eye(2), None, None, annotate=False).axes[0].texts) == 0
    assert len(plot_heatmap(np.eye(30), None, None).axes[0].texts) == 0


def test_label_thinning_for_200_tokens():
    tokens = [f"tok{i}" for i in range(200)]
    figure = plot_heatmap(np.full((200, 200), 1 / 200), tokens, tokens)
    figure.canvas.draw()
    ax = figure.axes[0]
    step = 5  # ceil(200 / 40)
    assert shown_labels(ax.xaxis) == tokens[::step]
    assert shown_labels(ax.yaxis) == tokens[::step]
    assert len(shown_labels(ax.xaxis)) <= MAX_LABELS
    assert all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    width, height = figure.get_size_inches()
    assert height <= MAX_INCHES and width <= MAX_INCHES + 1.0


def test_every_label_for_short_sequences_and_minimum_size():
    tokens = [f"t{i}" for i in range(30)]
    figure = plot_heatmap(np.full((30, 30), 1 / 30), tokens, tokens)
    figure.canvas.draw()
    assert shown_labels(figure.axes[0].xaxis) == tokens
    tiny = plot_heatmap([[1.0]], ["a"], ["b"])
    assert min(tiny.get_size_inches()) >= MIN_INCHES


def test_dollar_tokens_are_literal():
    figure = plot_heatmap(np.eye(2), ["$5", "a$b$"], ["x", "y"])
    figure.canvas.draw()  # math mode would fail to parse "$5"
    assert shown_labels(figure.axes[0].yaxis) == [r"\$5", r"a\$b\$"]


def test_draws_into_given_axes():
    figure = Figure()
    left, right = figure.subplots(1, 2)
    assert plot_heatmap(np.eye(3), None, None, ax=right, title="mine") is figure
    assert right.get_title() == "mine" and len(right.images) == 1 and not left.images


def test_accepts_tensors():
    weights = torch.tensor([[0.2, 0.8]], requires_grad=True)
    figure = plot_heatmap(weights, ["q"], ["k1", "k2"], annotate=False)
    np.testing.assert_allclose(figure.axes[0].images[0].get_array(), [[0.2, 0.8]], rtol=1e-6)


def test_heads_grid(tmp_path):
    weights = np.random.default_rng(0).dirichlet(np.ones(5), size=(6, 4))  # (H=6, L=4, S=5)
    figure = plot_heads(weights, list("abcd"), list("vwxyz"), title="layer 0", path=tmp_path / "heads.svg")
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == [f"head {h}" for h in range(6)]
    for h, ax in enumerate(panels):
        np.testing.assert_allclose(ax.images[0].get_array(), weights[h])
    assert len({ax.images[0].get_clim() for ax in panels}) == 1, "all heads share one color scale"
    assert (tmp_path / "heads.svg").stat().st_size > 0


def test_layer_average():
    weights = np.random.default_rng(1).dirichlet(np.ones(3), size=(2, 4, 3))  # (layers=2, H=4, L=3, S=3)
    figure = plot_layer_average(weights, list("abc"), list("abc"))
    panels = [ax for ax in figure.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["layer 0, mean of 4 heads", "layer 1, mean of 4 heads"]
    np.testing.assert_allclose(panels[1].images[0].get_array(), weights[1].mean(axis=0))
    one = plot_layer_average(weights[0], list("abc"), list("abc"))
    assert one.axes[0].get_title() == "mean of 4 heads"
    np.testing.assert_allclose(one.axes[0].images[0].get_array(), weights[0].mean(axis=0))


def test_bad_dimensions():
    with pytest.raises(ValueError, match=r"shape \(3,\) \(1-D\); expected \(L, S\)"):
        plot_heatmap([0.1, 0.2, 0.7], None, None)
    with pytest.raises(ValueError, match=r"expected \(H, L, S\).*looks like a batch.*weights\[0\]"):
        plot_heads(np.ones((2, 3, 4, 4)), None, None)
    with pytest.raises(ValueError, match=r"expected \(layers, H, L, S\) or one layer's \(H, L, S\)"):
        plot_layer_average(np.ones((4, 4)), None, None)
    with pytest.raises(ValueError, match="NaN or infinite"):
        plot_heatmap([[float("nan")]], None, None)


def test_token_count_mismatch_names_the_counts():
    with pytest.raises(ValueError, match=r"row_tokens .*: 3 tokens given but the weights have 2"):
        plot_heatmap(np.eye(2), ["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match=r"col_tokens .*: 1 tokens given but the weights have 2"):
        plot_heads(np.ones((2, 2, 2)), ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="not one string"):
        plot_heatmap(np.eye(2), "ab", None)


def test_no_pyplot_state():
    """Figures are built without pyplot: none lands in pyplot's global figure list, none needs closing."""
    before = Gcf.get_num_fig_managers()
    plot_heads(np.ones((2, 3, 3)) / 3, None, None)
    plot_layer_average(np.ones((2, 2, 3, 3)) / 3, None, None)
    plot_alignment(np.ones((1, 2, 3, 3)) / 3, None, None)
    assert Gcf.get_num_fig_managers() == before
    for module in (heatmap, alignment):
        assert "import pyplot" not in (source := Path(module.__file__).read_text(encoding="utf-8"))
        assert "matplotlib.pyplot" not in source
