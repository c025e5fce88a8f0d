"""``qkv predict --model DIR IMAGE... [--top-k K]``: classify image files with a trained image classifier.

Prints one line per image, its ``K`` most probable classes (default 5, at most the number of classes) with
their probabilities, most probable first::

    $ qkv predict --model runs/vit-digits three.png seven.png --top-k 3
    three.png: 3 98.1% | 8 1.2% | 5 0.4%
    seven.png: 7 99.6% | 9 0.2% | 4 0.1%

Each image is read as training read its images (``preprocessing.json`` of the model directory: resized to
the model's size, normalized with the training statistics; a colour image given to a grey model is averaged
to grey). ``--json`` prints ``[{"image", "classes": [{"class", "probability"}, ...]}, ...]`` instead. A bad
option, a model directory that is not an image classifier or an unreadable image is one line
``qkv predict: error: ...`` and exit status 2, before anything is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TOP_K = 5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with a trained image classifier (task: image_classification)",
        description="Print the most probable classes of each IMAGE under an image classifier directory written "
        "by qkv train (task: image_classification).",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="image classifier directory")
    p.add_argument(
        "--top-k", type=int, default=DEFAULT_TOP_K, metavar="K", help=f"classes to show (default {DEFAULT_TOP_K})"
    )
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where to run (default cpu)")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"qkv predict: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from qkv.data.parallel import DataError
    from qkv.train.image_inference import ImageClassifier

    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be an int >= 1; got {args.top_k}")
        classifier = ImageClassifier.load(args.model, device=args.device)
        predictions = classifier.predict(list(args.images), top_k=args.top_k)
    except (OSError, ValueError, DataError) as e:
        return _fail(str(e))
    if args.json:
        rows = [
            {"image": p.source, "classes": [{"class": name, "probability": prob} for name, prob in p.classes]}
            for p in predictions
        ]
        print(json.dumps(rows, indent=2))
        return 0
    for p in predictions:
        print(f"{p.source}: " + " | ".join(f"{name} {prob:.1%}" for name, prob in p.classes))
    return 0
