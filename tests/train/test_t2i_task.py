"""The text-to-image task: its config sections, data preparation (built-in scenes and a captioned folder), the
flow-matching loss, validation, the faithfulness test, and a run killed and resumed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.train.tiny_tasks import prepared_task, tiny_config

from qkv.checks import ConfigError
from qkv.data.captioned_images import write_captioned_folder
from qkv.data.parallel import DataError
from qkv.data.scenes import build_scene_sets, caption_vocabulary
from qkv.models.diffusion import flow_loss, interpolate
from qkv.models.text_to_image import TextToImageModel
from qkv.train.config import Config
from qkv.train.ddp import DistContext
from qkv.train.tasks.text_to_image import T2I_FILE, FlowBatch, TextToImageTask, faithfulness

TINY_T2I: dict[str, Any] = {
    "task": "text_to_image",
    "data": {"corpus": "scenes", "train_size": 48, "valid_size": 8, "test_size": 4, "held_out_size": 4},
    "model": {"patch_size": 8, "d_model": 16, "num_heads": 2, "num_layers": 1, "ffn_dim": 32, "text_layers": 1},
    "training": {"batch_size": 8, "max_steps": 4, "valid_every": 100, "test_prompts": 2, "sample_steps": 2},
}


def t2i_config(out: Path, **sections: dict[str, Any]) -> Config:
    return tiny_config(TINY_T2I, out, output={"progress_bar": False}, **sections)


def prepared(out: Path, **sections: dict[str, Any]) -> TextToImageTask:
    return prepared_task(t2i_config(out, **sections), TextToImageTask)


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("data", {"corpus": None}, r"give either data.corpus \(built-in: scenes\) or data.folder and data.captions"),
        ("data", {"folder": "photos", "captions": "c.tsv"}, "or data.folder and data.captions .*, not both"),
        ("data", {"corpus": None, "folder": "photos"}, "data.folder and data.captions go together"),
        ("data", {"corpus": "mnist"}, "data.corpus must be one of 'scenes'; got 'mnist'"),
        ("data", {"held_out": [["purple", "circle"]]}, r"data.held_out\[0\]\[0\] must be one of 'red', 'green'"),
        ("data", {"held_out": [["red"]]}, r"data.held_out\[0\] must be a \[colour, shape\] pair"),
        ("data", {"max_objects": 3}, "data.max_objects must be 1 or 2; got 3"),
        ("data", {"image_size": 8}, "data.image_size must be an int >= 16; got 8"),
        ("model", {"num_heads": 3}, "model.d_model=16 must be a multiple of num_heads=3"),
        ("model", {"vocabulary": ["a"]}, "unknown key model.vocabulary; valid keys of model: patch_size"),
        ("training", {"guidance": -1}, "training.guidance must be a number >= 0; got -1"),
        ("training", {"prompt_dropout": 1.0}, r"training.prompt_dropout must be a probability in \[0, 1\); got 1.0"),
        ("training", {"sample_steps": 0}, "training.sample_steps must be an int >= 1; got 0"),
        ("training", {"early_stopping_metric": "faithfulness_seen"}, "early_stopping_metric must be one of loss"),
    ],
)
def test_bad_config_values_name_the_key(section: str, values: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        t2i_config(tmp_path, **{section: values})


def test_prepare_builds_the_scenes_and_records_the_corpus(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    assert {name: len(split) for name, split in task.splits.items()} == {
        "train": 48, "valid": 8, "test": 4, "held_out": 4,
    }  # fmt: skip
    expected = build_scene_sets(train=48, valid=8, test=4, held_out_test=4, seed=0)
    assert task.splits["train"].captions == expected["train"].captions
    torch.testing.assert_close(task.splits["valid"].images, expected["valid"].images)
    saved = json.loads((tmp_path / T2I_FILE).read_text())
    assert saved["corpus"]["corpus"] == "scenes" and saved["corpus"]["held_out"] == [["green", "triangle"]]
    assert saved["sampling"] == {"steps": 2, "guidance": 2.0}
    model = task.build_model()
    assert isinstance(model, TextToImageModel)
    assert model.config.vocabulary == caption_vocabulary() and model.config.image_size == 32
    longest = max(len(c.split()) for split in task.splits.values() for c in split.captions)
    assert model.config.max_prompt_words == longest
    assert "48 training images, 8 valid, 4 test, 4 held-out from the built-in scenes (3x32x32" in task.describe()


def test_batches_depend_only_on_their_index_and_refuse_another_stream(tmp_path: Path) -> None:
    task = prepared(tmp_path, training={"prompt_dropout": 0.5})
    batches = task.train_batches()
    first = [next(iter(batches)) for _ in range(3)]
    again = task.train_batches()
    again.load_state_dict({**batches.state_dict(), "batches": 2})
    resumed = next(iter(again))
    for a, b in zip(first[2], resumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0].noise, first[1].noise)
    assert 0 < float(torch.cat([b.drop for b in first]).float().mean()) < 1
    assert ((first[0].times > 0) & (first[0].times < 1)).all()
    with pytest.raises(DataError, match="belongs to a stream of 48 images, seed 0, batch size 4"):
        again.load_state_dict({"batches": 1, "seed": 0, "images": 48, "batch_size": 4})


def test_loss_is_the_summed_flow_matching_loss_of_the_batch(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.train_batches()))
    result = task.loss(model, batch, torch.device("cpu"))
    x_t = interpolate(batch.images, batch.noise, batch.times)
    velocity = model(x_t, batch.times, batch.tokens, batch.lengths, drop=batch.drop).velocity
    assert result.tokens == 8
    torch.testing.assert_close(result.loss, flow_loss(velocity, batch.images, batch.noise).sum())


def test_validation_is_the_same_at_every_call_and_lower_for_a_better_model(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    torch.manual_seed(0)
    model = task.build_model().eval()
    first = task.validate(model, torch.device("cpu"), step=1).metrics["loss"]
    assert task.validate(model, torch.device("cpu"), step=2).metrics["loss"] == first
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for batch in [b for b, _ in zip(task.train_batches(), range(30), strict=False)]:
        model.train()
        loss = task.loss(model, batch, torch.device("cpu")).loss / 8
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert task.validate(model.eval(), torch.device("cpu"), step=3).metrics["loss"] < first


class Renderer:
    """A stand-in generator that draws each prompt's scene exactly (or, ``blank``, draws nothing)."""

    def __init__(self, task: TextToImageTask, *, blank: bool = False) -> None:
        self.config = task.build_model().config
        splits = task.splits
        self.images = {c: img for s in splits.values() for c, img in zip(s.captions, s.images, strict=True)}
        self.blank = blank

    def generate(self, prompts: list[str], noise: torch.Tensor, **kwargs: Any) -> Any:
        images = torch.stack([self.images[p] for p in prompts])
        return type("Generation", (), {"images": torch.full_like(images, -1.0) if self.blank else images})()


def test_faithfulness_judges_each_image_against_its_scene(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    scenes = task.splits["test"].scenes
    assert scenes is not None
    right = faithfulness(Renderer(task), scenes, torch.device("cpu"), steps=2, guidance=1.0, seed=0)  # type: ignore[arg-type]
    assert right == [[]] * len(scenes)
    wrong = faithfulness(Renderer(task, blank=True), scenes, torch.device("cpu"), steps=2, guidance=1.0, seed=0)  # type: ignore[arg-type]
    assert all(reasons and "found 0" in reasons[0] for reasons in wrong)


def test_score_test_reports_faithfulness_on_seen_and_held_out_prompts(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    torch.manual_seed(0)
    found = task.score_test(task.build_model().eval(), torch.device("cpu"))
    assert found is not None
    assert set(found.metrics) == {"loss", "faithfulness_seen", "faithfulness_held_out"}
    assert all(0 <= found.metrics[k] <= 1 for k in ("faithfulness_seen", "faithfulness_held_out"))
    assert any("held-out combinations" in line for line in found.lines)


def test_a_captioned_folder_is_split_and_its_words_are_the_vocabulary(tmp_path: Path) -> None:
    scenes = build_scene_sets(train=20, valid=0, test=0, held_out_test=0, seed=3)["train"]
    write_captioned_folder(scenes.images, scenes.captions, tmp_path / "photos")
    data = {"corpus": None, "folder": str(tmp_path / "photos"), "captions": str(tmp_path / "photos" / "captions.tsv")}
    task = prepared(tmp_path / "out", data={**data, "valid_fraction": 0.2, "test_fraction": 0.1})
    assert {name: len(split) for name, split in task.splits.items()} == {"valid": 4, "test": 2, "train": 14}
    assert task.vocabulary == sorted({w for c in scenes.captions for w in c.split()})
    found = task.score_test(task.build_model().eval(), torch.device("cpu"))
    assert found is not None and set(found.metrics) == {"loss"}  # no checker for the user's images


@pytest.mark.parametrize(
    "tsv, message",
    [
        ("00000.png\ta red circle\nmissing.png\ta blue square\n", "line 2"),
        ("00000.png a red circle\n", "line 1 has 0 tabs; expected exactly one"),
        ("00000.png\t\n", "the caption of '00000.png' is empty"),
        ("broken.png\ta red circle\n", "broken.png"),
    ],
)
def test_caption_file_errors_name_the_line_through_the_task(tmp_path: Path, tsv: str, message: str) -> None:
    scenes = build_scene_sets(train=1, valid=0, test=0, held_out_test=0, seed=3)["train"]
    write_captioned_folder(scenes.images, scenes.captions, tmp_path / "photos")
    (tmp_path / "photos" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "photos" / "bad.tsv").write_text(tsv)
    data = {"corpus": None, "folder": str(tmp_path / "photos"), "captions": str(tmp_path / "photos" / "bad.tsv")}
    with pytest.raises(DataError, match=message):
        prepared(tmp_path / "out", data=data)


def test_shard_under_ddp_takes_every_world_size_th_row(tmp_path: Path) -> None:
    task = prepared(tmp_path)
    task.ctx = DistContext(rank=1, world_size=2, local_rank=1)
    batch = FlowBatch(*(torch.arange(5.0) for _ in FlowBatch._fields))
    part, weight = task.shard(batch)
    assert part.images.tolist() == [1.0, 3.0] and weight == 1.0


def test_a_t2i_run_killed_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from qkv.train.trainer import train

    def run(out: Path, steps: int, *, resume: bool = False) -> None:
        config = t2i_config(
            out, training={"max_steps": steps, "lr": 3e-3, "warmup_steps": 2, "batch_size": 20, "test_prompts": 0}
        )  # 48 images: epochs of 3 batches, so the resumed part crosses an epoch boundary
        config.output.checkpoint_every, config.output.export = 2, "last"
        train(config, resume=resume, echo=lambda line: None)

    run(tmp_path / "whole", 5)
    run(tmp_path / "killed", 2)
    run(tmp_path / "killed", 5, resume=True)
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)
    assert "resumed from" in (tmp_path / "killed" / "train.log").read_text(encoding="utf-8")


def test_flip_mirrors_half_the_images_and_swaps_left_and_right(tmp_path: Path) -> None:
    task = prepared(tmp_path, data={"flip": True}, training={"prompt_dropout": 0.0})
    plain = prepared(tmp_path / "plain")
    flipped_batch, plain_batch = next(iter(task.train_batches())), next(iter(plain.train_batches()))
    left, right = task.vocabulary.index("left"), task.vocabulary.index("right")
    mirrored = [i for i in range(8) if not torch.equal(flipped_batch.images[i], plain_batch.images[i])]
    assert 0 < len(mirrored) < 8
    for i in range(8):
        image, tokens = plain_batch.images[i], plain_batch.tokens[i]
        if i in mirrored:
            image = image.flip(-1)
            tokens = torch.where(tokens == left, right, torch.where(tokens == right, left, tokens))
        assert torch.equal(flipped_batch.images[i], image) and torch.equal(flipped_batch.tokens[i], tokens)


def test_flip_needs_left_and_right_in_the_captions(tmp_path: Path) -> None:
    scenes = build_scene_sets(train=10, valid=0, test=0, held_out_test=0, seed=3, max_objects=1)["train"]
    write_captioned_folder(scenes.images, scenes.captions, tmp_path / "photos")
    data = {"corpus": None, "folder": str(tmp_path / "photos"), "captions": str(tmp_path / "photos" / "captions.tsv")}
    task = prepared(tmp_path / "out", data={**data, "flip": True})
    with pytest.raises(ConfigError, match="data.flip swaps the words 'left' and 'right'"):
        task.train_batches()


def test_the_demo_config_is_the_built_in_one_and_bounds_its_time() -> None:
    from qkv.train.config import load_config

    config = load_config("t2i_demo")
    assert config.task == "text_to_image" and config.data.corpus == "scenes" and config.data.flip
    assert config.model.patch_size == 4 and config.training.max_steps == 5600
    assert config.model.pooled_text and config.model.time_shift == 5 and config.task_training.shifted_times == 0.8
    assert config.task_training.grounding == 0.1 and config.task_training.grounding_from == 0.5
    assert config.training.max_time is not None and config.training.max_time <= 600


def test_a_share_of_the_training_times_is_shifted_toward_the_noise(tmp_path: Path) -> None:
    from qkv.models.diffusion import shift_times

    shifted = prepared(tmp_path, model={"time_shift": 5.0}, training={"shifted_times": 0.5, "batch_size": 8})
    plain = prepared(tmp_path / "plain", training={"batch_size": 8})
    a, b = next(iter(shifted.train_batches())), next(iter(plain.train_batches()))
    assert torch.equal(a.noise, b.noise)  # the same draws; only the times of the first half move
    torch.testing.assert_close(a.times[:4], shift_times(b.times[:4], 5.0))
    torch.testing.assert_close(a.times[4:], b.times[4:])
    assert bool((a.times[:4] > b.times[:4]).all())
    every = prepared(tmp_path / "every", model={"time_shift": 5.0}, training={"batch_size": 8})
    torch.testing.assert_close(next(iter(every.train_batches())).times, shift_times(b.times, 5.0))
