"""``qkv generate --model DIR [--prompt TEXT]``: continue text with a trained language model, streaming.

Each prompt is written to stdout followed by its continuation, one piece per sampled token as soon as it is
sampled (KV-cached decoding, flushed at every piece), then a line break. Without ``--prompt``, every line
of stdin is a prompt (read as UTF-8; an empty line starts from the beginning-of-text token), so a file of
prompts gives a continuation each::

    qkv generate --model runs/lm --prompt "The if statement" --max-new-tokens 300 --seed 1
    printf 'def\\nclass\\n' | qkv generate --model runs/lm --temperature 0.6 --top-k 40

With a text-to-image model directory (``task: text_to_image``), ``--prompt`` describes an image and ``--out``
names the PNG to write (:mod:`qkv.cli.text_to_image`)::

    qkv generate --model runs/demo-t2i --prompt "a green triangle above a red circle" --out img.png --num 4

``--seed`` makes the output reproducible. A bad option, a model directory that is not a language model, or
a prompt that does not fit a model with learned positions is one line ``qkv generate: error: ...`` and
exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from qkv.cli import text_to_image

if TYPE_CHECKING:
    from qkv.train.lm_inference import LanguageModel


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue text with a trained language model (task: lm), or draw a prompt (task: text_to_image)",
        description="Sample a continuation of --prompt (or of each line of stdin) from a language model "
        "directory written by qkv train, printing tokens as they are sampled.",
    )
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="language model directory")
    p.add_argument("--prompt", metavar="TEXT", help="the text to continue (default: each line of stdin)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to sample (default 200)")
    p.add_argument(
        "--temperature", type=float, default=0.8, metavar="T", help="sampling temperature; 0 is greedy (default 0.8)"
    )
    p.add_argument("--top-k", type=int, metavar="K", help="sample from the K most probable tokens only")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: the most probable tokens up to P")
    p.add_argument("--seed", type=int, metavar="S", help="random seed, for reproducible output")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--out", type=Path, metavar="FILE", help="text to image: the PNG to write")
    p.add_argument("--num", type=int, metavar="K", help="text to image: images to draw, side by side (default 1)")
    text_to_image.add_sampling_options(p, seed=False)
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"qkv generate: error: {message}", file=sys.stderr)
    return 2


def _stdin_prompts() -> list[str]:
    from qkv.data.parallel import decode_lines

    return decode_lines(sys.stdin.buffer.read(), "stdin")


def run(args: argparse.Namespace) -> int:
    from qkv.data.parallel import DataError
    from qkv.models.lm import check_sampling
    from qkv.train.lm_inference import LanguageModel

    if text_to_image.is_text_to_image(args.model):
        return text_to_image.run_generate(args)
    try:
        given = [f"--{name}" for name in ("out", "num", "steps", "guidance") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: for a text-to-image model; {args.model} is not one")
        check_sampling(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be an int >= 0; got {args.max_new_tokens}")
        lm = LanguageModel.load(args.model, device=args.device)
        prompts = [args.prompt] if args.prompt is not None else _stdin_prompts()
        _check_prompts(lm, prompts, args.max_new_tokens)
    except (OSError, ValueError, DataError) as e:
        return _fail(_flags(str(e)))
    for prompt in prompts:
        _write(
            prompt,
            lm.generate(
                prompt,
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
            ),
        )
    return 0


def _check_prompts(lm: LanguageModel, prompts: list[str], max_new_tokens: int) -> None:
    """Every prompt fits the model (checked before any output, so no prompt is half answered)."""
    for prompt in prompts:
        lm.generate(prompt, max_new_tokens)  # checks only: the pieces are produced when iterated


def _write(prompt: str, pieces: Iterable[str]) -> None:
    out = sys.stdout
    out.write(prompt)
    out.flush()
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def _flags(message: str) -> str:
    """Argument names in ``message`` as the options of this command."""
    for name in ("max_new_tokens", "temperature", "top_k", "top_p"):
        message = message.replace(name, "--" + name.replace("_", "-"))
    return message
