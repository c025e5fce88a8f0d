"""``qkv bench``: time qkv's backends, PyTorch SDPA and the textbook code side by side.

Prints the markdown table on stdout and writes ``bench.json``, ``bench.md``, ``bench.png`` and
``plots/`` into ``--out``; progress goes to stderr. A bad option is one line on stderr,
``qkv bench: error: ...``, and exit status 2; an ``--out`` that cannot be written is one before the sweep
starts, not after it.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from qkv.bench import (
    DTYPES,
    FEATURES,
    MODES,
    PEERS,
    BenchConfig,
    machine_info,
    markdown_table,
    run_bench,
    write_outputs,
)
from qkv.cli.paths import check_output_dir

FULL_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
FULL_HEAD_DIMS = (64, 128)
# --quick: under a minute on 2 CPU cores; peak memory measured for the first case at the largest length.
QUICK_LENGTHS = (256, 512)
QUICK_HEAD_DIMS = (64,)
QUICK_FEATURES = ("plain", "causal", "softcap")
QUICK_REPEATS = 3
FULL_REPEATS = 5

EPILOG = """\
examples:
  qkv bench --quick                                   a small sweep, under a minute on 2 cores
  qkv bench                                           the full sweep (long: tens of minutes or more)
  qkv bench --cases plain causal alibi --lengths 1024 4096 --backends tiled torch naive --mode fwd
  qkv bench --device cuda --dtype bfloat16 --head-dims 128 --out results/h100

'× torch' is a backend's median time over that of qkv.attention(backend="torch"), i.e. PyTorch SDPA as
qkv calls it (with qkv's dense mask where the feature needs one); 'sdpa' is raw
F.scaled_dot_product_attention on the features it has arguments for. GFLOP/s count fwd = 4·B·H·L·S·D
(halved when causal) and fwd+bwd = 3.5 × fwd, as FlashAttention does.
"""


def parse_size(text: str) -> int:
    """``'8G'``, ``'512M'``, ``'64k'`` or ``'1000000'`` → bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a size such as 8G, 512M or 1000000; got {text!r}")
    return int(float(m[1]) * 1024 ** "_kmgt".index(m[2].lower() or "_"))


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = sub.add_parser(
        "bench",
        help="time qkv's backends against PyTorch SDPA and the textbook code",
        description="Time backends side by side over sequence lengths, head dims and feature cases "
        "(forward, forward+backward): median time, GFLOP/s, peak memory (in a fresh process) and the "
        "ratio to SDPA. Writes JSON, a markdown table and PNG plots; prints the table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a small sweep: lengths {' '.join(map(str, QUICK_LENGTHS))}, cases {' '.join(QUICK_FEATURES)}, "
        f"repeats {QUICK_REPEATS}; memory of the first case at the largest length only (explicit options "
        "still win)",
    )
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        metavar="S",
        help=f"key lengths S; L = S except for bottom_right (default {' '.join(map(str, FULL_LENGTHS))})",
    )
    p.add_argument(
        "--head-dims",
        type=int,
        nargs="+",
        metavar="D",
        help=f"head dims (default {' '.join(map(str, FULL_HEAD_DIMS))})",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=list(FEATURES),
        metavar="CASE",
        help="feature cases (default all): " + ", ".join(FEATURES),
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=list(PEERS),
        default=list(PEERS),
        metavar="BACKEND",
        help="backends and peers (default all): " + ", ".join(PEERS),
    )
    p.add_argument(
        "--mode",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        dest="modes",
        help="forward only and/or forward+backward (default both)",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    p.add_argument("--heads", type=int, default=8, help="heads H (default 8)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="input dtype (default float32)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads, here and in the memory processes (default: torch's default, usually the physical cores)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help=f"timed calls per run, after one warm-up; the median is "
        f"reported (default {FULL_REPEATS}, {QUICK_REPEATS} with --quick)",
    )
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory (faster)")
    p.add_argument(
        "--memory-limit",
        type=parse_size,
        metavar="SIZE",
        help="memory to treat as available, e.g. 8G (default: MemAvailable, or free GPU memory); "
        "a run estimated to need more than 70%% of it is reported as skipped",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        metavar="DIR",
        help="output directory (default bench-results/)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The sweep the options ask for; ``--quick`` fills in what was not given."""
    lengths = tuple(args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS))
    features = tuple(dict.fromkeys(args.cases or (QUICK_FEATURES if args.quick else FEATURES)))
    options = dict(
        lengths=lengths,
        head_dims=tuple(args.head_dims or (QUICK_HEAD_DIMS if args.quick else FULL_HEAD_DIMS)),
        features=features,
        backends=tuple(dict.fromkeys(args.backends)),
        modes=tuple(dict.fromkeys(args.modes)),
        batch=args.batch,
        heads=args.heads,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS),
        memory=not args.no_memory,
        memory_lengths=(max(lengths),) if args.quick else None,
        memory_features=features[:1] if args.quick else None,
        memory_limit=args.memory_limit,
    )
    if args.threads is not None:
        options["threads"] = args.threads
    return BenchConfig(**options)


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the table, write the files; 2 on a bad option."""
    try:
        config = config_from_args(args)
        check_output_dir(args.out, "--out")
        if config.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device cuda was given but torch sees no CUDA device")
    except ValueError as e:
        print(f"qkv bench: error: {e}", file=sys.stderr)
        return 2
    results = run_bench(config, progress=not args.no_progress)
    paths = write_outputs(results, config, machine_info(config.device), args.out)
    print(markdown_table(results), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())} and {args.out / 'plots'}/", file=sys.stderr)
    return 0
