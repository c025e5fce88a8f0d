"""Checkpoint files: atomic writes, round trips, keep-last-k, averaging, and no unpickling on load."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from qkv.models import TransformerConfig, TransformerSeq2Seq
from qkv.train import checkpoint_io as ckpt
from qkv.train.config import Config
from qkv.train.ddp import DistContext
from qkv.train.trainer import build_trainer, train
from qkv.train.translate import Translator


def tiny_model(seed: int) -> TransformerSeq2Seq:
    torch.manual_seed(seed)
    config = TransformerConfig(
        src_vocab_size=12, tgt_vocab_size=12, d_model=8, num_heads=2, encoder_layers=1, decoder_layers=1, ffn_dim=16
    )
    return TransformerSeq2Seq(config)  # tied output projection: one tensor, two state-dict keys


def trained_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return optimizer


def test_round_trip_of_model_optimizer_state_and_rng(tmp_path):
    model = tiny_model(0)
    optimizer = trained_optimizer(model)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    rng, scalars = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    path = ckpt.save_checkpoint(
        tmp_path / "c.safetensors",
        model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        state={"step": 3, "rng": scalars, "best": {"score": None}},
        rng=rng,
    )
    loaded = ckpt.load_checkpoint(path)
    assert loaded.state["step"] == 3 and loaded.state["best"] == {"score": None}
    restored = tiny_model(1)
    restored.load_state_dict(loaded.model)
    for (k, a), b in zip(model.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert restored.decoder.output_projection.weight is restored.decoder.embed_tokens.weight
    other = torch.optim.AdamW(restored.parameters(), lr=5.0)
    other.load_state_dict(loaded.optimizer)
    assert other.param_groups[0]["betas"] == (0.8, 0.95) and other.param_groups[0]["lr"] == 1e-3
    for state_a, state_b in zip(optimizer.state.values(), other.state.values(), strict=True):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[name], state_b[name])
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    assert ckpt.restore_rng(loaded.rng, loaded.state["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])


def test_a_crash_between_temp_write_and_replace_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "step_00000001.safetensors"
    first = tiny_model(0)
    ckpt.save_checkpoint(path, first.state_dict(), state={"step": 1})
    before = path.read_bytes()

    def crash(src, dst):
        assert ckpt.temp_path(path).exists()  # the new data was written, only the rename is missing
        raise OSError("simulated crash before os.replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint(path, tiny_model(1).state_dict(), state={"step": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    loaded = ckpt.load_checkpoint(path)
    assert loaded.state["step"] == 1
    assert all(torch.equal(loaded.model[k], v) for k, v in first.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_killed_write_leaves_only_a_temp_file_that_is_ignored_and_cleaned(tmp_path):
    ckpt.save_checkpoint(tmp_path / "step_00000004.safetensors", tiny_model(0).state_dict(), state={"step": 4})
    # What a SIGKILL during the write of step 8 leaves: a partial temporary file, no step_00000008.
    partial = ckpt.temp_path(tmp_path / "step_00000008.safetensors")
    partial.write_bytes(b"\x00" * 100)
    path, loaded = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step_00000004.safetensors" and loaded.state["step"] == 4
    assert ckpt.clean_temp_files(tmp_path) == [partial]
    assert not partial.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    ckpt.save_checkpoint(tmp_path / "step_00000004.safetensors", tiny_model(0).state_dict(), state={"step": 4})
    (tmp_path / "step_00000008.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="step_00000008.safetensors"):
        ckpt.load_checkpoint(tmp_path / "step_00000008.safetensors")
    assert ckpt.latest_checkpoint(tmp_path)[1].state["step"] == 4


def test_prune_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path / ckpt.STEP_FILE.format(step=step), tiny_model(step).state_dict())
    removed = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step_00000002.safetensors", "step_00000004.safetensors"]
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path)] == [6, 8]


def test_averaging_equals_the_elementwise_mean(tmp_path):
    models = [tiny_model(seed) for seed in (1, 2, 3)]
    paths = []
    for i, model in enumerate(models):
        paths.append(ckpt.save_checkpoint(tmp_path / f"step_{i:08d}.safetensors", model.state_dict()))
    averaged = ckpt.average_checkpoints(paths)
    states = [m.state_dict() for m in models]
    assert set(averaged) == set(states[0])
    for key in states[0]:
        expected = (states[0][key] + states[1][key] + states[2][key]) / 3
        torch.testing.assert_close(averaged[key], expected, rtol=0, atol=1e-7)
    # Tied weights stay one tensor, so the averaged model saves and loads like any other.
    assert averaged["decoder.output_projection.weight"] is averaged["decoder.embed_tokens.weight"]
    out = ckpt.save_checkpoint(tmp_path / "averaged.safetensors", averaged)
    model = tiny_model(0)
    model.load_state_dict(ckpt.load_checkpoint(out).model)


def test_averaging_refuses_different_models(tmp_path):
    a = ckpt.save_checkpoint(tmp_path / "a.safetensors", tiny_model(0).state_dict())
    b = ckpt.save_checkpoint(tmp_path / "b.safetensors", {"x": torch.zeros(2)})
    with pytest.raises(ckpt.CheckpointError, match="other parameters"):
        ckpt.average_checkpoints([a, b])


def test_loading_never_unpickles(tmp_path, monkeypatch, make_config):
    out = tmp_path / "run"
    config = Config.from_dict(make_config(out, training={"max_steps": 8, "valid_every": 8}))
    train(config, ctx=DistContext(), echo=lambda line: None)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for _, path in ckpt.step_checkpoints(out / "checkpoints"):
        ckpt.load_checkpoint(path)
    ckpt.load_checkpoint(out / "checkpoints" / ckpt.BEST_FILE)
    translator = Translator.load(out)
    assert len(translator.translate(["a b c"], beam=2)) == 1
    resumed = build_trainer(config, DistContext(), resume=True, echo=lambda line: None)
    assert resumed.step == 8 and resumed.run().step == 8


def test_flipped_bytes_in_a_checkpoint_are_caught_by_the_recorded_digests(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "step_00000004.safetensors", tiny_model(0).state_dict(), state={"step": 4})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # inside the last tensor's bytes; the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004\.safetensors is damaged: the SHA-256 of"):
        ckpt.load_checkpoint(path)


def test_find_resumable_names_the_checkpoints_it_skipped(tmp_path):
    ckpt.save_checkpoint(tmp_path / "step_00000004.safetensors", tiny_model(0).state_dict(), state={"step": 4})
    (tmp_path / "step_00000008.safetensors").write_bytes(b"not a checkpoint")
    found = ckpt.find_resumable(tmp_path)
    assert found.path == tmp_path / "step_00000004.safetensors" and found.checkpoint.state["step"] == 4
    assert [(p.name, "not a readable safetensors checkpoint" in why) for p, why in found.skipped] == [
        ("step_00000008.safetensors", True)
    ]
