"""Alignment plots: source on x, target on y, the layer/heads shown named in the title."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.viz.alignment import plot_alignment

SRC = ["das", "Haus", "ist", "klein", "</s>"]
TGT = ["the", "house", "is", "small"]


@pytest.fixture
def cross() -> np.ndarray:
    """(layers=3, heads=2, T=4, S=5), rows summing to 1."""
    return np.random.default_rng(0).dirichlet(np.ones(len(SRC)), size=(3, 2, len(TGT)))


def shown(figure) -> tuple[np.ndarray, list[str], list[str], str]:
    figure.canvas.draw()
    ax = figure.axes[0]
    x = [t.get_text() for t in ax.get_xticklabels()]
    y = [t.get_text() for t in ax.get_yticklabels()]
    return np.asarray(ax.images[0].get_array()), x, y, ax.get_title()


def test_default_is_last_layer_mean_of_heads(cross, tmp_path):
    path = tmp_path / "alignment.png"
    figure = plot_alignment(torch.tensor(cross), SRC, TGT, path=path)
    matrix, x, y, title = shown(figure)
    np.testing.assert_allclose(matrix, cross[-1].mean(axis=0), rtol=1e-12)
    assert x == SRC and y == TGT
    assert title == "cross-attention, layer 2 (last of 3), mean of 2 heads"
    ax = figure.axes[0]
    assert ax.get_xlabel() == "source" and ax.get_ylabel() == "target"
    assert path.stat().st_size > 0


def test_chosen_layer_and_head(cross):
    matrix, _, _, title = shown(plot_alignment(cross, SRC, TGT, layer=0, head=1))
    np.testing.assert_allclose(matrix, cross[0, 1])
    assert title == "cross-attention, layer 0 of 3, head 1 of 2"
    matrix, _, _, title = shown(plot_alignment(cross, SRC, TGT, layer=-2))
    np.testing.assert_allclose(matrix, cross[1].mean(axis=0))
    assert title == "cross-attention, layer 1 of 3, mean of 2 heads"


def test_one_matrix(cross):
    matrix, x, y, title = shown(plot_alignment(cross[0, 0], SRC, TGT, title="my alignment"))
    np.testing.assert_allclose(matrix, cross[0, 0])
    assert (x, y, title) == (SRC, TGT, "my alignment")
    assert shown(plot_alignment(cross[0, 0], SRC, TGT))[3] == "cross-attention"


def test_errors(cross):
    with pytest.raises(ValueError, match=r"src_tokens: 4 tokens given but cross_attention has S = 5"):
        plot_alignment(cross, SRC[:4], TGT)
    with pytest.raises(ValueError, match=r"tgt_tokens: 5 tokens given but cross_attention has T = 4"):
        plot_alignment(cross, SRC, TGT + ["."])
    with pytest.raises(ValueError, match=r"layer=3 is out of range: cross_attention has 3 layers \(0..2\)"):
        plot_alignment(cross, SRC, TGT, layer=3)
    with pytest.raises(ValueError, match=r"head=-3 is out of range"):
        plot_alignment(cross, SRC, TGT, head=-3)
    with pytest.raises(ValueError, match="layer and head apply only to"):
        plot_alignment(cross[0, 0], SRC, TGT, layer=0)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 5\) \(3-D\); expected \(layers, heads, T, S\) or one"):
        plot_alignment(cross[0], SRC, TGT)
    with pytest.raises(ValueError, match=r"looks like a batch.*cross_attention\[0\]"):
        plot_alignment(cross[None], SRC, TGT)
