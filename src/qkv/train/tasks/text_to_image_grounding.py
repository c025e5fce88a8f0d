"""Grounding in text-to-image training: each object word's cross-attention pulled onto its object.

TokenCompose's token loss (Wang et al., CVPR 2024): the built-in scenes know where every object is, so the
patches each size, colour and shape word of a caption names are known; the loss is, for each such word,
``(1 - its attention inside the object / its attention over the image)²``, the attention being the
cross-attention map the word maps show (mean over layers and heads)::

    targets = word_targets(scenes, words=S, image_size=32, patch_size=4)  # (N, S, h, w): each word's object
    loss = flow_loss(...) + weight * grounding_loss(out.cross_attention, targets[rows], skip)  # (B,)

A target is the share of each patch the object covers (a patch the object fills counts fully, one it
touches counts a little), so the loss is lowest when a word's attention sits on the object's inner patches.
Words that name no object (``a``, ``is``, the relation) and dropped prompts add nothing, and the task skips
images noised to less than ``training.grounding_from``: without grounding, a shape word's attention peaks
just outside its object's edge, where the word decides whether a pixel is filled, and grounding the last
steps too (where those edges are drawn) cost more of the drawing's faithfulness.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qkv.data.scene_captions import object_word_positions
from qkv.data.scenes import Scene, object_mask


def word_targets(scenes: Sequence[Scene], words: int, image_size: int, patch_size: int) -> torch.Tensor:
    """``(N, words, h, w)`` float32: for word ``s`` of scene ``n``'s caption, the share of each patch covered by
    the object the word names (zeros for a word that names none, and past the caption's end)."""
    side = image_size // patch_size
    targets = np.zeros((len(scenes), words, side, side), dtype=np.float32)
    for n, scene in enumerate(scenes):
        coverage = [
            object_mask(obj, image_size).reshape(side, patch_size, side, patch_size).mean(axis=(1, 3))
            for obj in scene.objects
        ]
        for position, _, obj in object_word_positions(scene.caption):
            targets[n, position] = coverage[obj]
    return torch.from_numpy(targets)


def grounding_loss(cross_attention: torch.Tensor, targets: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss per image, ``(B,)``: the mean over the object words of ``(1 - inside)²``.

    Args:
        cross_attention: ``(B, layers, heads, N, 1 + S)``, the denoiser's weights (column 0: the start token).
        targets: ``(B, S, h, w)`` with ``h·w = N``, from :func:`word_targets` (flipped with their images).
        skip: ``(B,)`` bool, the images that add nothing (0): those whose prompt was replaced by the null prompt
            (no words to ground) and those the task leaves out (noised less than ``training.grounding_from``).
    """
    maps = cross_attention[..., 1:].mean(dim=(1, 2)).transpose(1, 2)  # (B, S, N)
    weights = targets.flatten(2).to(maps.dtype)  # (B, S, N)
    inside = (maps * weights).sum(-1) / maps.sum(-1).clamp_min(1e-12)
    named = (weights.sum(-1) > 0) & ~skip[:, None]
    return ((1 - inside).pow(2) * named).sum(1) / named.sum(1).clamp_min(1)
