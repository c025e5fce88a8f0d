"""``qkv evaluate --model DIR --src FILE --ref FILE [--beam N]``: translate a test set and score it.

Prints corpus BLEU and chrF with their sacrebleu signatures (scores are comparable only under equal
signatures) and the exact-match rate::

    BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0 = 35.2 66.7/40.0/... (BP = ...)
    chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0 = 61.03
    exact match = 12.00% (12/100)

``--hyp FILE`` also writes the translations; ``--json`` prints the scores as one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="translate a test set and report BLEU, chrF and exact match",
        description="Translate --src with a model directory and score the translations against --ref "
        "(sacrebleu BLEU and chrF with signatures, exact match).",
    )
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory (qkv train's output.dir)")
    p.add_argument("--src", type=Path, required=True, metavar="FILE", help="source sentences, one a line")
    p.add_argument("--ref", type=Path, required=True, metavar="FILE", help="reference translations, line by line")
    p.add_argument("--beam", type=int, default=5, metavar="N", help="beam size; 1 is greedy search (default 5)")
    p.add_argument("--length-penalty", type=float, default=1.0, metavar="ALPHA", help="GNMT alpha (default 1.0)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="padded tokens per batch (default 4096)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where to run (default cpu)")
    p.add_argument("--hyp", type=Path, metavar="FILE", help="also write the translations to FILE")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"qkv evaluate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.beam < 1:
        return _fail(f"--beam must be >= 1 (1: greedy); got {args.beam}")
    from qkv.data.parallel import DataError, read_lines
    from qkv.train.evaluate import score
    from qkv.train.translate import Translator

    try:
        sources, references = read_lines(args.src), read_lines(args.ref)
    except DataError as e:
        return _fail(str(e))
    if len(sources) != len(references):
        return _fail(f"{args.src} has {len(sources)} lines but {args.ref} has {len(references)}; expected the same")
    try:
        translator = Translator.load(args.model, device=args.device)
        results = translator.translate(
            sources, beam=args.beam, length_penalty=args.length_penalty, max_tokens=args.max_tokens
        )
    except (FileNotFoundError, ValueError, DataError) as e:
        return _fail(str(e))
    hypotheses = [r.text for r in results]
    if args.hyp is not None:
        args.hyp.write_text("".join(f"{h}\n" for h in hypotheses), encoding="utf-8")
    scores = score(hypotheses, references)
    if args.json:
        print(json.dumps({**scores.to_dict(), "beam": args.beam, "model": str(args.model)}, indent=2))
    else:
        print("\n".join(scores.lines()))
    return 0
