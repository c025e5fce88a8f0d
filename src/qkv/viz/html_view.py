"""A self-contained HTML page to explore attention, in the spirit of bertviz's head view and model view.

One file, inline CSS and JavaScript, the weights embedded as JSON: it opens offline, from disk, with no
network and no external resource (a Content-Security-Policy in the page forbids any load).

- Head view: the attending tokens in a left column, the attended-to tokens in a right column, an SVG line
  for every non-zero weight with opacity = weight and one color per head. Hovering a token shows only its
  lines; clicking it keeps them. A dropdown picks the layer, checkboxes toggle heads.
- Model view: a grid of thumbnails, one per layer (row) and head (column); clicking one shows it above.
- Several kinds of attention (encoder, decoder, cross) can share a page; a dropdown picks the kind.
- A causal kind (a language model's or a decoder's self-attention: token ``i`` sees tokens ``0..i`` only)
  says so above the head view; focusing a token greys out the tokens it cannot see (or that cannot see it),
  and the thumbnails paint those cells grey, so "masked" reads differently from "a weight of 0".

The state is read from the URL fragment (or query), e.g. ``view.html#kind=cross&layer=2&heads=0,3&token=5``
(``key=j`` instead of ``token=i`` shows the lines into attended-to token ``j``), and written back to it as it
changes, so a view can be shared by its URL.

Weights are embedded rounded to ``DECIMALS`` decimals; a weight that rounds to 0 draws no line. The page size
grows as ``layers·H·L·S`` (about 7 bytes a weight): a 12-layer, 12-head model over 100 tokens is ~10 MB.
"""

from __future__ import annotations

import html
import json
from collections.abc import Collection, Mapping, Sequence
from importlib import resources
from pathlib import Path
from string import Template

import numpy as np

DECIMALS = 4
DEFAULT_KIND = "attention"

TokenSpec = Sequence[str] | Mapping[str, Sequence[str]]
CausalSpec = bool | Collection[str]


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


def _check_causal(array: np.ndarray, label: str) -> None:
    """``ValueError`` unless every weight beyond the causal diagonal is 0: query ``i`` of ``L`` sees keys
    ``j <= i + S - L`` (the last query sees every key, as in a decoder reading a cache of ``S - L`` tokens)."""
    rows, cols = array.shape[-2:]
    if rows > cols:
        raise ValueError(f"{label} is marked causal but has L = {rows} > S = {cols}; a query would see no key")
    hidden = ~np.tri(rows, cols, cols - rows, dtype=bool)
    seen = array[..., hidden]
    if seen.size and seen.max() > 0:
        layer, head, i, j = np.argwhere(array * hidden > 0)[0]
        raise ValueError(
            f"{label} is marked causal but weight [{layer}, {head}, {i}, {j}] = {array[layer, head, i, j]:.3g} "
            f"lies above the diagonal, where it must be 0"
        )


def _causal_names(causal: CausalSpec, names: Collection[str]) -> set[str]:
    if isinstance(causal, bool):
        return set(names) if causal else set()
    if isinstance(causal, str):
        raise ValueError(f"causal must be a bool or a collection of kind names, not one string {causal!r}")
    unknown = sorted(set(causal) - set(names))
    if unknown:
        raise ValueError(f"causal names {unknown}, which are not kinds of attentions (kinds: {sorted(names)})")
    return set(causal)


def view_data(
    attentions: object | Mapping[str, object],
    tokens: TokenSpec,
    *,
    key_tokens: TokenSpec | None = None,
    title: str = "Attention",
    causal: CausalSpec = False,
) -> dict[str, object]:
    """The JSON the page embeds: ``{"title", "kinds": [{"name", "tokens", "key_tokens", "layers", "heads",
    "causal", "attention"}]}``, ``attention[layer][head][i][j]`` rounded to ``DECIMALS``. Arguments as
    :func:`render_html`.
    """
    named = dict(attentions) if isinstance(attentions, Mapping) else {DEFAULT_KIND: attentions}
    if not named:
        raise ValueError("attentions is an empty mapping; give at least one kind of attention")
    causal_names = _causal_names(causal, [str(name) for name in named])
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
        if str(name) in causal_names:
            _check_causal(array, label)
        kinds.append(
            {
                "name": str(name),
                "tokens": rows_tokens,
                "key_tokens": cols_tokens,
                "layers": layers,
                "heads": heads,
                "causal": str(name) in causal_names,
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
    causal: CausalSpec = False,
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
        causal: the kinds where query ``i`` sees keys ``0..i`` only (``i + S - L`` when ``L < S``): ``True``
            for every kind, or their names. The page says so and greys out what a token cannot see.
    Returns:
        the HTML document.
    Raises:
        ValueError: a shape other than ``(layers, H, L, S)``, negative or non-finite weights, token lists
            whose lengths do not match ``L``/``S``, or a causal kind with a weight above its diagonal.

    Example, a translation::

        html = render_html(
            {"encoder": enc, "decoder": dec, "cross": cross},
            tokens={"encoder": src, "decoder": tgt, "cross": tgt},
            key_tokens={"cross": src},
        )
    """
    data = view_data(attentions, tokens, key_tokens=key_tokens, title=title, causal=causal)
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
    causal: CausalSpec = False,
) -> Path:
    """Write :func:`render_html`'s page to ``path`` (UTF-8); open it in any browser, offline. Returns the path."""
    path = Path(path)
    page = render_html(attentions, tokens, key_tokens=key_tokens, title=title, causal=causal)
    path.write_text(page, encoding="utf-8")
    return path
