"""``qkv translate --model DIR [--beam 5] [--input FILE|-] [--attention PLOT.png]``: translate text.

Reads one sentence a line from ``--input`` (a file, or ``-`` for stdin, the default) and writes one
translation a line, in input order, to stdout (or ``--output``); an empty line stays empty. ``--beam 1`` is
greedy search. ``--attention PLOT.png`` also saves the alignment of the first sentence: the chosen
hypothesis' cross-attention (last layer, mean over heads), source tokens across, target tokens down.

Lines end at ``\n`` only (one ``\r`` before it is dropped), so line ``n`` of the output is always the
translation of line ``n`` of the input, even when a line holds a form feed or U+2028, which
``str.splitlines`` would also split at. Input that is not UTF-8 is refused, naming the line. Translations
are written a chunk of input lines at a time (:data:`~qkv.train.translate.DEFAULT_CHUNK_SIZE`), so a run
stopped midway leaves the finished lines written. Options and output paths are checked before any work.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from qkv.cli.paths import check_output_file

if TYPE_CHECKING:
    from qkv.deploy.ctranslate2_engine import CTranslate2Translator
    from qkv.train.translate import Translation, Translator

ENGINES = ("qkv", "ctranslate2")

EPILOG = """\
examples:
  echo "three hundred and twenty-one" | qkv translate --model runs/demo
  qkv translate --model runs/demo --input test.src --output test.hyp --beam 5
  qkv translate --model runs/demo --input - --attention alignment.png < sentences.txt
  qkv translate --model runs/demo-ct2 --engine ctranslate2 < sentences.txt   (an export of qkv export)
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
    p.add_argument(
        "--engine",
        default="qkv",
        choices=ENGINES,
        help="qkv (default): a qkv train model directory; ctranslate2: a directory of qkv export --format ctranslate2",
    )
    add_decoding_options(p)
    p.add_argument(
        "--attention",
        type=Path,
        metavar="PLOT.png",
        help="save the first sentence's cross-attention alignment (.png, .svg or .pdf)",
    )
    p.set_defaults(run=run)


def add_decoding_options(p: argparse.ArgumentParser) -> None:
    """The options ``translate`` and ``evaluate`` share: length penalty, batch budget, output length, device."""
    from qkv.models.search import MAX_LENGTH_PENALTY
    from qkv.train.translate import DEFAULT_MAX_OUTPUT_LENGTH

    p.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        metavar="ALPHA",
        help=f"GNMT alpha, 0 to {MAX_LENGTH_PENALTY:g}; 0 ranks by probability alone (default 1.0)",
    )
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="padded tokens per batch (default 4096)")
    p.add_argument(
        "--max-output-length",
        type=int,
        metavar="N",
        help="the most tokens of a translation: 1.5 x its source tokens + 10, at most N "
        f"(default {DEFAULT_MAX_OUTPUT_LENGTH}, or fewer for a model with fewer learned positions)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where to run (default cpu)")


def _fail(message: str) -> int:
    print(f"qkv translate: error: {message}", file=sys.stderr)
    return 2


def read_input(name: str) -> list[str]:
    """The lines of file ``name`` (``-``: stdin), as :func:`qkv.data.parallel.decode_lines` splits them.

    Raises:
        ValueError: the file cannot be read or is not UTF-8 (naming the line).
    """
    from qkv.data.parallel import decode_lines

    if name == "-":
        stream = getattr(sys.stdin, "buffer", None)
        # A text-only stdin (e.g. io.StringIO): surrogate escapes turn undecodable bytes back into bytes.
        data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        return decode_lines(data, "stdin")
    try:
        data = Path(name).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read --input {name}: {e.strerror or e}") from None
    return decode_lines(data, f"--input {name}")


@contextmanager
def output_stream(path: Path | None) -> Iterator[TextIO]:
    """``path`` opened for writing (UTF-8), or stdout when ``None``."""
    if path is None:
        yield sys.stdout
        return
    with path.open("w", encoding="utf-8") as f:
        yield f


def check_outputs(args: argparse.Namespace) -> None:
    """``ValueError`` if ``--output`` or ``--attention`` cannot be written (checked before translating)."""
    if args.output is not None:
        check_output_file(args.output, "--output")
    if args.attention is not None:
        from qkv.viz.heatmap import SAVE_FORMATS

        if args.attention.suffix.lower() not in SAVE_FORMATS:
            raise ValueError(f"--attention {args.attention}: the suffix must be one of {', '.join(SAVE_FORMATS)}")
        check_output_file(args.attention, "--attention")


def load_translator(args: argparse.Namespace) -> Translator | CTranslate2Translator:
    """The translator of ``--model`` for ``--engine``, after checking ``--max-output-length`` against it."""
    if args.engine == "ctranslate2":
        from qkv.deploy.ctranslate2_engine import CTranslate2Translator

        engine = CTranslate2Translator.load(args.model, device=args.device)
        engine.output_length_cap(args.max_output_length, flags=True)
        return engine
    from qkv.train.translate import Translator, output_length_cap

    translator = Translator.load(args.model, device=args.device)
    output_length_cap(translator.model, args.max_output_length, flags=True)
    return translator


def write_translations(
    translator: Translator | CTranslate2Translator, sentences: list[str], out: TextIO, args: argparse.Namespace
) -> tuple[int, Translation] | None:
    """Translate ``sentences`` a chunk at a time, writing each chunk's lines to ``out`` as it finishes.

    Returns:
        With ``--attention``: ``(line, translation)`` of the first non-empty sentence (its cross-attention
        kept; later chunks are translated without attention), or ``None`` when every line is empty.
    """
    from qkv.train.translate import chunks

    first: tuple[int, Translation] | None = None
    done = 0
    for chunk in chunks(sentences):
        want_attention = args.attention is not None and first is None
        results = translator.translate(
            chunk,
            beam=args.beam,
            length_penalty=args.length_penalty,
            max_tokens=args.max_tokens,
            max_output_length=args.max_output_length,
            need_attention=want_attention,
        )
        out.write("".join(f"{r.text}\n" for r in results))
        out.flush()
        if want_attention:
            found = next((i for i, r in enumerate(results) if r.hypothesis is not None), None)
            if found is not None:
                first = (done + found + 1, results[found])
        done += len(chunk)
    return first


def run(args: argparse.Namespace) -> int:
    from qkv.data.parallel import DataError
    from qkv.train.translate import check_decoding_options

    try:
        check_decoding_options(
            beam=args.beam,
            length_penalty=args.length_penalty,
            max_tokens=args.max_tokens,
            max_output_length=args.max_output_length,
            flags=True,
        )
        check_outputs(args)
        translator = load_translator(args)  # before stdin: a bad --model fails at once
        sentences = read_input(args.input)
        with output_stream(args.output) as out:
            first = write_translations(translator, sentences, out, args)
    except BrokenPipeError:
        raise  # the reader has gone: qkv.cli.main ends quietly
    except (ImportError, OSError, ValueError, DataError) as e:  # ImportError: --engine ctranslate2 without it
        return _fail(str(e))
    if args.attention is not None:
        if first is None:
            return _fail("--attention: no non-empty input sentence to plot")
        from qkv.viz.alignment import plot_alignment

        line, result = first
        assert result.hypothesis is not None, "first holds a sentence with a hypothesis"
        plot_alignment(result.hypothesis.cross_attention, result.src_tokens, result.tgt_tokens, path=args.attention)
        print(f"wrote the alignment of sentence {line} to {args.attention}", file=sys.stderr)
    return 0
