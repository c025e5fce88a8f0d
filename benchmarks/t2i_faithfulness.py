"""Text to image: prompt faithfulness, the word-map pointing game and sampling speed of a trained model.

The model is a directory ``qkv train`` wrote for ``task: text_to_image`` on the built-in scenes (``qkv demo t2i``
writes ``runs/demo-t2i``); its ``text_to_image.json`` says how to rebuild the test splits from their seed.

* **Faithfulness**: one image per prompt (noise seeded by ``--seed``, ``--steps`` Euler steps, ``--guidance``;
  defaults: the model's) for the first ``--prompts`` scenes of the ``test`` split (colour-shape combinations
  seen in training) and of the ``held_out`` split (combinations never seen, e.g. every green triangle), judged
  by :func:`qkv.data.scene_checker.judge` (a detector built from the renderer's palette and shapes, not a
  model): right when every object is there with its colour and shape (and size when named), nothing else
  is, and the relation holds. Reported overall and for one- and two-object prompts.
* **Pointing game**: for each object word of a prompt (its colour, shape and size words; not ``a``, ``is``
  or the relation), the maximum of the word's map (cross-attention averaged over heads, layers and sampling
  steps, bilinearly upsampled to the pixels; :mod:`qkv.viz.word_maps`) must fall inside the object's mask.
  On generated images, only objects the checker found with the right colour and shape count, with the
  detection's mask; on the rendered test scenes (``ground_truth``), with the renderer's masks, the maps
  read from the model denoising the scene noised to t = 0.3, 0.5, 0.7 (:meth:`TextToImage.attend`).
* **Speed**: images/s of sampling (prompt encoded once, ``--steps`` steps with guidance, i.e. two denoiser
  rows per image and step) for batches of 1 and ``--batch`` prompts, the median of ``--repeats`` rounds after
  one warm-up, on ``--threads`` threads (default 1: :func:`qkv.cli.text_to_image.one_thread` says why).

Usage::

    qkv demo t2i
    python benchmarks/t2i_faithfulness.py --model runs/demo-t2i --json bench-results/t2i_faithfulness.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkv.bench.runner import cpu_model
from qkv.data.scene_captions import object_word_positions
from qkv.data.scene_checker import judge
from qkv.data.scenes import COLOURS, SHAPES, Scene, parse_caption, render
from qkv.train.t2i_inference import TextToImage
from qkv.viz.word_maps import pointing_hit, upsample_maps, word_maps

CHUNK = 50  # prompts generated at once


def word_kind(word: str) -> str:
    return "colour" if word in COLOURS else "shape" if word in SHAPES else "size"


def generate(t2i: TextToImage, scenes: list[Scene], args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 3, H, W) in [-1, 1], cross_attention (N, layers, heads, patches, S_max))`` of the captions."""
    c = t2i.model.config
    noise = torch.randn(
        (len(scenes), c.num_channels, c.image_size, c.image_size), generator=torch.Generator().manual_seed(args.seed)
    )
    images, attention = [], []
    for start in range(0, len(scenes), CHUNK):
        part = scenes[start : start + CHUNK]
        out = t2i.model.generate([s.caption for s in part], noise[start : start + len(part)], steps=args.steps,
                                 guidance=args.guidance, need_attention=True)  # fmt: skip
        assert out.cross_attention is not None
        width = max(len(s.caption.split()) for s in scenes)
        images.append(out.images)
        attention.append(torch.nn.functional.pad(out.cross_attention, (0, width - out.cross_attention.shape[-1])))
    return torch.cat(images), torch.cat(attention)


class Pointing:
    """Hits and trials of the pointing game, by word kind."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = defaultdict(int)
        self.trials: dict[str, int] = defaultdict(int)

    def add(
        self, cross_attention: torch.Tensor, caption: str, masks: list[np.ndarray | None], grid: tuple[int, int]
    ) -> None:
        words = caption.split()
        maps = upsample_maps(word_maps(cross_attention[..., : len(words)], grid), masks_size(masks))
        for position, word, obj in object_word_positions(caption):
            mask = masks[obj]
            if mask is None:
                continue
            hit = pointing_hit(maps[position], mask)
            for key in ("all", word_kind(word)):
                self.trials[key] += 1
                self.hits[key] += hit

    def report(self) -> dict[str, Any]:
        return {
            key: {"hits": self.hits[key], "trials": self.trials[key], "rate": self.hits[key] / self.trials[key]}
            for key in sorted(self.trials)
        }


def masks_size(masks: list[np.ndarray | None]) -> tuple[int, int]:
    found = next(m for m in masks if m is not None)
    return int(found.shape[0]), int(found.shape[1])


def measure_split(t2i: TextToImage, scenes: list[Scene], args: argparse.Namespace) -> dict[str, Any]:
    """Faithfulness and the pointing game on generated images of one split."""
    images, attention = generate(t2i, scenes, args)
    right: dict[str, list[bool]] = defaultdict(list)
    pointing, failures = Pointing(), []
    for image, weights, scene in zip(images, attention, scenes, strict=True):
        verdict = judge(image, scene)
        kind = f"{len(scene.objects)}_object"
        right["all"].append(verdict.correct)
        right[kind].append(verdict.correct)
        if not verdict.correct and len(failures) < 5:
            failures.append({"prompt": scene.caption, "reasons": verdict.reasons})
        spec = parse_caption(scene.caption)
        masks = [
            found.mask if found is not None and (found.colour, found.shape) == (want.colour, want.shape) else None
            for want, found in zip(spec.objects, verdict.objects, strict=True)
        ]
        if any(m is not None for m in masks):
            pointing.add(weights, scene.caption, masks, t2i.model.config.grid)
    faithful = {key: {"right": sum(v), "prompts": len(v), "rate": sum(v) / len(v)} for key, v in right.items()}
    return {"faithfulness": faithful, "pointing_generated": pointing.report(), "failures": failures}


def ground_truth_pointing(t2i: TextToImage, scenes: list[Scene]) -> dict[str, Any]:
    """The pointing game on the rendered scenes, with the renderer's masks."""
    pointing = Pointing()
    size = t2i.model.config.image_size
    for scene in scenes:
        pixels, masks = render(scene, size)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
        pointing.add(t2i.attend(image, scene.caption), scene.caption, list(masks), t2i.model.config.grid)
    return pointing.report()


def speed(t2i: TextToImage, scenes: list[Scene], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Sampling images/s for batches of 1 and ``args.batch`` prompts."""
    c = t2i.model.config
    results = []
    for batch in sorted({1, args.batch}):
        prompts = [s.caption for s in scenes[:batch]]
        noise = torch.randn(
            batch, c.num_channels, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0)
        )
        t2i.model.generate(prompts, noise, steps=args.steps, guidance=args.guidance)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            t2i.model.generate(prompts, noise, steps=args.steps, guidance=args.guidance)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results.append({"batch": batch, "times_s": times, "median_s": median, "images_per_s": batch / median,
                        "best_images_per_s": batch / min(times)})  # fmt: skip
    return results


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    t2i = TextToImage.load(args.model)
    args.steps = t2i.steps if args.steps is None else args.steps
    args.guidance = t2i.guidance if args.guidance is None else args.guidance
    test, held_out = t2i.scenes("test")[: args.prompts], t2i.scenes("held_out")[: args.prompts]
    with torch.no_grad():
        seen = measure_split(t2i, test, args)
        unseen = measure_split(t2i, held_out, args)
        truth = ground_truth_pointing(t2i, test)
        timing = speed(t2i, test, args)
    c = t2i.model.config
    return {
        "benchmark": "t2i_faithfulness",
        "config": {**vars(args), "json": str(args.json), "model": str(args.model)},
        "model": {
            "parameters": sum(p.numel() for p in t2i.model.parameters()),
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "d_model": c.d_model,
            "num_layers": c.num_layers,
        },  # fmt: skip
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
        },  # fmt: skip
        "seen": seen,
        "held_out": unseen,
        "pointing_ground_truth": truth,
        "speed": timing,
    }


def _rate(cell: dict[str, Any] | None, count: str) -> str:
    return "-" if cell is None else f"{cell['rate']:.1%} ({cell['hits' if 'hits' in cell else 'right']}/{cell[count]})"


def table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"{c['model']}: {c['steps']} Euler steps, guidance {c['guidance']:g}, seed {c['seed']}",
        "",
        "| split | faithful (all) | one object | two objects | pointing, generated | pointing, rendered |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("seen", "held_out"):
        f = report[name]["faithfulness"]
        cells = [_rate(f.get(k), "prompts") for k in ("all", "1_object", "2_object")]
        cells.append(_rate(report[name]["pointing_generated"].get("all"), "trials"))
        cells.append(_rate(report["pointing_ground_truth"]["all"], "trials") if name == "seen" else "-")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append("")
    for s in report["speed"]:
        best = s["best_images_per_s"]
        lines.append(f"sampling, batch {s['batch']}: {s['images_per_s']:.2f} images/s (median; best {best:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo-t2i"), help="model directory (runs/demo-t2i)")
    parser.add_argument("--prompts", type=int, default=200, help="prompts of each test split (default 200)")
    parser.add_argument("--steps", type=int, help="Euler steps (default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per timed batch (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per batch size (default 5)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1, see text_to_image.one_thread)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench-results/t2i_faithfulness.json"))
    args = parser.parse_args(argv)
    for name in ("prompts", "batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    report = run(args)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
