"""``qkv demo [translation|lm]``: a job on built-in data, start to finish; ``make demo`` runs the first.

``qkv demo`` (``translation``):

1. generates the built-in dates corpus (US English → German) and trains a small Transformer on it
   (the built-in ``demo`` config, a few minutes on 2 CPU cores);
2. scores it on the held-out test split: exact match, BLEU and chrF (sacrebleu, with signatures);
3. translates a few test sentences with beam search and writes the cross-attention alignment of one of
   them as a PNG, source tokens on one axis and output tokens on the other.

``qkv demo lm``: a small character-level GPT (the built-in ``lm_demo`` config, at most about 2.5 minutes
on 2 CPU cores) on the English documentation that ships with Python; it prints samples of the untrained
model, trains, then prints samples and the held-out bits per character of the trained one.

``qkv demo t2i``: a small text-to-image DiT (the built-in ``t2i_demo`` config, at most 10 minutes on 2 CPU
cores) on the built-in captioned scenes; it reports how many generated test images the scene checker judges
faithful, then writes a grid of prompts, images and per-word cross-attention maps (:mod:`qkv.cli.text_to_image`).

``--resume`` continues an interrupted demo; ``--set`` overrides the config (e.g. ``training.max_steps=200``
for a quick look).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qkv.train.config import Config
    from qkv.train.trainer import TrainResult

DEMO_CONFIG = "demo"
LM_DEMO_CONFIG = "lm_demo"
EXAMPLES = 6
LM_PROMPTS = ("The if statement", "def ")
LM_SAMPLE_TOKENS = 48  # with the longer prompt, within the demo model's 64 positions


def section(title: str) -> None:
    """A demo's numbered part: its title between two rules."""
    print("\n" + "=" * 78 + f"\n{title}\n" + "=" * 78, flush=True)


def demo_config(args: argparse.Namespace, name: str, default_out: str) -> tuple[Config, bool] | None:
    """The built-in config ``name`` with ``--out`` (default ``default_out``) and ``--set`` applied, and whether to
    resume (``--resume``, or checkpoints already in its output directory); ``None`` with the error printed for a
    bad override."""
    from qkv.train.config import load_config

    try:
        config = load_config(name, [f"output.dir={args.out or default_out}", *args.overrides])
    except ValueError as e:  # ConfigError, from the trainer's sections or the task's
        print(f"qkv demo: error: {e}", file=sys.stderr)
        return None
    return config, args.resume or (Path(config.output.dir) / "checkpoints").is_dir()


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def train_demo(config: Config, *, resume: bool, again: str) -> tuple[TrainResult | None, int]:
    """Train a demo's ``config``: ``(result, 0)``, or ``(None, exit status)`` with the error printed: 130 when
    interrupted (saying that the command ``again`` continues), 2 for a bad config, data, checkpoint or write."""
    from qkv.train.errors import TrainError, TrainInterrupted
    from qkv.train.trainer import train

    out = Path(config.output.dir)
    try:
        return train(config, resume=resume), 0
    except TrainInterrupted as e:
        print(f"qkv demo: error: {e} ({again} continues)", file=sys.stderr)
        return None, 130  # the shell's status for a process ended by SIGINT
    except (ValueError, TrainError) as e:  # ConfigError, DataError, CheckpointError
        print(f"qkv demo: error: {e}", file=sys.stderr)
        return None, 2
    except OSError as e:  # a write the trainer does not wrap itself (train.log, tokenizers)
        print(f"qkv demo: error: cannot write {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return None, 2


def run(args: argparse.Namespace) -> int:
    """The demo ``args.which`` names; returns the exit status."""
    if args.which == "t2i":
        from qkv.cli.text_to_image import run_demo

        return run_demo(args)
    return run_lm(args) if args.which == "lm" else run_translation(args)


def run_translation(args: argparse.Namespace) -> int:
    """Train, evaluate, translate and plot; returns the exit status."""
    from qkv.train.evaluate import score
    from qkv.train.translate import Translator
    from qkv.viz.alignment import plot_alignment

    start = time.perf_counter()
    loaded = demo_config(args, DEMO_CONFIG, "runs/demo")
    if loaded is None:
        return 2
    config, resume = loaded
    out = Path(config.output.dir)

    section("1. Training a small Transformer on the built-in corpus: US English dates → German dates")
    _, status = train_demo(config, resume=resume, again=f"qkv demo --out {out}")
    if status:
        return status

    section("2. Held-out test set (sentences never seen in training), beam 5")
    sources, references = _read_lines(out / "data" / "test.src"), _read_lines(out / "data" / "test.tgt")
    translator = Translator.load(out)
    results = translator.translate(sources, beam=5)
    scores = score([r.text for r in results], references)
    print(
        f"{len(sources)} sentences: exact match {scores.exact_match:.1f}%, BLEU {scores.bleu:.1f}, "
        f"chrF {scores.chrf:.1f}"
    )
    print(f"  BLEU|{scores.bleu_signature}\n  {scores.chrf_name}|{scores.chrf_signature}")

    section("3. Some translations, and where the model looked")
    shown = translator.translate(sources[:EXAMPLES], beam=5, need_attention=True)
    for r, ref in zip(shown, references[:EXAMPLES], strict=True):
        mark = "✓" if r.text == ref else "✗"
        print(f"  {mark} {r.source!r:40} → {r.text!r}" + ("" if r.text == ref else f"   (reference {ref!r})"))
    plot_path = out / "alignment.png"
    first = shown[0]
    assert first.hypothesis is not None, "the demo translates with attention"
    plot_alignment(first.hypothesis.cross_attention, first.src_tokens, first.tgt_tokens, path=plot_path)
    print(f"\nwrote the cross-attention of {first.source!r} → {first.text!r} to {plot_path}")
    print(
        f"\ndone in {time.perf_counter() - start:.0f} s. Next: `qkv translate --model {out}`, "
        f'`qkv show "The cat sat because it was tired."`, `qkv explain`, `qkv bench --quick`.'
    )
    return 0


def run_lm(args: argparse.Namespace) -> int:
    """Sample an untrained GPT, train it, sample it again and score the held-out text; the exit status."""
    import torch

    from qkv.models.lm import TransformerLM
    from qkv.train.ddp import DistContext
    from qkv.train.lm_inference import LanguageModel
    from qkv.train.tasks.lm import LanguageModelingTask
    from qkv.train.trainer import seed_everything

    start = time.perf_counter()
    loaded = demo_config(args, LM_DEMO_CONFIG, "runs/demo-lm")
    if loaded is None:
        return 2
    config, resume = loaded
    out = Path(config.output.dir)

    section("1. A small GPT before training: samples from random weights")
    try:
        task = LanguageModelingTask(config, DistContext(), lambda line: None)
        task.prepare(resume=resume)
        seed_everything(config.training.seed)  # the weights training starts from
        untrained = task.build_model().eval()
        assert isinstance(untrained, TransformerLM)
    except (ValueError, OSError) as e:  # DataError, ConfigError, a write of the tokenizer
        print(f"qkv demo: error: {e}", file=sys.stderr)
        return 2
    print(f"{task.describe()}\n{sum(p.numel() for p in untrained.parameters()):,} parameters")
    for prompt in LM_PROMPTS:
        sample = task.sample(untrained, torch.device("cpu"), LM_SAMPLE_TOKENS, prompt=prompt)
        print(f"  {prompt!r} → {sample!r}")

    section("2. Training it on Python's documentation, one character at a time")
    _, status = train_demo(config, resume=resume, again=f"qkv demo lm --out {out}")
    if status:
        return status

    section("3. After training: samples, and how well it predicts the held-out text")
    lm = LanguageModel.load(out)
    for prompt in LM_PROMPTS:
        text = "".join(lm.generate(prompt, LM_SAMPLE_TOKENS, seed=config.training.seed))
        print(f"  {prompt!r} → {text!r}")
    score = lm.evaluate(task.read_text()[1])
    print(
        f"\nheld-out text ({score.chars:,} characters): {score.bpc:.3f} bits per character, "
        f"perplexity {score.ppl:.2f} per token"
    )
    print(
        f'\ndone in {time.perf_counter() - start:.0f} s. Next: `qkv generate --model {out} --prompt "class"`, '
        f'`qkv evaluate --model {out} --text FILE`, `qkv show --model {out} "def f(x):"`.'
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo", help="train, evaluate and show a translation model (or, with `lm`, a small GPT) on built-in data"
    )
    p.add_argument(
        "which",
        nargs="?",
        choices=("translation", "lm", "t2i"),
        default="translation",
        help="translation (default): dates into German; lm: a character-level GPT on Python's documentation; t2i: "
        "text to image on captioned scenes",
    )
    p.add_argument(
        "--out", metavar="DIR", help="model directory (default runs/demo, runs/demo-lm or runs/demo-t2i for the others)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the built-in demo config, e.g. training.max_steps=200",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.set_defaults(run=run)
