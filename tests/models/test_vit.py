"""VisionTransformer: transformers parity, shapes, pooling, positions, bad inputs, checkpoints, HF loading."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from qkv.checks import ConfigError
from qkv.models import VisionTransformer, ViTConfig, load_hf_vit, load_model, save_model
from qkv.models.vit import sincos_2d
from qkv.nn.multi_head import unstack_projections

try:
    import transformers
except ModuleNotFoundError:  # CI installs it; without it only the parity tests are skipped
    transformers = None

needs_transformers = pytest.mark.skipif(
    transformers is None, reason="transformers is not installed: pip install transformers (CI installs it)"
)

SMALL = {"image_size": 8, "patch_size": 2, "num_channels": 1, "num_classes": 10}
SMALL |= {"d_model": 16, "num_layers": 2, "num_heads": 4, "ffn_dim": 32}


def small(**overrides: Any) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**{**SMALL, **overrides})).eval()


def hf_model(qkv_bias: bool = True) -> Any:
    """A random ``ViTForImageClassification`` (eager attention, so its attention weights come back)."""
    assert transformers is not None
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=5,
        qkv_bias=qkv_bias,
        attn_implementation="eager",
    )
    return transformers.ViTForImageClassification(config).eval()


def assert_same_outputs(hf: Any, ours: VisionTransformer, images: torch.Tensor, *, interpolate: bool) -> None:
    with torch.no_grad():
        theirs = hf(images, output_attentions=True, interpolate_pos_encoding=interpolate)
        out = ours(images, need_attention=True)
    torch.testing.assert_close(out.logits, theirs.logits, atol=1e-5, rtol=0)
    assert out.attention is not None and out.attention.shape[1] == len(theirs.attentions) == 3
    for layer, weights in enumerate(theirs.attentions):
        torch.testing.assert_close(out.attention[:, layer], weights, atol=1e-5, rtol=0)


@needs_transformers
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_transformers_vit_weights_give_its_logits_and_attention(qkv_bias: bool) -> None:
    hf = hf_model(qkv_bias)
    ours = load_hf_vit(hf.state_dict(), hf.config.to_dict())
    assert ours.config.num_classes == 5 and ours.config.qkv_bias is qkv_bias
    torch.manual_seed(1)
    assert_same_outputs(hf, ours, torch.randn(2, 3, 16, 16), interpolate=False)
    # another, non-square size: the learned positions are interpolated as interpolate_pos_encoding=True does
    assert_same_outputs(hf, ours, torch.randn(2, 3, 24, 32), interpolate=True)
    assert ours(torch.randn(1, 3, 24, 32)).grid == (6, 8)


# transformers 5's ViT names -> those of the files transformers 4 wrote (the checkpoints on the Hub)
OLD_NAMES = {
    "vit.layers.": "vit.encoder.layer.",
    ".attention.q_proj.": ".attention.attention.query.",
    ".attention.k_proj.": ".attention.attention.key.",
    ".attention.v_proj.": ".attention.attention.value.",
    ".attention.o_proj.": ".attention.output.dense.",
    ".mlp.fc1.": ".intermediate.dense.",
    ".mlp.fc2.": ".output.dense.",
}


def old_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in state.items():
        for new, old in OLD_NAMES.items():
            key = key.replace(new, old)
        out[key] = t.contiguous()
    return out


@needs_transformers
def test_a_checkpoint_directory_in_the_hub_layout_loads(tmp_path: Path) -> None:
    hf = hf_model()
    state = old_layout(hf.state_dict())
    assert "vit.encoder.layer.0.attention.attention.query.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    config = json.loads(hf.config.to_json_string()) | {"id2label": {str(i): f"c{i}" for i in range(5)}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_hf_vit(tmp_path)
    assert ours.config.class_names == ["c0", "c1", "c2", "c3", "c4"]
    assert not ours.training
    assert_same_outputs(hf, ours, torch.randn(2, 3, 16, 16), interpolate=False)


def test_patch_embedding_and_class_token_shapes() -> None:
    model = small()
    images = torch.randn(3, 1, 8, 8)
    assert model.embeddings.patch_embeddings(images).shape == (3, 16, 16)  # (B, h·w, E)
    x, grid = model.embeddings(images)
    assert x.shape == (3, 17, 16) and grid == (4, 4)
    out = model(images, need_attention=True)
    assert out.logits.shape == (3, 10) and out.grid == (4, 4)
    assert out.attention is not None and out.attention.shape == (3, 2, 4, 17, 17)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, 2, 4, 17))
    assert model(images).attention is None


def test_learned_positions_are_interpolated_for_another_image_size() -> None:
    model = small()
    table = model.embeddings.position_embeddings
    assert table is not None and table.shape == (1, 17, 16)
    assert model.embeddings.positions((4, 4), table) is table
    resized = model.embeddings.positions((6, 8), table)
    assert resized.shape == (1, 1 + 48, 16)
    torch.testing.assert_close(resized[:, 0], table[:, 0])  # the class token's position is not resized
    with torch.no_grad():  # bicubic resizing keeps a constant table constant
        table.fill_(0.5)
    torch.testing.assert_close(model.embeddings.positions((6, 8), table), torch.full((1, 49, 16), 0.5))
    out = model(torch.randn(2, 1, 12, 16), need_attention=True)
    assert out.grid == (6, 8) and out.logits.shape == (2, 10)
    assert out.attention is not None and out.attention.shape == (2, 2, 4, 49, 49)


def test_mean_pooling_averages_the_patch_tokens_without_a_class_token() -> None:
    model = small(pooling="mean")
    assert model.embeddings.cls_token is None
    assert "embeddings.cls_token" not in model.state_dict()
    images = torch.randn(2, 1, 8, 8)
    out = model(images, need_attention=True)
    assert out.attention is not None and out.attention.shape == (2, 2, 4, 16, 16)
    with torch.no_grad():
        x, _ = model.embeddings(images)
        for layer in model.layers:
            x, _ = layer(x)
        expected = model.classifier(model.layernorm(x).mean(dim=1))
    torch.testing.assert_close(out.logits, expected)


def test_sincos_2d_encodes_row_then_column() -> None:
    table = sincos_2d((2, 3), 8)
    assert table.shape == (6, 8)
    omega = [1.0, 10000.0 ** (-1 / 2)]
    for r in range(2):
        for c in range(3):
            row = [math.sin(r * w) for w in omega] + [math.cos(r * w) for w in omega]
            col = [math.sin(c * w) for w in omega] + [math.cos(c * w) for w in omega]
            torch.testing.assert_close(table[r * 3 + c], torch.tensor(row + col, dtype=torch.float64))


def test_sinusoidal_positions_have_no_parameters_and_fit_any_grid() -> None:
    model = small(positional="sinusoidal")
    assert model.embeddings.position_embeddings is None
    assert not any("position" in name for name in model.state_dict())
    positions = model.embeddings.positions((3, 5), torch.zeros(1))
    assert positions.shape == (1, 16, 16)
    torch.testing.assert_close(positions[0, 0], torch.zeros(16))  # the class token's
    torch.testing.assert_close(positions[0, 1:], sincos_2d((3, 5), 16).float())
    assert model(torch.randn(1, 1, 6, 10)).grid == (3, 5)


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((2, 1, 9, 8), torch.float32, r"9x8 .*multiples of patch_size=2"),
        ((2, 3, 8, 8), torch.float32, r"3 channels .*num_channels=1"),
        ((1, 8, 8), torch.float32, r"\(B, C, H, W\) \(4-D\); got \(1, 8, 8\) \(one image: add the batch"),
        ((2, 1, 8, 8), torch.int64, r"floating point .*torch.int64"),
    ],
)
def test_bad_images_are_clear_errors(shape: tuple[int, ...], dtype: torch.dtype, message: str) -> None:
    model = small()
    with pytest.raises((ValueError, TypeError), match=message):
        model(torch.zeros(shape, dtype=dtype))


def test_images_must_be_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor .*got list"):
        small()([[0.0]])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image_size": 9}, r"image_size=9 must be a multiple of patch_size=2"),
        ({"d_model": 18}, r"d_model=18 must be a multiple of num_heads=4"),
        ({"positional": "sinusoidal", "d_model": 8, "num_heads": 2, "ffn_dim": 8}, None),
        ({"positional": "sinusoidal", "d_model": 6, "num_heads": 2}, r"divisible by 4 .*got 6"),
        ({"pooling": "max"}, r"pooling must be one of 'cls', 'mean'; got 'max'"),
        ({"class_names": ["a", "b"]}, r"class_names has 2 names but num_classes=10"),
        ({"class_names": ["a"] * 10}, r"class_names must be a non-empty list of distinct"),
    ],
)
def test_config_checks(overrides: dict[str, Any], message: str | None) -> None:
    if message is None:
        ViTConfig(**{**SMALL, **overrides})
        return
    with pytest.raises(ConfigError, match=message):
        ViTConfig(**{**SMALL, **overrides})


def test_config_from_a_file_section_names_its_keys() -> None:
    with pytest.raises(ConfigError, match=r"model.image_size=9 must be a multiple of model.patch_size=2"):
        ViTConfig.from_dict({**SMALL, "image_size": 9}, "model")


@pytest.mark.parametrize("overrides", [{}, {"pooling": "mean", "positional": "sinusoidal", "qkv_bias": False}])
def test_save_and_load_model_round_trip(tmp_path: Path, overrides: dict[str, Any]) -> None:
    names = [f"digit {i}" for i in range(10)]
    model = small(class_names=names, **overrides)
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vit"
    loaded = load_model(tmp_path)
    assert isinstance(loaded, VisionTransformer) and loaded.config == model.config
    assert loaded.config.class_names == names
    images = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(images).logits, model(images).logits, atol=0, rtol=0)


def test_no_qkv_bias_keeps_the_output_projection_bias() -> None:
    state = small(qkv_bias=False).state_dict()
    assert "layers.0.self_attn.in_proj.bias" not in state and "layers.0.self_attn.in_proj.weight" in state
    assert "layers.0.self_attn.out_proj.bias" in state


HF_CONFIG = {"image_size": 8, "patch_size": 2, "num_channels": 1, "hidden_size": 16, "num_hidden_layers": 2}
HF_CONFIG |= {"num_attention_heads": 4, "intermediate_size": 32, "num_labels": 10}


def hf_state() -> dict[str, torch.Tensor]:
    """qkv's small model's weights under transformers 5's ViT names (written here, not by qkv)."""
    out = {}
    for key, t in unstack_projections(small().state_dict()).items():
        for ours, theirs in [
            ("self_attn.out_proj", "attention.o_proj"),
            ("self_attn.", "attention."),
            ("norm1", "layernorm_before"),
            ("norm2", "layernorm_after"),
            ("linear1", "mlp.fc1"),
            ("linear2", "mlp.fc2"),
        ]:
            key = key.replace(ours, theirs) if key.startswith("layers.") else key
        out["vit." + key if not key.startswith("classifier.") else key] = t
    return out


def test_load_hf_vit_from_a_state_dict_and_a_config() -> None:
    loaded = load_hf_vit(hf_state(), HF_CONFIG | {"model_type": "vit", "pooler_act": "tanh"})
    images = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(loaded(images).logits, small()(images).logits, atol=0, rtol=0)


def test_load_hf_vit_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"load_hf_vit\(state_dict\) needs config"):
        load_hf_vit(hf_state())
    state = hf_state()
    del state["classifier.weight"]
    with pytest.raises(ValueError, match=r"state_dict lacks 1 weight\(s\) of the model, e.g. classifier.weight"):
        load_hf_vit(state, HF_CONFIG)
    with pytest.raises(ValueError, match=r"classifier.weight has shape \(10, 16\) but the config gives \(7, 16\)"):
        load_hf_vit(hf_state(), HF_CONFIG | {"num_labels": 7})
    with pytest.raises(ValueError, match=r"not ViTForImageClassification keys .*vit.decoder.weight"):
        load_hf_vit(hf_state() | {"vit.decoder.weight": torch.zeros(1)}, HF_CONFIG)
    with pytest.raises(ValueError, match=r"config: unknown key\(s\) 'use_rope'"):
        load_hf_vit(hf_state(), HF_CONFIG | {"use_rope": True})
    with pytest.raises(ValueError, match=r"config: model_type='deit' is not supported"):
        load_hf_vit(hf_state(), HF_CONFIG | {"model_type": "deit"})
    with pytest.raises(ValueError, match=r"config: activation must be one of 'relu', 'gelu'; got 'gelu_new'"):
        load_hf_vit(hf_state(), HF_CONFIG | {"hidden_act": "gelu_new"})
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ValueError, match=r"has pytorch_model.bin but no model.safetensors: qkv never unpickles"):
        load_hf_vit(tmp_path)
    save_file(hf_state(), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"config.json is missing"):
        load_hf_vit(tmp_path)
    assert load_hf_vit(tmp_path, HF_CONFIG).config.d_model == 16  # config given instead of config.json
    with pytest.raises(ValueError, match=r"is not a checkpoint directory \(no such directory\)"):
        load_hf_vit(tmp_path / "absent")
