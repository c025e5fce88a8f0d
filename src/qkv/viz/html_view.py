"""A self-contained HTML page to explore attention, in the spirit of bertviz's head view and model view.

One file, inline CSS and JavaScript, the weights embedded as JSON: it opens offline, from disk, with no
network and no external resource (a Content-Security-Policy in the page forbids any load).

- Head view: the attending tokens in a left column, the attended-to tokens in a right column, an SVG line
  for every non-zero weight with opacity = weight and one color per head. Hovering a token shows only its
  lines; clicking it keeps them. A dropdown picks the layer, checkboxes toggle heads.
- Model view: a grid of thumbnails, one per layer (row) and head (column); clicking one shows it above.
- Several kinds of attention (encoder, decoder, cross) can share a page; a dropdown picks the kind.

The state is read from the URL fragment (or query), e.g. ``view.html#kind=cross&layer=2&heads=0,3&token=5``
(``key=j`` instead of ``token=i`` shows the lines into attended-to token ``j``), and written back to it as it
changes, so a view can be shared by its URL.

Weights are embedded rounded to ``DECIMALS`` decimals; a weight that rounds to 0 draws no line. The page size
grows as ``layers·H·L·S`` (about 7 bytes a weight): a 12-layer, 12-head model over 100 tokens is ~10 MB.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

DECIMALS = 4
DEFAULT_KIND = "attention"

TokenSpec = Sequence[str] | Mapping[str, Sequence[str]]


def _to_numpy(attentions: object, name: str) -> np.ndarray:
    detach = getattr(attentions, "detach", None)
    if callable(detach):  # a torch tensor, possibly on a GPU or requiring grad
        attentions = detach().to("cpu").double().numpy()
    try:
        array = np.asarray(attentions, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers (a tensor, array or nested lists); got {error}") from None
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 4 or 0 in array.shape:
        hint = ": pick one sequence of the batch, e.g. attentions[0]" if array.ndim == 5 else ""
        raise ValueError(f"{name} has shape {tuple(array.shape)}; expected (layers, H, L, S){hint}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (array < 0).any():
        raise ValueError(f"{name} contains negative weights (smallest {array.min():.3g}); expected >= 0")
    return array


def _tokens_for(spec: TokenSpec | None, kind: str, count: int, what: str, dimension: str) -> list[str] | None:
    """The token list for ``kind`` from a single list or a ``{kind: list}`` mapping, checked to have ``count``."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        if kind not in spec:
            if what == "key_tokens":
                return None
            raise ValueError(f"{what} has no entry for attention kind {kind!r} (has {sorted(spec)})")
        spec = spec[kind]
    if isinstance(spec, str):
        raise ValueError(f"{what} for {kind!r} must be a list of strings, not one string {spec[:40]!r}")
    tokens = [str(t) for t in spec]
    if len(tokens) != count:
        raise ValueError(
            f"{what} for {kind!r}: {len(tokens)} tokens given but the attention has {dimension} = {count}; "
            "give one token per position"
        )
    return tokens


def view_data(
    attentions: object | Mapping[str, object],
    tokens: TokenSpec,
    *,
    key_tokens: TokenSpec | None = None,
    title: str = "Attention",
) -> dict[str, object]:
    """The JSON the page embeds: ``{"title", "kinds": [{"name", "tokens", "key_tokens", "layers", "heads",
    "attention"}]}``, ``attention[layer][head][i][j]`` rounded to ``DECIMALS``. Arguments as :func:`render_html`.
    """
    named = dict(attentions) if isinstance(attentions, Mapping) else {DEFAULT_KIND: attentions}
    if not named:
        raise ValueError("attentions is an empty mapping; give at least one kind of attention")
    kinds = []
    for name, value in named.items():
        label = f"attentions[{name!r}]" if isinstance(attentions, Mapping) else "attentions"
        array = _to_numpy(value, label)
        layers, heads, rows, cols = array.shape
        rows_tokens = _tokens_for(tokens, name, rows, "tokens", "L (shape[-2])")
        if rows_tokens is None:
            raise ValueError("tokens is required: one string per attending position")
        cols_tokens = _tokens_for(key_tokens, name, cols, "key_tokens", "S (shape[-1])")
        if cols_tokens is None:
            if rows != cols:
                raise ValueError(
                    f"{label} has shape {tuple(array.shape)}: L = {rows} attending but S = {cols} attended-to "
                    f"positions; give key_tokens for {name!r} (cross-attention)"
                )
            cols_tokens = rows_tokens
        kinds.append(
            {
                "name": str(name),
                "tokens": rows_tokens,
                "key_tokens": cols_tokens,
                "layers": layers,
                "heads": heads,
                "attention": np.round(array, DECIMALS).tolist(),
            }
        )
    return {"title": title, "kinds": kinds}


def _asset(name: str) -> str:
    return (resources.files("qkv.viz") / "assets" / name).read_text(encoding="utf-8")


def _script_json(data: object) -> str:
    # Inside <script>, "</script>" or "<!--" in a token would end or break the element; \u escapes are the
    # same JSON for JSON.parse.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(
    attentions: object | Mapping[str, object],
    tokens: TokenSpec,
    *,
    key_tokens: TokenSpec | None = None,
    title: str = "Attention",
) -> str:
    """A self-contained HTML page with a head view and a model view of the attention.

    Args:
        attentions: ``(layers, H, L, L)`` self-attention of one sequence (or ``(1, layers, H, L, L)``;
            ``(layers, H, L, S)`` with ``key_tokens``), or a mapping from a name to such a tensor, e.g.
            ``{"encoder": enc, "decoder": dec, "cross": cross}``; tensors, arrays or nested lists of
            weights ``>= 0``.
        tokens: the ``L`` attending tokens; with a mapping, either one list for every kind or
            ``{name: list}``.
        key_tokens: the ``S`` attended-to tokens when they differ from ``tokens`` (cross-attention); one list
            or ``{name: list}`` (kinds missing from the mapping use their ``tokens``).
        title: the page's title and heading.
    Returns:
        the HTML document.
    Raises:
        ValueError: a shape other than ``(layers, H, L, S)``, negative or non-finite weights, or token lists
            whose lengths do not match ``L``/``S``.

    Example, a translation::

        html = render_html(
            {"encoder": enc, "decoder": dec, "cross": cross},
            tokens={"encoder": src, "decoder": tgt, "cross": tgt},
            key_tokens={"cross": src},
        )
    """
    data = view_data(attentions, tokens, key_tokens=key_tokens, title=title)
    return Template(_asset("view.html")).substitute(
        title=html.escape(title),
        style=_asset("view.css"),
        script=_asset("view.js"),
        data=_script_json(data),
    )


def save_html(
    path: str | Path,
    attentions: object | Mapping[str, object],
    tokens: TokenSpec,
    *,
    key_tokens: TokenSpec | None = None,
    title: str = "Attention",
) -> Path:
    """Write :func:`render_html`'s page to ``path`` (UTF-8); open it in any browser, offline. Returns the path."""
    path = Path(path)
    path.write_text(render_html(attentions, tokens, key_tokens=key_tokens, title=title), encoding="utf-8")
    return path
