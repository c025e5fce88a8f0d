"""Training when things go wrong: unwritable output, a full disk, damaged checkpoints, Ctrl-C, leftovers."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from qkv.cli import main
from qkv.train import checkpoint_io as ckpt
from qkv.train.trainer import Trainer

SHORT = {"training": {"max_steps": 8, "valid_every": 8}, "output": {"checkpoint_every": 4, "keep_last": 3}}


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``qkv train`` wrote to stderr (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_an_unwritable_output_dir_is_refused_before_training(tmp_path, write_config, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = write_config(blocker / "run", **SHORT)
    assert main(["train", str(config)]) == 2
    assert error_line(capsys).startswith(f"qkv train: error: output.dir {blocker / 'run'} cannot be written: ")


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_file(tmp_path, write_config, capsys, monkeypatch):
    real_write = ckpt.atomic_write

    def full_disk_from_step_8(path, data):
        if Path(path).name == "step_00000008.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", full_disk_from_step_8)
    assert main(["train", str(write_config(tmp_path / "run", **SHORT))]) == 2
    line = error_line(capsys)
    assert "cannot write checkpoint" in line and "step_00000008.safetensors: No space left on device (ENOSPC)" in line
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path / "run" / "checkpoints")] == [4]


def test_resume_refuses_when_no_checkpoint_can_be_read(tmp_path, write_config, capsys):
    config = write_config(tmp_path / "run", **SHORT)
    assert main(["train", str(config)]) == 0
    damaged = [p for _, p in ckpt.step_checkpoints(tmp_path / "run" / "checkpoints")]
    for path in damaged:
        path.write_bytes(b"damaged")
    capsys.readouterr()
    assert main(["train", str(config), "--resume"]) == 2
    line = error_line(capsys)
    assert "cannot resume: no checkpoint" in line and all(p.name in line for p in damaged)
    assert all(p.read_bytes() == b"damaged" for p in damaged)  # nothing was overwritten


def test_resume_reports_the_damaged_newest_checkpoint_it_skipped(tmp_path, write_config):
    config = write_config(tmp_path / "run", **SHORT)
    assert main(["train", str(config)]) == 0
    newest = ckpt.step_checkpoints(tmp_path / "run" / "checkpoints")[-1][1]
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert main(["train", str(config), "--resume"]) == 0
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert f"warning: --resume skipped {newest}, which cannot be read ({newest} is damaged" in log
    assert "resumed from" in log and "step_00000004.safetensors at step 4" in log


def test_ctrl_c_stops_with_one_line_saying_where_resume_continues(tmp_path, write_config, capsys, monkeypatch):
    real_update = Trainer._update

    def interrupt_at_step_6(self, batches):
        if self.step == 5:
            raise KeyboardInterrupt
        return real_update(self, batches)

    monkeypatch.setattr(Trainer, "_update", interrupt_at_step_6)
    config = write_config(tmp_path / "run", **SHORT)
    assert main(["train", str(config)]) == 130
    line = error_line(capsys)
    assert line.startswith("qkv train: error: interrupted at step 5; --resume continues from ")
    assert line.endswith(f"step_00000004.safetensors (step 4) (qkv train {config} --resume)")
    monkeypatch.undo()
    assert main(["train", str(config), "--resume"]) == 0


def test_an_export_directory_left_by_a_killed_run_is_removed(tmp_path, write_config):
    config = write_config(tmp_path / "run", **SHORT)
    assert main(["train", str(config)]) == 0
    (tmp_path / "run" / ".export-abc123").mkdir()  # what a kill during the export leaves
    assert main(["train", str(config), "--resume"]) == 0
    assert not (tmp_path / "run" / ".export-abc123").exists()
    assert "removed 1 unfinished export" in (tmp_path / "run" / "train.log").read_text(encoding="utf-8")


def test_resume_with_replaced_tokenizers_names_the_mismatch(tmp_path, write_config, capsys):
    from qkv.data.tokenizer import CharTokenizer

    config = write_config(tmp_path / "run", **SHORT)
    assert main(["train", str(config)]) == 0
    CharTokenizer.train(["ab"]).save(tmp_path / "run" / "tokenizer.json")  # another run's, smaller vocabulary
    capsys.readouterr()
    assert main(["train", str(config), "--resume"]) == 2
    line = error_line(capsys)
    assert "it does not fit the model built from the config and the tokenizers" in line
    assert "were the tokenizers replaced?" in line
