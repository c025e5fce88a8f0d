"""Attention over image patches: the class token's maps and the rollout against hand arithmetic on a 2-layer
model, upsampling onto pixels, the overlay figure, and ``vit_attention`` against the model's own output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qkv.models import VisionTransformer, ViTConfig
from qkv.viz.image_attention import (
    class_token_attention,
    patch_labels,
    plot_image_attention,
    rollout_map,
    upsample,
)
from qkv.viz.model_attention import vit_attention

# A 1x2 grid of patches after a class token: N = 3. Layer 0 has two heads whose class-token rows differ and
# average to [0.2, 0.4, 0.4]; layer 1's heads are equal.
LAYER0 = [
    [[0.4, 0.4, 0.2], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]],
    [[0.0, 0.4, 0.6], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]],
]
LAYER1_HEAD = [[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
WEIGHTS = np.array([LAYER0, [LAYER1_HEAD, LAYER1_HEAD]])  # (layers 2, heads 2, 3, 3)


def test_rollout_of_a_two_layer_model_by_hand() -> None:
    # Heads averaged, then Ã = 0.5·A + 0.5·I (rows already sum to 1):
    #   Ã0 = [[0.6, 0.2, 0.2], [0.25, 0.75, 0], [0, 0.25, 0.75]]
    #   Ã1 = [[0.75, 0.125, 0.125], [0, 1, 0], [0, 0, 1]]
    # The class token's row of Ã1 · Ã0 mixes the rows of Ã0:
    #   0.75·[0.6, 0.2, 0.2] + 0.125·[0.25, 0.75, 0] + 0.125·[0, 0.25, 0.75] = [0.48125, 0.275, 0.24375]
    # and the map is its patch columns on the 1x2 grid.
    np.testing.assert_allclose(rollout_map(WEIGHTS, (1, 2), class_token=True), [[0.275, 0.24375]], atol=1e-12)


def test_class_token_attention_per_head() -> None:
    maps = class_token_attention(WEIGHTS, (1, 2), class_token=True, layer=0)
    np.testing.assert_array_equal(maps, [[[0.4, 0.2]], [[0.4, 0.6]]])
    np.testing.assert_array_equal(class_token_attention(WEIGHTS, (1, 2), class_token=True), [[[0.25, 0.25]]] * 2)


def test_without_a_class_token_the_patches_mean_row() -> None:
    weights = np.array([[[[0.5, 0.5], [0.1, 0.9]]]])  # 1 layer, 1 head, 2 patches
    np.testing.assert_allclose(class_token_attention(weights, (2, 1), class_token=False), [[[0.3], [0.7]]])
    # Ã = [[0.75, 0.25], [0.05, 0.95]]; the mean row is [0.4, 0.6].
    np.testing.assert_allclose(rollout_map(weights, (2, 1), class_token=False), [[0.4], [0.6]])


def test_shape_errors_name_the_expected_shape() -> None:
    with pytest.raises(ValueError, match=r"expected \(layers, heads, 5, 5\) for a 2x2 grid of patches and a class"):
        rollout_map(WEIGHTS, (2, 2), class_token=True)


def test_patch_labels_and_upsample() -> None:
    assert patch_labels((2, 2), class_token=True) == ["[CLS]", "p(0,0)", "p(0,1)", "p(1,0)", "p(1,1)"]
    assert patch_labels((1, 2), class_token=False) == ["p(0,0)", "p(0,1)"]
    np.testing.assert_array_equal(upsample(np.array([[1.0, 2.0]]), (2, 4)), [[1, 1, 2, 2], [1, 1, 2, 2]])
    with pytest.raises(ValueError, match="cannot spread a 1x2 map over 2x3 pixels"):
        upsample(np.array([[1.0, 2.0]]), (2, 3))


def test_overlay_figure(tmp_path: Path) -> None:
    path = plot_image_attention(
        np.random.default_rng(0).random((3, 4, 8)),
        class_token_attention(WEIGHTS, (1, 2), class_token=True),
        rollout_map(WEIGHTS, (1, 2), class_token=True),
        path=tmp_path / "overlay.png",
        title="test",
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vit_attention_is_the_models_over_labelled_patches() -> None:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, num_classes=2, d_model=8, num_layers=2, num_heads=2, ffn_dim=8
    )
    model = VisionTransformer(config).eval()
    image = torch.randn(1, 8, 12)  # not the training size: 2x3 patches
    amap, grid = vit_attention(model, image)
    assert grid == (2, 3) and amap.tokens[:3] == ["[CLS]", "p(0,0)", "p(0,1)"] and len(amap.tokens) == 7
    with torch.no_grad():
        expected = model(image[None], need_attention=True).attention[0]
    np.testing.assert_allclose(amap.weights, expected.double().numpy())
    with pytest.raises(ValueError, match=r"image must have shape \(C, H, W\)"):
        vit_attention(model, image[None])
