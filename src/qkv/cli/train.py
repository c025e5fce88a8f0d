"""``qkv train CONFIG.yaml [--set KEY=VALUE ...] [--resume]``: train a translation model.

The config (the built-in ``reference`` lists every option) names the data, the model, the optimisation and the
output
directory, which becomes a model directory for ``qkv translate`` and ``qkv evaluate``. ``--set`` overrides
a key (``--set training.lr=1e-3 --set output.dir=runs/b``); ``--resume`` continues from the newest
checkpoint in the output directory, with the same batches and random numbers an uninterrupted run would
have used. Several processes: ``torchrun --nproc_per_node=N -m qkv train CONFIG.yaml``.

A bad config or data is one line on stderr, ``qkv train: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  qkv train demo                                   the built-in demo: dates → German, a small Transformer
  qkv train demo --set training.max_steps=500 --set output.dir=runs/short
  qkv train demo --resume                          continue after an interruption
  torchrun --nproc_per_node=2 -m qkv train demo    two processes, data parallel
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a translation model from a YAML config",
        description="Train a sequence-to-sequence model as CONFIG.yaml says (the built-in config `reference` "
        "lists every option), writing a model directory with checkpoints, logs and the exported model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the training configuration")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. training.lr=0.001 (value parsed as YAML); repeatable",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"qkv train: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from qkv.data.parallel import DataError
    from qkv.train.checkpoint_io import CheckpointError
    from qkv.train.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    from qkv.train.trainer import TrainError, train

    try:
        result = train(config, resume=args.resume)
    except (ConfigError, DataError, TrainError, CheckpointError) as e:
        return _fail(str(e))
    stop = " (stopped early)" if result.stopped_early else ""
    best = (
        f"best {result.best_metric} {result.best_score:.4g} at step {result.best_step}; "
        if result.best_score is not None else ""
    )
    print(f"done at step {result.step}{stop}: {best}model directory {result.output_dir} ({result.exported} weights)")
    return 0
