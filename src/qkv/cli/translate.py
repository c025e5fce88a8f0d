"""``qkv translate --model DIR [--beam 5] [--input FILE|-] [--attention PLOT.png]``: translate text.

Reads one sentence a line from ``--input`` (a file, or ``-`` for stdin, the default) and writes one
translation a line, in input order, to stdout (or ``--output``); an empty line stays empty. ``--beam 1`` is
greedy search. ``--attention PLOT.png`` also saves the alignment of the first sentence: the chosen
hypothesis' cross-attention (last layer, mean over heads), source tokens across, target tokens down.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  echo "three hundred and twenty-one" | qkv translate --model runs/demo
  qkv translate --model runs/demo --input test.src --output test.hyp --beam 5
  qkv translate --model runs/demo --input - --attention alignment.png < sentences.txt
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "translate",
        help="translate text with a trained model directory",
        description="Translate one sentence a line with a model directory written by qkv train.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory (qkv train's output.dir)")
    p.add_argument("--input", default="-", metavar="FILE", help="sentences, one a line; - reads stdin (default)")
    p.add_argument("--output", type=Path, metavar="FILE", help="write the translations here instead of stdout")
    p.add_argument("--beam", type=int, default=5, metavar="N", help="beam size; 1 is greedy search (default 5)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="ALPHA", help="GNMT alpha (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="padded tokens per batch (default 4096)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where to run (default cpu)")
    p.add_argument(
        "--attention", type=Path, metavar="PLOT.png",
        help="save the first sentence's cross-attention alignment (.png, .svg or .pdf)",
    )
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"qkv translate: error: {message}", file=sys.stderr)
    return 2


def read_input(name: str) -> list[str]:
    """The lines of file ``name`` (``-``: stdin), without line endings."""
    if name == "-":
        text = sys.stdin.read()
    else:
        text = Path(name).read_text(encoding="utf-8")
    return text.splitlines()


def run(args: argparse.Namespace) -> int:
    if args.beam < 1:
        return _fail(f"--beam must be >= 1 (1: greedy); got {args.beam}")
    from qkv.data.parallel import DataError
    from qkv.train.translate import Translator

    try:
        sentences = read_input(args.input)
    except (OSError, UnicodeDecodeError) as e:
        return _fail(f"cannot read {args.input}: {e}")
    try:
        translator = Translator.load(args.model, device=args.device)
        results = translator.translate(
            sentences, beam=args.beam, length_penalty=args.length_penalty, max_tokens=args.max_tokens,
            need_attention=args.attention is not None,
        )
    except (FileNotFoundError, ValueError, DataError) as e:
        return _fail(str(e))
    text = "".join(f"{r.text}\n" for r in results)
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if args.attention is not None:
        first = next((r for r in results if r.hypothesis is not None), None)
        if first is None:
            return _fail("--attention: no non-empty input sentence to plot")
        from qkv.viz.alignment import plot_alignment

        plot_alignment(first.hypothesis.cross_attention, first.src_tokens, first.tgt_tokens, path=args.attention)
        print(f"wrote the alignment of sentence {results.index(first) + 1} to {args.attention}", file=sys.stderr)
    return 0
