"""Kill -9 in the middle of ``qkv train``, resume, and end where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from qkv.cli import main
from qkv.train.checkpoint_io import TEMP_MARK, load_checkpoint, step_checkpoints

MAX_STEPS = 60
SECTIONS = {"training": {"max_steps": MAX_STEPS}, "output": {"checkpoint_every": 4, "keep_last": 2}}


def wait_for_checkpoint(proc: subprocess.Popen, directory, step: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        found = step_checkpoints(directory)
        if found and found[-1][0] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"qkv train ended (status {proc.returncode}) before step {step}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint of step {step} after {timeout} s")
        time.sleep(0.005)


def test_sigkilled_training_resumes_to_the_same_parameters(tmp_path, write_config):
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    config = write_config(killed_dir, name="killed.yaml", **SECTIONS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkv", "train", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        wait_for_checkpoint(proc, killed_dir / "checkpoints", 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = step_checkpoints(killed_dir / "checkpoints")[-1][0]
    assert 8 <= killed_at < MAX_STEPS and not (killed_dir / "model.safetensors").exists()

    assert main(["train", str(config), "--resume"]) == 0
    steps = [s for s, _ in step_checkpoints(killed_dir / "checkpoints")]
    assert steps[-1] == MAX_STEPS and len(steps) == 2
    log = (killed_dir / "train.log").read_text(encoding="utf-8")
    assert "resumed from" in log and f"step {MAX_STEPS}/{MAX_STEPS}" in log
    leftovers = [p for p in killed_dir.rglob("*") if TEMP_MARK in p.name or p.name.startswith(".export-")]
    assert leftovers == []
    for _, path in step_checkpoints(killed_dir / "checkpoints"):
        load_checkpoint(path)  # every file left is complete

    # The same config run without interruption: the data position and every RNG state were restored, so the
    # parameters (and the optimizer's moments) are those of the resumed run.
    assert main(["train", str(write_config(reference_dir, name="reference.yaml", **SECTIONS))]) == 0
    name = f"step_{MAX_STEPS:08d}.safetensors"
    resumed = load_checkpoint(killed_dir / "checkpoints" / name)
    reference = load_checkpoint(reference_dir / "checkpoints" / name)
    assert resumed.model.keys() == reference.model.keys()
    for key, t in reference.model.items():
        torch.testing.assert_close(resumed.model[key], t, rtol=0, atol=1e-6, msg=key)
    for index, entries in reference.optimizer["state"].items():
        for key, t in entries.items():
            torch.testing.assert_close(resumed.optimizer["state"][index][key], t, rtol=0, atol=1e-6)
    assert resumed.state["batches"] == reference.state["batches"]


def test_training_into_a_directory_with_checkpoints_needs_resume(tmp_path, write_config, capsys):
    config = write_config(tmp_path / "run", training={"max_steps": 4, "valid_every": 4})
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config)]) == 2
    assert "already has training checkpoints" in capsys.readouterr().err
    # A finished run resumed is already done: nothing trains, the step count stays.
    assert main(["train", str(config), "--resume"]) == 0
    assert [s for s, _ in step_checkpoints(tmp_path / "run" / "checkpoints")] == [4]


def test_resume_refuses_another_model(tmp_path, write_config, capsys):
    config = write_config(tmp_path / "run", training={"max_steps": 4, "valid_every": 4})
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    assert main(["train", str(config), "--resume", "--set", "model.d_model=32"]) == 2
    assert "cannot resume: model.d_model was 16" in capsys.readouterr().err
