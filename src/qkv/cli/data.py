"""``qkv data``: generate a built-in corpus, or look at a parallel corpus before training on it.

``qkv data generate --corpus numbers --size 25000 --seed 0 --out data/numbers`` writes ``train.src``,
``train.tgt``, ``valid.*``, ``test.*`` and ``corpus.json`` and prints the split sizes and how many inputs the
converters skipped. ``qkv data stats --src train.en --tgt train.de`` (or ``--tsv train.tsv``) prints the
line count, what the length filters would drop, and the length statistics of what is kept. A bad input is
one line on stderr, ``qkv data: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qkv.data.corpus import (
    CORPORA,
    DEFAULT_SIZE,
    DEFAULT_TEST_FRACTION,
    DEFAULT_TIME_LIMIT,
    DEFAULT_VALID_FRACTION,
    SPLITS,
    generate_corpus,
    write_corpus,
)
from qkv.data.parallel import DataError, LengthStats, length_stats, load_parallel, load_tsv

EPILOG = """\
examples:
  qkv data generate --corpus numbers --out data/numbers        25,000 pairs: "twenty-one" → "einundzwanzig"
  qkv data generate --corpus dates --size 5000 --seed 1 --out data/dates
  qkv data stats --src data/numbers/train.src --tgt data/numbers/train.tgt
  qkv data stats --tsv my.tsv --max-tokens 100                 what a 100-token limit would drop
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` subcommand with its ``generate`` and ``stats`` actions."""
    p = sub.add_parser(
        "data",
        help="generate a built-in corpus, or show statistics of a parallel corpus",
        description="Generate a built-in parallel corpus (offline, seeded, split into train/valid/test\n"
        "without overlap), or show line counts, filtering and lengths of your own parallel text.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    gen = actions.add_parser(
        "generate",
        help="write a built-in corpus",
        description="Write train/valid/test .src and .tgt files (one sentence a line) and corpus.json.\n"
        + "\n".join(f"  {name:8} {task.summary}" for name, task in CORPORA.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--corpus", required=True, choices=sorted(CORPORA), help="which corpus")
    gen.add_argument(
        "--size",
        type=int,
        default=DEFAULT_SIZE,
        metavar="N",
        help=f"pairs in all splits together (default {DEFAULT_SIZE})",
    )
    gen.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    gen.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write (created)")
    gen.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULT_VALID_FRACTION,
        metavar="F",
        help=f"share held out for validation (default {DEFAULT_VALID_FRACTION})",
    )
    gen.add_argument(
        "--test-fraction",
        type=float,
        default=DEFAULT_TEST_FRACTION,
        metavar="F",
        help=f"share held out for test (default {DEFAULT_TEST_FRACTION})",
    )
    gen.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT,
        metavar="SECONDS",
        help=f"skip an input whose conversion takes longer (default {DEFAULT_TIME_LIMIT}; 0: no limit)",
    )
    gen.set_defaults(run=run_generate)

    stats = actions.add_parser(
        "stats",
        help="line counts, filtering and lengths of a parallel corpus",
        description="Read a parallel corpus as training would (--src and --tgt, or --tsv) and print the\n"
        "pairs read, those dropped as empty or too long, and the lengths (characters and whitespace\n"
        "tokens) of those kept.",
    )
    stats.add_argument("--src", type=Path, metavar="FILE", help="source sentences, one a line")
    stats.add_argument("--tgt", type=Path, metavar="FILE", help="target sentences, line i translating --src line i")
    stats.add_argument("--tsv", type=Path, metavar="FILE", help="source<TAB>target a line (instead of --src/--tgt)")
    stats.add_argument("--max-chars", type=int, metavar="N", help="drop pairs with a side over N characters")
    stats.add_argument("--max-tokens", type=int, metavar="N", help="drop pairs with a side over N whitespace tokens")
    stats.set_defaults(run=run_stats)


def _fail(message: str) -> int:
    print(f"qkv data: error: {message}", file=sys.stderr)
    return 2


def run_generate(args: argparse.Namespace) -> int:
    """Generate and write the corpus; print the split sizes and skip counts."""
    try:
        corpus = generate_corpus(
            args.corpus,
            args.size,
            seed=args.seed,
            valid_fraction=args.valid_fraction,
            test_fraction=args.test_fraction,
            time_limit=args.time_limit if args.time_limit > 0 else None,
        )
        written = write_corpus(corpus, args.out)
    except DataError as e:
        return _fail(str(e))
    s = corpus.stats
    print(f"wrote the {corpus.name} corpus (seed {corpus.seed}) to {args.out} in {s.seconds:.1f} s")
    for split in SPLITS:
        src_path, tgt_path = written[split]
        print(f"  {split:6} {len(corpus.split(split)):>8} pairs  {src_path}  {tgt_path}")
    print(
        f"  skipped {s.skipped} inputs ({s.skipped_errors} errors, {s.skipped_timeouts} timeouts); "
        f"{s.duplicates} duplicate draws redrawn"
    )
    for reason in s.errors:
        print(f"    skipped {reason}")
    if corpus.train:
        src, tgt = corpus.train[0]
        print(f"  example: {src} → {tgt}")
    return 0


def _stats_row(label: str, stats: LengthStats) -> str:
    return f"  {label:11} {stats.min:>6} {stats.mean:>8.1f} {stats.median:>8.1f} {stats.p95:>6} {stats.max:>6}"


def run_stats(args: argparse.Namespace) -> int:
    """Load the corpus as training would and print counts and length statistics."""
    if args.tsv is not None and (args.src is not None or args.tgt is not None):
        return _fail("give either --tsv or --src and --tgt, not both")
    if args.tsv is None and (args.src is None or args.tgt is None):
        missing = "--tgt" if args.src is not None else "--src"
        return _fail(f"give --src and --tgt (or --tsv); missing {missing}")
    try:
        if args.tsv is not None:
            pairs, report = load_tsv(args.tsv, max_chars=args.max_chars, max_tokens=args.max_tokens)
        else:
            pairs, report = load_parallel(args.src, args.tgt, max_chars=args.max_chars, max_tokens=args.max_tokens)
    except DataError as e:
        return _fail(str(e))
    print(report.summary())
    if not pairs:
        print("  no pairs kept")
        return 0
    print(f"  {'lengths':11} {'min':>6} {'mean':>8} {'median':>8} {'p95':>6} {'max':>6}")
    for side, index in (("src", 0), ("tgt", 1)):
        print(_stats_row(f"{side} chars", length_stats([len(p[index]) for p in pairs])))
        print(_stats_row(f"{side} tokens", length_stats([len(p[index].split()) for p in pairs])))
    return 0
