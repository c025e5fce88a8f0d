"""Attention maps as text: the token each token attends to most, and the heads linking one token to the others.

Both read an :class:`~qkv.viz.model_attention.AttentionMap` ``(layers, heads, L, S)`` and look only at what a
row can see: not the token itself when rows and columns are the same tokens ("the other token"), and not
what a causal mask hides (a language model's later tokens).
"""

from __future__ import annotations

import numpy as np

from qkv.viz.model_attention import AttentionMap

TOP_HEADS = 3


def visible_keys(amap: AttentionMap, query: int) -> list[int]:
    """The columns row ``query`` can attend to, itself excluded when rows and columns are the same tokens."""
    rows, cols = amap.weights.shape[-2:]
    last = query + cols - rows if amap.causal else cols - 1
    return [j for j in range(last + 1) if not (amap.same_tokens and j == query)]


def top_heads(
    attentions: np.ndarray,
    query: int,
    layer: int | None = None,
    head: int | None = None,
    count: int = TOP_HEADS,
    keys: list[int] | None = None,
) -> list[list[tuple[int, int, float]]]:
    """For every key token ``j`` (of ``keys``, default all), the ``count`` heads with the largest weight from
    ``query`` to ``j``.

    Args:
        attentions: ``(layers, heads, L, S)``.
        query: the attending token's position.
        layer, head: only this layer (and head) when given.
        keys: the key positions to rank heads for (default: all ``S``).
    Returns:
        ``result[n]`` = ``[(layer, head, weight), ...]`` for key ``keys[n]``, the largest weight first.
    """
    layers, heads = attentions.shape[:2]
    candidates = [
        (l, h)
        for l in range(layers)
        for h in range(heads)
        if (layer is None or l == layer) and (head is None or h == head)
    ]
    rows = []
    for j in range(attentions.shape[-1]) if keys is None else keys:
        scored = sorted(((l, h, float(attentions[l, h, query, j])) for l, h in candidates), key=lambda c: -c[2])
        rows.append(scored[:count])
    return rows


def _key_words(amap: AttentionMap) -> str:
    """What ``--top`` lists, e.g. ``other token``, ``earlier token``, ``source token``."""
    if amap.same_tokens:
        return "earlier token" if amap.causal else f"other {amap.key_name}"
    return f"{amap.key_name} it can see" if amap.causal else amap.key_name


def render_top(amap: AttentionMap, query: int, layer: int | None = None, head: int | None = None) -> str:
    """The ``--top`` table: for each token ``query`` can attend to, the heads attending most from it to that one."""
    tokens, keys = amap.tokens, amap.key_tokens
    scope = "all layers" if layer is None else f"layer {layer}" + ("" if head is None else f", head {head}")
    if not amap.same_tokens or amap.causal:
        scope += f" of the {amap.described}"
    columns = visible_keys(amap, query)
    header = f"from {tokens[query]!r} (position {query}) to each {_key_words(amap)}"
    if not columns:
        return f"{header}: none; causal attention lets position {query} see only itself"
    rows = top_heads(amap.weights, query, layer, head, keys=columns)
    width = max(5, *(len(t) for t in keys))
    count = len(rows[0])
    lines = [
        f"{header}: the {count} strongest head(s) of {scope} as L<layer> H<head> weight",
        (f"{'pos':>4}  {'token':<{width}}  " + "   ".join(f"{_ordinal(n):<13}" for n in range(1, count + 1))).rstrip(),
    ]
    for j, best in zip(columns, rows, strict=True):
        cells = "   ".join(f"{f'L{l} H{h}':<8}{w:.3f}" for l, h, w in best)
        lines.append(f"{j:>4}  {keys[j]:<{width}}  {cells}".rstrip())
    return "\n".join(lines)


def render_summary(amap: AttentionMap, layer: int | None, head: int | None, title: str) -> str:
    """For every row token, the (other) token it attends to most: per layer, per head of ``layer``, or one head.

    A row that can see no other token (the first of a causal self-attention) shows ``-``.
    """
    attentions, tokens, keys = amap.weights, amap.tokens, amap.key_tokens
    layers, heads, length, columns = attentions.shape
    if layer is None:
        panels, names, what = attentions.mean(axis=1), [f"L{l}" for l in range(layers)], "head average of each layer"
    elif head is None:
        panels, names, what = attentions[layer], [f"H{h}" for h in range(heads)], f"each head of layer {layer}"
    else:
        panels, names, what = attentions[layer, head][None], [f"L{layer} H{head}"], f"layer {layer}, head {head}"
    others = panels.copy()
    if amap.same_tokens and length > 1:
        others[:, np.arange(length), np.arange(length)] = -1.0  # "other token": never itself
    best = others.argmax(axis=-1)  # (panels, L)
    seen = np.take_along_axis(others, best[..., None], axis=-1)[..., 0] > 0
    width = max(5, *(len(t) for t in tokens))
    cell = max(width, *(len(n) for n in names), *(len(k) for k in keys))
    count = (
        plural(length, "token")
        if amap.same_tokens
        else f"{plural(length, amap.query_name)} x {plural(columns, amap.key_name)}"
    )
    other = "other " if amap.same_tokens else ""
    lines = [
        f"{title}: {plural(layers, 'layer')} x {plural(heads, 'head')}, {count}" + ("; causal" if amap.causal else ""),
        f"the {other}{amap.key_name} each {amap.query_name} attends to most ({what}):",
        (f"{'pos':>4}  {'token':<{width}}  " + "  ".join(f"{n:<{cell}}" for n in names)).rstrip(),
    ]
    for i, token in enumerate(tokens):
        cells = "  ".join(f"{keys[best[p, i]] if seen[p, i] else '-':<{cell}}" for p in range(len(names)))
        lines.append(f"{i:>4}  {token:<{width}}  {cells}".rstrip())
    return "\n".join(lines)


def plural(count: int, word: str) -> str:
    """``"1 layer"``, ``"6 layers"``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")
