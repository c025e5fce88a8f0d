"""Grounding in text-to-image training: each object word's target is its object's patches, the loss is zero when
the word attends only inside its object and grows as it attends elsewhere, and the task adds it to the flow loss
(with the targets mirrored with their images)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.train.test_t2i_task import prepared

from qkv.checks import ConfigError
from qkv.data.captioned_images import write_captioned_folder
from qkv.data.scene_captions import object_word_positions
from qkv.data.scenes import build_scene_sets, render
from qkv.models.diffusion import flow_loss, interpolate
from qkv.train.task import BatchLoss
from qkv.train.tasks.text_to_image import FlowBatch, TextToImageTask
from qkv.train.tasks.text_to_image_grounding import grounding_loss, word_targets

SCENES = build_scene_sets(train=40, valid=0, test=0, held_out_test=0, seed=4)["train"].scenes


def test_each_object_word_targets_the_share_of_each_patch_its_object_covers() -> None:
    targets = word_targets(SCENES, 12, 32, 4)
    assert targets.shape == (40, 12, 8, 8)
    for n, scene in enumerate(SCENES):
        _, masks = render(scene, 32)
        named = {position: obj for position, _, obj in object_word_positions(scene.caption)}
        for position in range(12):
            if position not in named:
                assert not targets[n, position].any()
                continue
            mask = masks[named[position]]
            torch.testing.assert_close(targets[n, position].sum() * 16, torch.tensor(float(mask.sum())))
            full = mask.reshape(8, 4, 8, 4).all(axis=(1, 3))
            assert bool((targets[n, position][torch.from_numpy(full)] == 1).all())
    assert any(len(s.objects) == 2 for s in SCENES)


def attention_on(targets: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``(B, 1, 1, N, 1 + S)`` cross-attention: each patch's weights split between the start token and the words
    whose ``where (B, S, h, w)`` holds it, in proportion to ``where``."""
    words = where.flatten(2).transpose(1, 2)  # (B, N, S)
    start = torch.ones_like(words[..., :1])
    weights = torch.cat([start, words], dim=-1)
    return (weights / weights.sum(-1, keepdim=True))[:, None, None]


def test_the_loss_is_least_on_the_object_and_grows_as_the_word_attends_elsewhere() -> None:
    targets = word_targets(SCENES, 12, 32, 4)
    drop = torch.zeros(40, dtype=torch.bool)
    peak = targets.flatten(2).amax(-1)  # (B, S): the most any patch is covered
    best = ((targets == peak[..., None, None]) & (targets > 0)).float()  # each word on its fullest patches
    named = peak > 0
    least = ((1 - peak).pow(2) * named).sum(1) / named.sum(1)
    torch.testing.assert_close(grounding_loss(attention_on(targets, best), targets, drop), least)
    assert float(least.min()) == 0.0  # a large square fills whole patches
    everywhere = named[..., None, None].float().expand_as(targets)
    spread = grounding_loss(attention_on(targets, everywhere), targets, drop)
    elsewhere = grounding_loss(attention_on(targets, everywhere * (targets == 0)), targets, drop)
    assert bool((least < spread).all()) and bool((spread < elsewhere).all())
    torch.testing.assert_close(elsewhere, torch.ones(40))
    dropped = grounding_loss(attention_on(targets, everywhere), targets, torch.ones(40, dtype=torch.bool))
    torch.testing.assert_close(dropped, torch.zeros(40))


def test_the_loss_follows_a_closed_form_on_one_word() -> None:
    targets = torch.zeros(1, 1, 2, 2)
    targets[0, 0, 0] = torch.tensor([1.0, 0.5])  # the object fills patch 0 and half of patch 1
    weights = torch.tensor([0.2, 0.4, 0.1, 0.3])  # the word's attention from the 4 patches
    attention = torch.stack([1 - weights, weights], dim=-1)[None, None, None]  # (1, 1, 1, 4, 2)
    inside = (0.2 * 1 + 0.4 * 0.5) / 1.0
    torch.testing.assert_close(
        grounding_loss(attention, targets, torch.zeros(1, dtype=torch.bool)), torch.tensor([(1 - inside) ** 2])
    )


def loss_by_hand(task: TextToImageTask, batch: FlowBatch) -> tuple[BatchLoss, torch.Tensor, torch.Tensor]:
    """The task's loss for a fresh model (seed 0), and that model's summed flow loss and cross-attention
    ``(B, layers, heads, N, 1 + S)`` for the batch, computed here."""
    torch.manual_seed(0)
    model = task.build_model()
    result = task.loss(model, batch, torch.device("cpu"))
    out = model(interpolate(batch.images, batch.noise, batch.times), batch.times, batch.tokens, batch.lengths,
                drop=batch.drop, need_attention=True)  # fmt: skip
    assert out.cross_attention is not None
    return result, flow_loss(out.velocity, batch.images, batch.noise).sum(), out.cross_attention


def test_the_task_adds_the_weighted_loss_and_mirrors_the_targets_with_the_images(tmp_path: Path) -> None:
    grounded = prepared(tmp_path, data={"flip": True}, model={"patch_size": 4}, training={"grounding": 0.5})
    plain = prepared(tmp_path / "plain", data={"flip": True}, model={"patch_size": 4})
    batch, plain_batch = next(iter(grounded.train_batches())), next(iter(plain.train_batches()))
    assert plain_batch.targets.numel() == 0
    for field in ("images", "tokens", "noise", "times", "drop"):
        assert torch.equal(getattr(batch, field), getattr(plain_batch, field))
    rows = grounded.train_batches().rows(0)
    scenes = grounded.splits["train"].scenes
    assert scenes is not None
    unflipped = word_targets([scenes[i] for i in rows], batch.tokens.shape[1], 32, 4)
    mirrored = [i for i in range(8) if not torch.equal(batch.images[i], grounded.splits["train"].images[rows[i]])]
    assert 0 < len(mirrored) < 8
    for i in range(8):
        expected = unflipped[i].flip(-1) if i in mirrored else unflipped[i]
        assert torch.equal(batch.targets[i], expected)
    result, flow, attention = loss_by_hand(grounded, batch)
    extra = grounding_loss(attention, batch.targets, batch.drop).sum()
    assert float(extra.detach()) > 0
    torch.testing.assert_close(result.loss, flow + 0.5 * extra)
    assert result.nll == pytest.approx(float(flow.detach()))


def test_grounding_from_leaves_the_images_noised_less_out_of_the_loss(tmp_path: Path) -> None:
    task = prepared(tmp_path, model={"patch_size": 4}, training={"grounding": 2.0, "grounding_from": 0.5})
    batch = next(iter(task.train_batches()))
    late = batch.times < 0.5
    assert 0 < int(late.sum()) < 8
    result, flow, attention = loss_by_hand(task, batch)
    every = grounding_loss(attention, batch.targets, batch.drop)
    counted = grounding_loss(attention, batch.targets, batch.drop | late)
    assert bool((counted[late] == 0).all()) and torch.equal(counted[~late], every[~late])
    assert float(every[late].detach().sum()) > 0
    torch.testing.assert_close(result.loss, flow + 2.0 * counted.sum())


def test_training_on_the_loss_moves_the_attention_onto_the_objects(tmp_path: Path) -> None:
    task = prepared(tmp_path, model={"patch_size": 4}, training={"grounding": 1.0, "prompt_dropout": 0.0})
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.train_batches()))
    x_t = interpolate(batch.images, batch.noise, batch.times)

    def loss() -> torch.Tensor:
        out = model(x_t, batch.times, batch.tokens, batch.lengths, need_attention=True)
        assert out.cross_attention is not None
        return grounding_loss(out.cross_attention, batch.targets, batch.drop).mean()

    before = float(loss().detach())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert float(loss().detach()) < 0.5 * before


def test_grounding_needs_the_built_in_scenes(tmp_path: Path) -> None:
    scenes = build_scene_sets(train=10, valid=2, test=0, held_out_test=0, seed=3, max_objects=1)
    write_captioned_folder(scenes["train"].images, scenes["train"].captions, tmp_path / "photos")
    data = {"corpus": None, "folder": str(tmp_path / "photos"), "captions": str(tmp_path / "photos" / "captions.tsv")}
    task = prepared(tmp_path / "out", data=data, training={"grounding": 0.1})
    with pytest.raises(ConfigError, match=r"training.grounding \(0.1\) .* only the built-in scenes know"):
        task.train_batches()
    with pytest.raises(ConfigError, match="training.grounding must be a number >= 0; got -1"):
        prepared(tmp_path / "neg", training={"grounding": -1})
    with pytest.raises(ConfigError, match=r"training.grounding_from must be a number in \[0, 1\]; got 1.5"):
        prepared(tmp_path / "late", training={"grounding_from": 1.5})
