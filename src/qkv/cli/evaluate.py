"""``qkv evaluate --model DIR --src FILE --ref FILE [--beam N]``: translate a test set and score it;
``qkv evaluate --model DIR --text FILE``: score a text under a language model; ``qkv evaluate --model DIR
[--images ROOT]``: the accuracy of an image classifier.

Prints corpus BLEU and chrF with their sacrebleu signatures (scores are comparable only under equal
signatures) and the exact-match rate::

    BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0 = 35.2 66.7/40.0/... (BP = ...)
    chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0 = 61.03
    exact match = 12.00% (12/100)

``--hyp FILE`` also writes the translations, a chunk of lines at a time as they are done (its directory is
checked before any work); ``--json`` prints the scores as one JSON object instead. The decoding options
are ``qkv translate``'s.

With ``--text FILE`` and a language model directory (``task: lm``) it prints the loss (nats per token),
perplexity, and bits per character and per UTF-8 byte of the whole file (see
:mod:`qkv.train.lm_inference`)::

    loss = 1.4321 nats/token, perplexity = 4.19 (111,540 tokens)
    bits per character = 2.066 (111,540 characters), bits per byte = 2.066 (111,540 bytes)

With an image classifier (``task: image_classification``) it prints the accuracy, loss and per-class
accuracy on ``--images ROOT`` (a folder with one sub-folder per class, named as the model's classes) or,
without it, on the test split the run held out (the built-in digits' is always there; a folder's when it is
still where training read it)::

    accuracy = 98.51% (265/269 images), loss = 0.0612
    per class: 0 100.0% | 1 100.0% | ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qkv.cli.paths import check_output_file
from qkv.cli.translate import add_decoding_options, output_stream

if TYPE_CHECKING:
    from qkv.train.translate import Translator


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="translate a test set and report BLEU, chrF and exact match, or score a text under a language model",
        description="Translate --src with a model directory and score the translations against --ref "
        "(sacrebleu BLEU and chrF with signatures, exact match); or, with --text and a language model, "
        "report the text's loss, perplexity and bits per character and byte.",
    )
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory (qkv train's output.dir)")
    p.add_argument("--src", type=Path, metavar="FILE", help="source sentences, one a line")
    p.add_argument("--ref", type=Path, metavar="FILE", help="reference translations, line by line")
    p.add_argument("--text", type=Path, metavar="FILE", help="a UTF-8 text to score under a language model")
    p.add_argument(
        "--images",
        type=Path,
        metavar="ROOT",
        help="image classifiers: a folder of class folders to score (default: the run's test split)",
    )
    p.add_argument("--beam", type=int, default=5, metavar="N", help="beam size; 1 is greedy search (default 5)")
    add_decoding_options(p)
    p.add_argument("--hyp", type=Path, metavar="FILE", help="also write the translations to FILE")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"qkv evaluate: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from qkv.models.vit import VisionTransformer
    from qkv.train.lm_inference import model_type_of

    if args.images is not None or model_type_of(args.model) == VisionTransformer.model_type:
        if args.src is not None or args.ref is not None or args.text is not None:
            return _fail("--src, --ref and --text apply to text models; an image classifier takes --images ROOT")
        return run_images(args)
    if args.text is not None:
        if args.src is not None or args.ref is not None:
            return _fail("give --text (a language model) or --src and --ref (a translation model), not both")
        return run_lm(args)
    if args.src is None or args.ref is None:
        return _fail(f"{'--src' if args.src is None else '--ref'} is required (or --text for a language model)")
    return run_translation(args)


def run_lm(args: argparse.Namespace) -> int:
    """Score ``--text`` under the language model ``--model``."""
    from qkv.data.parallel import DataError
    from qkv.data.text import read_text
    from qkv.train.lm_inference import LanguageModel

    try:
        text = read_text(args.text)
        lm = LanguageModel.load(args.model, device=args.device)
        result = lm.evaluate(text)
    except (OSError, ValueError, DataError) as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps({**result.to_dict(), "model": str(args.model), "text": str(args.text)}, indent=2))
    else:
        print(f"loss = {result.loss:.4f} nats/token, perplexity = {result.ppl:.2f} ({result.tokens:,} tokens)")
        print(
            f"bits per character = {result.bpc:.3f} ({result.chars:,} characters), "
            f"bits per byte = {result.bpb:.3f} ({result.bytes:,} bytes)"
        )
    return 0


def run_images(args: argparse.Namespace) -> int:
    """Score the image classifier ``--model`` on ``--images`` (or on its run's test split)."""
    from qkv.data.parallel import DataError
    from qkv.train.image_inference import ImageClassifier
    from qkv.train.tasks.image import per_class_line

    try:
        classifier = ImageClassifier.load(args.model, device=args.device)
        images = classifier.test_split() if args.images is None else classifier.read_folder(args.images)
        scores = classifier.evaluate(images)
    except (OSError, ValueError, DataError) as e:
        return _fail(str(e))
    per_class = scores.per_class(classifier.class_names)
    if args.json:
        data = {
            "accuracy": scores.accuracy,
            "loss": scores.loss,
            "images": scores.images,
            "per_class_accuracy": per_class,
            "confusion_matrix": scores.confusion.tolist(),
            "model": str(args.model),
            "data": "test split" if args.images is None else str(args.images),
        }
        print(json.dumps(data, indent=2))
    else:
        correct = int(scores.confusion.diag().sum())
        print(f"accuracy = {scores.accuracy:.2%} ({correct}/{scores.images} images), loss = {scores.loss:.4f}")
        print(per_class_line(per_class).strip())
    return 0


def run_translation(args: argparse.Namespace) -> int:
    """Translate ``--src`` and score it against ``--ref``."""
    from qkv.data.parallel import DataError, read_lines
    from qkv.models.lm import TransformerLM
    from qkv.train.evaluate import score
    from qkv.train.lm_inference import model_type_of
    from qkv.train.translate import Translator, check_decoding_options, output_length_cap

    try:
        check_decoding_options(
            beam=args.beam,
            length_penalty=args.length_penalty,
            max_tokens=args.max_tokens,
            max_output_length=args.max_output_length,
            flags=True,
        )
        if args.hyp is not None:
            check_output_file(args.hyp, "--hyp")
        if model_type_of(args.model) == TransformerLM.model_type:
            raise ValueError(
                f"{args.model} holds a language model; score a text with qkv evaluate --model {args.model} "
                "--text FILE, or sample with qkv generate"
            )
        sources, references = read_lines(args.src), read_lines(args.ref)
        if len(sources) != len(references):
            raise ValueError(
                f"{args.src} has {len(sources)} lines but {args.ref} has {len(references)}; expected the same"
            )
        translator = Translator.load(args.model, device=args.device)
        output_length_cap(translator.model, args.max_output_length, flags=True)
        hypotheses = translate_all(translator, sources, args)
    except (OSError, ValueError, DataError) as e:
        return _fail(str(e))
    scores = score(hypotheses, references)
    if args.json:
        print(json.dumps({**scores.to_dict(), "beam": args.beam, "model": str(args.model)}, indent=2))
    else:
        print("\n".join(scores.lines()))
    return 0


def translate_all(translator: Translator, sources: list[str], args: argparse.Namespace) -> list[str]:
    """The translations of ``sources``, also written to ``--hyp`` (when given) a chunk at a time."""
    from qkv.train.translate import chunks

    hypotheses: list[str] = []
    with contextlib.ExitStack() as stack:
        hyp = None if args.hyp is None else stack.enter_context(output_stream(args.hyp))
        for chunk in chunks(sources):
            results = translator.translate(
                chunk,
                beam=args.beam,
                length_penalty=args.length_penalty,
                max_tokens=args.max_tokens,
                max_output_length=args.max_output_length,
            )
            texts = [r.text for r in results]
            hypotheses += texts
            if hyp is not None:
                hyp.write("".join(f"{h}\n" for h in texts))
                hyp.flush()
    return hypotheses
