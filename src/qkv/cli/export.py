"""``qkv export --model DIR --format ctranslate2 --out DIR [--quantization int8|int16|float32]``.

Writes the model of a ``qkv train`` model directory (a ``TransformerSeq2Seq``, or a ``TransformerLM``) as a
CTranslate2 model, with the tokenizers beside it and ``qkv_export.json`` describing the export (see
:mod:`qkv.deploy.ctranslate2_export`); ``qkv translate --model OUT --engine ctranslate2`` then translates
with it. ``--out`` must be a new or empty directory. A model option CTranslate2 cannot express, a bad
``--out`` or a missing ``ctranslate2`` package is one line ``qkv export: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("ctranslate2",)
EPILOG = """\
examples:
  qkv export --model runs/demo --format ctranslate2 --out runs/demo-ct2
  qkv export --model runs/demo --format ctranslate2 --out runs/demo-ct2-int8 --quantization int8
  qkv translate --model runs/demo-ct2 --engine ctranslate2 < sentences.txt
"""


def register(sub: argparse._SubParsersAction) -> None:
    from qkv.deploy.ctranslate2_export import QUANTIZATIONS

    p = sub.add_parser(
        "export",
        help="export a trained model directory for another inference engine (CTranslate2)",
        description="Write the model of a qkv train model directory in another engine's format, tokenizers beside it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory (qkv train's output.dir)")
    p.add_argument("--format", required=True, choices=FORMATS, help="the engine to export for")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="a new or empty directory to write into")
    p.add_argument(
        "--quantization", default="float32", choices=QUANTIZATIONS, help="weight type of the export (default float32)"
    )
    p.add_argument(
        "--sinusoidal-positions",
        type=int,
        metavar="N",
        help="for a model with sinusoidal positions: the longest source and output the export can take (default 2048)",
    )
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"qkv export: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from qkv.cli.paths import check_output_dir
    from qkv.data.parallel import DataError
    from qkv.deploy.ctranslate2_export import check_output_directory, export_ctranslate2

    try:
        check_output_dir(args.out, "--out")
        check_output_directory(args.out, "--out")
        out = export_ctranslate2(
            args.model, args.out, quantization=args.quantization, sinusoidal_positions=args.sinusoidal_positions
        )
    except (ImportError, OSError, ValueError, DataError) as e:
        return _fail(str(e))
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"wrote a CTranslate2 model ({args.quantization}, {size:.1f} MiB) of {args.model} to {out}")
    return 0
