"""``qkv train CONFIG.yaml [--set KEY=VALUE ...] [--resume]``: train a model for a task.

The config (the built-in ``reference`` lists every option) names the task (``translation``, the default, or
``lm``), the data, the model, the optimisation and its budget (steps, epochs, wall-clock time) and the output
directory, which becomes a model directory for the task's commands (``qkv translate``, ``qkv generate``,
``qkv evaluate``). ``--set`` overrides
a key (``--set training.lr=1e-3 --set output.dir=runs/b``); ``--resume`` continues from the newest
checkpoint in the output directory, with the same batches and random numbers an uninterrupted run would
have used. Several processes: ``torchrun --nproc_per_node=N -m qkv train CONFIG.yaml``.

A bad config or data, an output directory that cannot be written, or a write that fails during training
(a full disk) is one line on stderr, ``qkv train: error: ...``, and exit status 2. Ctrl-C stops with one
line saying which checkpoint ``--resume`` continues from, and exit status 130 (128 + SIGINT).
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
  qkv train my.yaml --set training.max_time=30m    stop after 30 minutes (and export), whatever max_steps says
  torchrun --nproc_per_node=2 -m qkv train demo    two processes, data parallel
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (translation, language model) from a YAML config",
        description="Train the model of a task (translation or lm) as CONFIG.yaml says (the built-in config "
        "`reference` lists every option), writing a model directory with checkpoints, logs and the exported model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the training configuration")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. training.lr=0.001 (value parsed as YAML); repeatable",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    p.set_defaults(run=run)


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def _fail(message: str, status: int = 2) -> int:
    print(f"qkv train: error: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace) -> int:
    from qkv.data.parallel import DataError
    from qkv.train.checkpoint_io import CheckpointError
    from qkv.train.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    from qkv.train.trainer import TrainError, TrainInterrupted, train

    try:
        result = train(config, resume=args.resume)
    except TrainInterrupted as e:
        return _fail(f"{e} (qkv train {args.config} --resume)", INTERRUPTED)
    except KeyboardInterrupt:
        return _fail("interrupted before the first training step", INTERRUPTED)
    except (ConfigError, DataError, TrainError, CheckpointError) as e:
        return _fail(str(e))
    except OSError as e:  # a write the trainer does not wrap itself (train.log, metrics.jsonl, tokenizers)
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"cannot write {where}{e.strerror or e}")
    stop = " (stopped early)" if result.stopped_early else ""
    if result.ended_by in ("max_epochs", "max_time"):
        stop = f" (training.{result.ended_by} reached)"
    best = (
        f"best {result.best_metric} {result.best_score:.4g} at step {result.best_step}; "
        if result.best_score is not None
        else ""
    )
    print(f"done at step {result.step}{stop}: {best}model directory {result.output_dir} ({result.exported} weights)")
    return 0
