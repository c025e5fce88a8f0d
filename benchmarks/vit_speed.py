"""ViT training speed: images/s of qkv's ``VisionTransformer`` against transformers' ``ViTForImageClassification``.

Both sides are the same ViT (class token, learned positions, pre-LN, GELU, dropout 0) with the same weights:

* **qkv**: :class:`qkv.models.VisionTransformer` (attention through ``qkv.nn.MultiHeadAttention`` and
  ``qkv.attention``, whose ``auto`` backend picks SDPA when no weights are asked for);
* **transformers**: ``ViTForImageClassification`` with ``attn_implementation="sdpa"``, built from the same
  configuration; qkv's model is loaded from its state dict (:func:`qkv.models.load_hf_vit`), and the script
  checks that both compute the same logits before timing.

Each side trains on the same random batches (``B`` normalized images, random labels) with
``torch.optim.AdamW`` (lr 1e-3, weight decay 0.05): forward, cross-entropy, backward, step, ``zero_grad``.
After ``--warmup`` untimed steps per side, ``--repeats`` rounds each time ``--steps`` steps of each side, the
steps of the two sides alternating (the order reversed every step), so that both see the same machine; the
median round is reported, and the fastest (less sensitive to other processes on a shared machine).

Sizes (``--presets``):

* ``digits``: scikit-learn's 8×8 digits as the image task trains them: 1 channel, patch 2 (16 patches + the
  class token), width 64, 4 layers, 4 heads, MLP 128, 10 classes, batch 64;
* ``small``: 32×32 RGB (CIFAR-sized), patch 4 (64 patches + 1), width 192, 6 layers, 3 heads, MLP 768
  (ViT-Tiny's width), 10 classes, batch 32.

Usage::

    python benchmarks/vit_speed.py                          # both presets, 2 threads
    python benchmarks/vit_speed.py --presets digits --repeats 11 --json digits.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkv.bench.runner import cpu_model
from qkv.models import VisionTransformer, load_hf_vit

SIDES = ("qkv", "transformers")


@dataclass(frozen=True)
class Size:
    """One ViT configuration and batch size."""

    name: str
    image: int
    patch: int
    channels: int
    width: int
    layers: int
    heads: int
    mlp: int
    classes: int
    batch: int


PRESETS = {
    "digits": Size("digits", image=8, patch=2, channels=1, width=64, layers=4, heads=4, mlp=128, classes=10, batch=64),
    "small": Size("small", image=32, patch=4, channels=3, width=192, layers=6, heads=3, mlp=768, classes=10, batch=32),
}


def build_pair(size: Size, seed: int) -> tuple[VisionTransformer, nn.Module]:
    """transformers' ``ViTForImageClassification`` (SDPA attention) and qkv's model with its weights."""
    import transformers  # imported here: the module docstring and --help work without it

    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=size.image,
        patch_size=size.patch,
        num_channels=size.channels,
        hidden_size=size.width,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.mlp,
        num_labels=size.classes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    theirs = transformers.ViTForImageClassification(config)
    ours = load_hf_vit(theirs.state_dict(), config.to_dict())
    return ours.train(), theirs.train()


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The ``(B, classes)`` logits of either side."""
    return model(images).logits  # type: ignore[no-any-return]


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_batches(size: Size, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of ``(images (B, C, H, W), labels (B,))``."""
    g = torch.Generator().manual_seed(seed)
    shape = (size.batch, size.channels, size.image, size.image)
    return [
        (torch.randn(shape, generator=g), torch.randint(0, size.classes, (size.batch,), generator=g))
        for _ in range(count)
    ]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    images, labels = batch
    loss = F.cross_entropy(logits(model, images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def same_function(ours: nn.Module, theirs: nn.Module, images: torch.Tensor) -> float:
    """The largest difference between the two sides' logits (in eval mode; both have no dropout anyway)."""
    with torch.no_grad():
        return float((logits(ours, images) - logits(theirs, images)).abs().max())


def time_size(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """Both sides on ``size``: interleaved rounds of ``args.steps`` steps; medians, ratio, losses."""
    ours, theirs = build_pair(size, args.seed)
    models: dict[str, nn.Module] = {"qkv": ours, "transformers": theirs}
    batches = make_batches(size, args.steps, args.seed)
    max_diff = same_function(ours, theirs, batches[0][0])
    if max_diff > 1e-4:
        raise RuntimeError(f"the two sides do not compute the same function: logits differ by {max_diff:.2e}")
    optimizers = {side: make_optimizer(m) for side, m in models.items()}
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    losses: dict[str, list[float]] = {side: [] for side in SIDES}
    for side in SIDES:
        for batch in batches[: args.warmup]:
            train_step(models[side], optimizers[side], batch)
    # Steps alternate between the sides (the order reversed every step), so that a burst of load from another
    # process on a shared machine slows both sides alike instead of one side's whole round.
    for _ in range(args.repeats):
        elapsed = dict.fromkeys(SIDES, 0.0)
        for step, batch in enumerate(batches):
            for side in SIDES if step % 2 == 0 else SIDES[::-1]:
                start = time.perf_counter()
                losses[side].append(train_step(models[side], optimizers[side], batch))
                elapsed[side] += time.perf_counter() - start
        for side in SIDES:
            times[side].append(elapsed[side])
    images = args.steps * size.batch
    result: dict[str, Any] = {"size": asdict(size), "name": size.name, "max_logit_diff": max_diff}
    for side in SIDES:
        median = statistics.median(times[side])
        result[side] = {
            "parameters": parameters(models[side]),
            "times_s": times[side],
            "median_s": median,
            "images_per_s": images / median,
            "best_images_per_s": images / min(times[side]),
            "last_loss": losses[side][-1],
        }
    result["ratio"] = result["qkv"]["images_per_s"] / result["transformers"]["images_per_s"]
    result["ratio_best"] = result["qkv"]["best_images_per_s"] / result["transformers"]["best_images_per_s"]
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    torch.set_num_threads(args.threads)
    results = [time_size(PRESETS[name], args) for name in args.presets]
    return {
        "benchmark": "vit_speed",
        "config": {**vars(args), "json": str(args.json)},
        "machine": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_model": cpu_model(),
        },
        "convention": "images/s = steps·B / median seconds of a round of --steps training steps (forward, "
        "cross-entropy, backward, AdamW step), best_images_per_s with the fastest round; ratio = qkv images/s / "
        "transformers images/s (above 1: qkv is faster), ratio_best with the fastest rounds",
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"steps={c['steps']} per round, repeats={c['repeats']}, threads={report['machine']['threads']}, AdamW lr 1e-3",
        "",
        "| size | side | params | images/s (median) | images/s (best) | qkv / transformers (median, best) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        for side in SIDES:
            s = r[side]
            ratio = f"{r['ratio']:.3f}×, {r['ratio_best']:.3f}×" if side == "qkv" else ""
            lines.append(
                f"| {r['name']} | {side} | {s['parameters']:,} | {s['images_per_s']:,.0f} | "
                f"{s['best_images_per_s']:,.0f} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed round (default 10)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per side (default 7)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/vit_speed.json"))
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.warmup < 0 or args.warmup > args.steps:
        parser.error(f"--warmup must be in [0, --steps={args.steps}]; got {args.warmup}")
    report = run(args)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
