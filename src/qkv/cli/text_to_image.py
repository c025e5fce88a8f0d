"""The text-to-image side of ``qkv generate``, ``qkv show`` and ``qkv demo t2i``.

::

    qkv generate --model runs/demo-t2i --prompt "a green triangle above a red circle" --out img.png --num 4 --seed 0
    qkv show --model runs/demo-t2i --prompt "a red circle left of a blue square" --png maps.png --html maps.html
    qkv demo t2i                       # train the built-in t2i_demo config, then a grid of prompts and word maps

``generate`` writes the ``--num`` images of ``--prompt`` side by side into one PNG (each at the model's size;
``--steps`` and ``--guidance`` default to what training recorded in the model directory). ``show`` generates
one image (``--seed``, default 0) and draws, per prompt word, its cross-attention averaged over heads, layers
and sampling steps, overlaid on the image (:mod:`qkv.viz.word_maps`); ``--html`` writes the interactive
view, ``--json`` the maps; without them it prints where each word's map peaks. The commands' modules call
these when the model directory holds a ``text_to_image`` model. ``generate``, ``show`` and the demo's grid run
the model on one intra-op thread (:func:`one_thread`); the demo trains on torch's default threads (:func:`run_demo`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qkv.cli.paths import check_output_file
from qkv.models.checkpoint import stored_model_type

if TYPE_CHECKING:
    from qkv.train.t2i_inference import GeneratedImages

T2I_DEMO_CONFIG = "t2i_demo"
DEMO_ROWS = 8  # prompts in the demo's grid: half from the test scenes, half held-out combinations
SHOW_OPTIONS_ELSEWHERE = ("kind", "layer", "head", "target", "beam", "top")
MAP_DECIMALS = 5


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for the block (restored afterwards). A text-to-image model's matrices are small: on
    the 2-core development machine a demo training step took 0.12 s on one thread and 0.085 s on two when
    nothing else ran, but 0.34 to 6.5 s on two when another process shared the cores; generating 4 images
    took 0.23 s on one thread and 18.5 s on two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_text_to_image(model: str | Path | None) -> bool:
    """Whether ``model`` is a directory whose ``config.json`` says ``text_to_image`` (never raises)."""
    if model is None or not Path(model).is_dir():
        return False
    try:
        return stored_model_type(model) == "text_to_image"
    except (OSError, ValueError):
        return False


def add_sampling_options(p: argparse.ArgumentParser, *, seed: bool) -> None:
    """``--steps``, ``--guidance`` (and ``--seed`` when the command has none yet)."""
    p.add_argument("--steps", type=int, metavar="N", help="text to image: Euler steps (default: the model's)")
    p.add_argument(
        "--guidance",
        type=float,
        metavar="G",
        help="text to image: classifier-free guidance, 1 = none (default: the model's)",
    )
    if seed:
        p.add_argument("--seed", type=int, default=0, metavar="S", help="text to image: noise seed (default 0)")


# ---- qkv generate ----------------------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    """``qkv generate`` with a text-to-image model: ``--prompt`` → ``--out`` PNG of ``--num`` images."""
    from qkv.train.t2i_inference import TextToImage, write_png

    try:
        if args.prompt is None:
            raise ValueError("--prompt is required for a text-to-image model (the description of the image)")
        if args.out is None:
            raise ValueError("--out is required for a text-to-image model: the PNG file to write, e.g. --out img.png")
        if args.out.suffix.lower() != ".png":
            raise ValueError(f"--out {args.out}: the images are written as PNG; give a file ending in .png")
        check_output_file(args.out, "--out")
        t2i = TextToImage.load(args.model, device=args.device)
        started = time.perf_counter()
        with one_thread():
            out = t2i.generate(args.prompt, num=1 if args.num is None else args.num, steps=args.steps,
                               guidance=args.guidance, seed=args.seed)  # fmt: skip
        seconds = time.perf_counter() - started
        write_png(out.images, args.out)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        print(f"qkv generate: error: {_flags(str(e))}", file=sys.stderr)
        return 2
    count = out.images.shape[0]
    print(f"wrote {args.out}: {count} image{'s' if count > 1 else ''} of {args.prompt!r} ({seconds:.2f} s)")
    return 0


def _flags(message: str) -> str:
    """Argument names in ``message`` as the options of the command."""
    for name in ("steps", "guidance", "num"):
        message = message.replace(f"{name} must", f"--{name} must")
    return message


# ---- qkv show --prompt ----------------------------------------------------------------------------------------


def run_show(args: argparse.Namespace) -> int:
    """``qkv show --model DIR --prompt TEXT``: the generated image and its word maps."""
    from qkv.train.t2i_inference import TextToImage
    from qkv.viz.heatmap import SAVE_FORMATS

    try:
        if args.prompt is None:
            raise ValueError(f"{args.model} is a text-to-image model: give the prompt to draw as --prompt TEXT")
        if args.text is not None:
            raise ValueError(f"--prompt takes the place of TEXT; give one of them, not both (got TEXT {args.text!r})")
        for option in SHOW_OPTIONS_ELSEWHERE:
            if getattr(args, option) is not None:
                raise ValueError(f"--{option} does not apply to a text-to-image model's word maps")
        if args.png is not None and args.png.suffix.lower() not in SAVE_FORMATS:
            raise ValueError(f"--png {args.png}: the suffix must be one of {', '.join(SAVE_FORMATS)}")
        for option in ("png", "html", "json"):
            if getattr(args, option) is not None:
                check_output_file(getattr(args, option), f"--{option}")
        if not is_text_to_image(args.model):
            raise ValueError(f"--prompt shows a text-to-image model's word maps; {args.model} is not one")
        t2i = TextToImage.load(args.model)
        with one_thread():
            out = t2i.generate(
                args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed, need_attention=True
            )
        write_show_outputs(args, out)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        print(f"qkv show: error: {_flags(str(e))}", file=sys.stderr)
        return 2
    for path in (args.png, args.html, args.json):
        if path is not None:
            print(f"wrote {path}")
    if args.png is None and args.html is None and args.json is None:
        print(summary(out))
    return 0


def write_show_outputs(args: argparse.Namespace, out: GeneratedImages) -> None:
    """The files ``--png``, ``--html`` and ``--json`` ask for, from one generated image and its attention."""
    from qkv.viz.word_maps import layer_word_maps, plot_word_maps, save_word_maps_html

    assert out.cross_attention is not None, "run_show generates with need_attention=True"
    layers = layer_word_maps(out.cross_attention[0], out.grid)  # (layers, S, h, w)
    image = out.images[0].numpy()
    title = f"{args.model}: {out.prompt!r} (seed {args.seed})"
    if args.png is not None:
        plot_word_maps(image, layers.mean(axis=0), out.words, path=args.png, title=title)
    if args.html is not None:
        save_word_maps_html(args.html, image, layers, out.words, title=title)
    if args.json is not None:
        data = {
            "model": str(args.model),
            "prompt": out.prompt,
            "seed": args.seed,
            "words": out.words,
            "grid": list(out.grid),
            "maps": np.round(layers.mean(axis=0), MAP_DECIMALS).tolist(),
            "layer_maps": np.round(layers, MAP_DECIMALS).tolist(),
        }
        args.json.write_text(json.dumps(data), encoding="utf-8")


def summary(out: GeneratedImages) -> str:
    """For each word, the patch where its map (mean over heads, layers, steps) peaks and the peak's weight."""
    from qkv.viz.word_maps import word_maps

    assert out.cross_attention is not None, "summary needs the cross-attention"
    maps = word_maps(out.cross_attention[0], out.grid)
    lines = [
        f"{out.prompt!r}: where each word's cross-attention peaks (patch row, column of {out.grid[0]}x{out.grid[1]})"
    ]
    for word, m in zip(out.words, maps, strict=True):
        row, col = np.unravel_index(int(np.argmax(m)), m.shape)
        lines.append(f"  {word:>10}  p({row},{col})  {float(m.max()):.3f}")
    return "\n".join(lines) + "\nmore: --png FILE, --html FILE, --json FILE"


# ---- qkv demo t2i ----------------------------------------------------------------------------------------------


def demo_prompts(scenes_test: list, scenes_held_out: list) -> list[str]:
    """The demo grid's prompts: the first two-object and one-object captions of each test split."""
    chosen = []
    for scenes in (scenes_test, scenes_held_out):
        two = [s.caption for s in scenes if len(s.objects) == 2][: DEMO_ROWS // 2 - 1]
        one = [s.caption for s in scenes if len(s.objects) == 1][:1]
        chosen += two + one
    return chosen


def run_demo(args: argparse.Namespace) -> int:
    """Train the built-in text-to-image config on the machine's cores (torch's default threads: the issue's
    budget is 10 minutes on 2 cores, and two threads train a demo step in 0.096 s against one thread's 0.136 s
    on the 2-core development machine), then draw a grid of prompts, images and word maps on one thread."""
    from qkv.cli.demo import demo_config, section, train_demo

    start = time.perf_counter()
    loaded = demo_config(args, T2I_DEMO_CONFIG, "runs/demo-t2i")
    if loaded is None:
        return 2
    config, resume = loaded
    out = Path(config.output.dir)
    section("1. Training a small DiT to draw captioned scenes (cross-attention to the words)")
    result, status = train_demo(config, resume=resume, again=f"qkv demo t2i --out {out}")
    if result is None:
        return status

    section("2. Prompts, images and where each word acted")
    with one_thread():
        grid_path, rows = _demo_grid(out)
    scores = result.test_scores
    for key, what in (("faithfulness_seen", "seen combinations"), ("faithfulness_held_out", "held-out combinations")):
        if key in scores:
            print(f"faithfulness on {what}: {scores[key]:.1%} of the test prompts judged right by the scene checker")
    print(f"wrote the grid of {rows} prompts to {grid_path}")
    print(
        f'\ndone in {time.perf_counter() - start:.0f} s. Next: `qkv generate --model {out} --prompt "a green triangle '
        f'above a red circle" --out img.png --num 4`, `qkv show --model {out} --prompt "a red circle left of a blue '
        f'square" --png maps.png --html maps.html`.'
    )
    return 0


def _demo_grid(out: Path) -> tuple[Path, int]:
    """The demo's grid of prompts, images and word maps for the model in ``out``: ``(its path, its rows)``."""
    from qkv.train.t2i_inference import TextToImage
    from qkv.viz.word_maps import WordMapRow, plot_word_map_grid, word_maps

    t2i = TextToImage.load(out)
    rows = []
    for i, prompt in enumerate(demo_prompts(t2i.scenes("test"), t2i.scenes("held_out"))):
        made = t2i.generate(prompt, seed=i, need_attention=True)
        assert made.cross_attention is not None
        rows.append(
            WordMapRow(made.images[0].numpy(), word_maps(made.cross_attention[0], made.grid), made.words, prompt)
        )
    grid_path = plot_word_map_grid(rows, path=out / "word_maps.png", title="qkv demo t2i: prompts, images, word maps")
    return grid_path, len(rows)
