"""``VisionTransformer``: attention between image patches (Dosovitskiy et al., 2021), as Hugging Face's ViT.

An image ``(B, C, H, W)`` is cut into ``P × P`` patches, each projected to ``E`` (a ``Conv2d`` of kernel and
stride ``P``); a class token is put in front (``pooling="cls"``), positions are added, pre-LN
:class:`qkv.nn.TransformerEncoderLayer` s (GELU, attention through :func:`qkv.attention`) follow, then a
final LayerNorm and a linear classifier on the class token (or on the mean of the patch tokens,
``pooling="mean"``, which has no class token)::

    x = patch_embeddings(images)  # (B, h·w, E), h = H/P, w = W/P
    x = cat([cls_token, x]) + positions(h, w)  # (B, N, E), N = 1 + h·w
    x = layers(x)  # pre-LN encoder layers
    logits = classifier(layernorm(x)[:, 0])  # (B, num_classes)

Positions: ``"learned"`` (one vector per patch of an ``image_size`` image, plus the class token's; other
image sizes get them resized by bicubic interpolation, as ``ViTForImageClassification(...,
interpolate_pos_encoding=True)``) or ``"sinusoidal"`` (fixed 2-D sin-cos of the patch row and column, MAE's,
for any grid; the class token's is zero).

Names: the embeddings, the final ``layernorm`` and the ``classifier`` carry Hugging Face ViT's names
exactly; the layers are ``layers.{i}`` with :class:`~qkv.nn.TransformerEncoderLayer`'s names, so
:mod:`qkv.models.vit_hf` maps ``ViTForImageClassification`` weights onto this model with a small rename
table (:func:`~qkv.models.vit_hf.load_hf_vit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkv.checks import (
    ConfigError,
    StrictConfig,
    boolean,
    int_at_least,
    one_of,
    option,
    optional,
    positive_number,
    probability,
    qualified,
    short_repr,
)
from qkv.models.transformer import stack_layers
from qkv.nn.transformer_layers import ACTIVATIONS, TransformerEncoderLayer

POOLINGS = ("cls", "mean")
VIT_POSITIONALS = ("learned", "sinusoidal")


def _class_names(name: str, value: Any) -> list[str]:
    """``value`` if it is a non-empty list of distinct non-empty strings."""
    ok = isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)
    if not ok or len(set(value)) != len(value):
        raise ConfigError(f"{name} must be a non-empty list of distinct non-empty strings; got {short_repr(value)}")
    return list(value)


def check_patch_geometry(config: Any, prefix: str) -> None:
    """``config.image_size`` a multiple of ``config.patch_size`` and ``config.d_model`` of ``config.num_heads``
    (a ViT's, or any patch transformer's config); ``ConfigError`` naming the keys under ``prefix`` otherwise."""
    c = config
    if c.image_size % c.patch_size:
        raise ConfigError(
            f"{qualified(prefix, 'image_size')}={c.image_size} must be a multiple of "
            f"{qualified(prefix, 'patch_size')}={c.patch_size}"
        )
    if c.d_model % c.num_heads:
        raise ConfigError(
            f"{qualified(prefix, 'd_model')}={c.d_model} must be a multiple of "
            f"{qualified(prefix, 'num_heads')}={c.num_heads}"
        )


@dataclass
class ViTConfig(StrictConfig):
    """A Vision Transformer (:class:`VisionTransformer`); Hugging Face's ``ViTConfig`` names in brackets.

    Attributes:
        image_size: the side of the square images the learned positions are made for (other sizes are
            interpolated); must be a multiple of ``patch_size``.
        patch_size: ``P``, the side of a square patch.
        num_channels: ``C``, 3 for RGB, 1 for grey.
        num_classes: the classifier's outputs (``num_labels``).
        d_model: ``E`` (``hidden_size``).
        num_layers: encoder layers (``num_hidden_layers``).
        num_heads: attention heads (``num_attention_heads``); must divide ``d_model``.
        ffn_dim: feed-forward hidden width (``intermediate_size``).
        dropout: dropout on the embeddings and on each sublayer's output (``hidden_dropout_prob``).
        attention_dropout: dropout on the attention weights (``attention_probs_dropout_prob``).
        activation: ``"gelu"`` (exact) or ``"relu"`` (``hidden_act``).
        layer_norm_eps: LayerNorm epsilon.
        pooling: ``"cls"`` (classify the class token) or ``"mean"`` (the mean of the patch tokens; no class
            token).
        positional: ``"learned"`` or ``"sinusoidal"`` (2-D sin-cos; needs ``d_model`` divisible by 4).
        qkv_bias: whether the query, key and value projections have biases.
        class_names: optional labels of the classes, ``num_classes`` of them (saved with the model).
    """

    image_size: int = option(224, int_at_least)
    patch_size: int = option(16, int_at_least)
    num_channels: int = option(3, int_at_least)
    num_classes: int = option(1000, int_at_least)
    d_model: int = option(768, int_at_least)
    num_layers: int = option(12, int_at_least)
    num_heads: int = option(12, int_at_least)
    ffn_dim: int = option(3072, int_at_least)
    dropout: float = option(0.0, probability)
    attention_dropout: float = option(0.0, probability)
    activation: str = option("gelu", one_of, ACTIVATIONS)
    layer_norm_eps: float = option(1e-12, positive_number)
    pooling: str = option("cls", one_of, POOLINGS)
    positional: str = option("learned", one_of, VIT_POSITIONALS)
    qkv_bias: bool = option(True, boolean)
    class_names: list[str] | None = option(None, optional(_class_names))

    def check(self, prefix: str) -> None:
        def key(name: str) -> str:
            return qualified(prefix, name)

        check_patch_geometry(self, prefix)
        if self.positional == "sinusoidal" and self.d_model % 4:
            raise ConfigError(
                f"positional='sinusoidal' needs {key('d_model')} divisible by 4 (sin and cos of the row and of the "
                f"column); got {self.d_model}"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"{key('class_names')} has {len(self.class_names)} names but {key('num_classes')}={self.num_classes}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row of an ``image_size`` image."""
        side = self.image_size // self.patch_size
        return side, side


@dataclass
class ViTOutput:
    """What :meth:`VisionTransformer.forward` returns.

    Attributes:
        logits: ``(B, num_classes)``.
        attention: with ``need_attention``, ``(B, layers, heads, N, N)``: every layer's attention weights,
            ``N = 1 + h·w`` with a class token (position 0), ``h·w`` without; patches in row-major order.
        grid: ``(h, w)``: patches per column and per row.
    """

    logits: torch.Tensor
    attention: torch.Tensor | None
    grid: tuple[int, int]


class PatchEmbeddings(nn.Module):
    """``(B, C, H, W)`` → ``(B, h·w, E)``: each ``P × P`` patch linearly projected (ViT's ``patch_embeddings``).

    Attributes:
        projection: ``nn.Conv2d(C, E, kernel_size=P, stride=P)``.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(config.num_channels, config.d_model, config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images (B, C, H, W)`` → ``(B, h·w, E)``, patches in row-major order."""
        out: torch.Tensor = self.projection(images)  # (B, E, h, w)
        return out.flatten(2).transpose(1, 2)


def sincos_2d(grid: tuple[int, int], dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos positions of an ``(h, w)`` grid (MAE's): ``(h·w, dim)``, row-major, float64.

    The first ``dim/2`` values encode the row and the last ``dim/2`` the column, each as 1-D sinusoidal
    encodings ``[sin(p·ω_0..), cos(p·ω_0..)]`` with ``ω_i = base^(-i/(dim/4))``.
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    quarter = dim // 4
    omega = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(p: torch.Tensor) -> torch.Tensor:
        angles = p.reshape(-1, 1) * omega  # (h·w, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1)


class ViTEmbeddings(nn.Module):
    """Patch embeddings, the class token and positions, then dropout (ViT's ``embeddings``).

    Attributes:
        patch_embeddings: :class:`PatchEmbeddings`.
        cls_token: ``(1, 1, E)`` with ``pooling="cls"``; absent with ``"mean"``.
        position_embeddings: ``(1, N, E)`` learned positions of an ``image_size`` image (``N = 1 + h·w`` with a
            class token); absent with ``positional="sinusoidal"``.
    """

    cls_token: nn.Parameter | None
    position_embeddings: nn.Parameter | None

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embeddings = PatchEmbeddings(config)
        h, w = config.grid
        extra = 1 if config.pooling == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.d_model)) if extra else None
        if config.positional == "learned":
            self.position_embeddings = nn.Parameter(torch.zeros(1, extra + h * w, config.d_model))
        else:
            self.position_embeddings = None
        self.dropout = nn.Dropout(config.dropout)
        # The sin-cos table of the last grid seen: built once, not at every step.
        self._sincos: tuple[tuple[int, int], torch.Tensor] | None = None

    def positions(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """The positions to add for an ``(h, w)`` grid: ``(1, N, E)`` in ``like``'s dtype and device."""
        if self.position_embeddings is None:
            return self._sincos_positions(grid, like)
        table = self.position_embeddings
        if grid == self.config.grid:
            return table
        # Resize the patch positions as an (E, h, w) image; bicubic with align_corners=False is exactly what
        # ViTForImageClassification(interpolate_pos_encoding=True) does, so fine-tuned weights keep working.
        extra = table.shape[1] - self.config.grid[0] * self.config.grid[1]
        head, patches = table[:, :extra], table[:, extra:]
        side_h, side_w = self.config.grid
        patches = patches.reshape(1, side_h, side_w, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([head, patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

    def _sincos_positions(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        cached = self._sincos
        if cached is None or cached[0] != grid or cached[1].device != like.device or cached[1].dtype != like.dtype:
            table = sincos_2d(grid, self.config.d_model)
            if self.cls_token is not None:
                table = torch.cat([table.new_zeros(1, table.shape[1]), table])
            cached = self._sincos = (grid, table.to(device=like.device, dtype=like.dtype)[None])
        return cached[1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``images (B, C, H, W)`` → ``(x (B, N, E), (h, w))``."""
        x = self.patch_embeddings(images)
        grid = (images.shape[2] // self.config.patch_size, images.shape[3] // self.config.patch_size)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.positions(grid, x)), grid


class VisionTransformer(nn.Module):
    """A Vision Transformer classifier; see the module docstring.

    Args:
        config: a :class:`ViTConfig`.

    Attributes:
        embeddings: :class:`ViTEmbeddings`.
        layers: ``num_layers`` pre-LN :class:`~qkv.nn.TransformerEncoderLayer` s.
        layernorm: the final LayerNorm.
        classifier: ``nn.Linear(E, num_classes)``.

    Example::

        model = VisionTransformer(
            ViTConfig(
                image_size=8,
                patch_size=2,
                num_channels=1,
                num_classes=10,
                d_model=64,
                num_layers=4,
                num_heads=4,
                ffn_dim=128,
            )
        ).eval()
        out = model(images, need_attention=True)  # images (B, 1, 8, 8)
        out.logits  # (B, 10); out.attention (B, 4, 4, 17, 17); out.grid == (4, 4)
    """

    model_type = "vit"

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig; got {type(config).__name__}")
        self.config = config
        c = config
        self.embeddings = ViTEmbeddings(c)
        layers = [
            TransformerEncoderLayer(
                c.d_model,
                c.num_heads,
                c.ffn_dim,
                dropout=c.dropout,
                attention_dropout=c.attention_dropout,
                activation=c.activation,
                norm_first=True,
                layer_norm_eps=c.layer_norm_eps,
            )
            for _ in range(c.num_layers)
        ]
        if not c.qkv_bias:
            # ViT's qkv_bias drops the query, key and value biases only; the output projection keeps its own.
            for layer in layers:
                layer.self_attn.in_proj.register_parameter("bias", None)
        self.layers = nn.ModuleList(layers)
        self.layernorm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.classifier = nn.Linear(c.d_model, c.num_classes)
        self.apply(_init_vit)
        for p in (self.embeddings.cls_token, self.embeddings.position_embeddings):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, images: torch.Tensor, *, need_attention: bool = False) -> ViTOutput:
        """Classify ``images (B, C, H, W)``: floating point, normalized; ``H`` and ``W`` multiples of
        ``patch_size`` (when they differ from ``image_size``, learned positions are interpolated).

        Args:
            images: ``(B, C, H, W)``.
            need_attention: also return every layer's attention weights ``(B, layers, heads, N, N)``.

        Returns:
            :class:`ViTOutput`.
        """
        self._check_images(images)
        x, grid = self.embeddings(images)
        weights = []
        for layer in self.layers:
            x, w = layer(x, need_weights=need_attention)
            weights.append(w)
        x = self.layernorm(x)
        pooled = x[:, 0] if self.config.pooling == "cls" else x.mean(dim=1)
        return ViTOutput(logits=self.classifier(pooled), attention=stack_layers(weights), grid=grid)

    def _check_images(self, images: object) -> None:
        c = self.config
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape (B, C, H, W); got {type(images).__name__}")
        if images.ndim != 4:
            hint = " (one image: add the batch dimension, images[None])" if images.ndim == 3 else ""
            raise ValueError(f"images must have shape (B, C, H, W) (4-D); got {tuple(images.shape)}{hint}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be floating point (normalized pixel values); got dtype {images.dtype}")
        _, channels, height, width = images.shape
        if channels != c.num_channels:
            raise ValueError(
                f"images have {channels} channels (shape {tuple(images.shape)}) but the model takes "
                f"num_channels={c.num_channels}"
            )
        if height % c.patch_size or width % c.patch_size or height == 0 or width == 0:
            raise ValueError(
                f"images are {height}x{width} (H x W); both must be positive multiples of patch_size={c.patch_size}"
            )


def _init_vit(module: nn.Module) -> None:
    """ViT's initialization: truncated ``N(0, 0.02²)`` weights, zero biases, LayerNorms 1 and 0."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
