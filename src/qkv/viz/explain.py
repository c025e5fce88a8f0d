"""The attention formula, ``softmax(Q·Kᵀ/√d_k)·V``, walked step by step on a small example.

For each query token, as a teacher would at a whiteboard:

1. the raw dot products ``q·kⱼ`` with every key,
2. the scaled scores ``sⱼ = q·kⱼ / √d_k``,
3. the softmax weights ``wⱼ = exp(sⱼ) / Σ exp(sᵢ)`` (masked keys get ``0``),
4. the output ``Σ wⱼ·vⱼ``, the weighted sum of the value rows.

:func:`explain` computes the steps in float64 and takes the weights and outputs from
:func:`qkv.attention` itself (the ``math`` backend), after checking that the step-by-step numbers agree
with it. :func:`render_text` writes the walk-through with 4 decimals; :func:`to_json` gives the same
numbers, unrounded, for programs. :func:`check_matrix` validates a matrix given as nested lists, with an
error that names the problem, what was given and what was expected.

Shapes: ``q: (L, d_k)`` one row per query token, ``k: (S, d_k)`` and ``v: (S, d_v)`` one row per key.
``S != L`` is cross-attention. Causal masking follows ``qkv.attention(causal=True)``: query ``i`` sees
keys ``j <= i + (S - L)`` (bottom-right aligned; query ``i`` sees keys ``0..i`` when ``S == L``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qkv.ops import attention

Matrix = list[list[float]]

# Hand-picked, not learned: small numbers whose products can be checked by hand, and whose weights differ
# enough from row to row to show attention preferring some tokens over others.
EXAMPLE_TOKENS = ("the", "cat", "sat")
EXAMPLE_Q: Matrix = [
    [1.0, 0.0, 0.5, 1.0],
    [0.0, 2.0, 1.0, 0.0],
    [1.0, 1.0, 0.0, 0.5],
]
EXAMPLE_K: Matrix = [
    [1.0, 0.0, 0.0, 1.0],
    [0.0, 1.0, 1.0, 0.0],
    [1.0, 1.0, 0.0, 0.0],
]
EXAMPLE_V: Matrix = [
    [1.0, 0.0, 0.0, 0.5],
    [0.0, 1.0, 0.5, 0.0],
    [0.5, 0.5, 1.0, 1.0],
]

# exp overflows float64 above ~709; beyond this score magnitude the walk-through subtracts the row's
# largest score first (softmax is unchanged by a shift) and says so.
SHIFT_ABOVE = 20.0
# Above this d_k, "q·k = a×b + c×d + …" would not fit on a line; the sum is summarised instead.
EXPAND_PRODUCTS_UP_TO = 8
# The step-by-step numbers and qkv.attention's must agree to this (both are float64).
AGREEMENT_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Explanation:
    """Every intermediate of ``softmax(Q·Kᵀ/√d_k)·V`` for one small example; all numbers float64.

    Attributes:
        query_tokens: ``L`` names, one per row of ``q``.
        key_tokens: ``S`` names, one per row of ``k`` and ``v``.
        q: ``(L, d_k)`` queries.
        k: ``(S, d_k)`` keys.
        v: ``(S, d_v)`` values.
        causal: whether the causal mask was applied.
        visible: ``(L, S)``: ``True`` where query ``i`` may attend to key ``j`` (qkv's mask convention).
        dots: ``(L, S)`` raw dot products ``q_i·k_j`` (computed for masked pairs too).
        scaled: ``(L, S)`` scores ``dots / √d_k``, before masking.
        shifts: ``(L,)`` the number subtracted from each row's scores before ``exp``: 0, or the row's
            largest visible score when it exceeds ``SHIFT_ABOVE`` in magnitude.
        exps: ``(L, S)`` ``exp(scaled - shift)`` for visible keys, 0 for masked ones.
        sums: ``(L,)`` row sums of ``exps`` (0 for a query that sees no key).
        weights: ``(L, S)`` softmax weights, from ``qkv.attention``; rows sum to 1 (or are all 0).
        outputs: ``(L, d_v)`` ``weights · v``, from ``qkv.attention``.
        max_difference: largest absolute difference between the step-by-step weights and outputs and
            those of ``qkv.attention``.
    """

    query_tokens: list[str]
    key_tokens: list[str]
    q: Matrix
    k: Matrix
    v: Matrix
    causal: bool
    visible: list[list[bool]]
    dots: Matrix
    scaled: Matrix
    shifts: list[float]
    exps: Matrix
    sums: list[float]
    weights: Matrix
    outputs: Matrix
    max_difference: float

    @property
    def d_k(self) -> int:
        """Length of a query/key vector."""
        return len(self.q[0])

    @property
    def d_v(self) -> int:
        """Length of a value vector."""
        return len(self.v[0])

    @property
    def sqrt_d_k(self) -> float:
        """``√d_k``, the divisor of the dot products."""
        return math.sqrt(self.d_k)


def _count(n: int, noun: str) -> str:
    """``1 row``, ``2 rows``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _describe(value: object) -> str:
    """A short, quoted rendering of a bad entry for an error message."""
    text = repr(value) if isinstance(value, str) else _json_like(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_like(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _as_rows(value: object) -> object:
    """Tensors and arrays become nested lists; anything else is returned as given."""
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) and not isinstance(value, (list, tuple)) else value


def check_matrix(value: object, label: str) -> Matrix:
    """Validate a matrix given as a non-empty list of equally long, non-empty rows of finite numbers.

    Args:
        value: nested lists (or tuples) of numbers, e.g. parsed from JSON, or a 2-D tensor/array.
        label: how the error messages name the matrix, e.g. ``"--q"`` or ``"Q"``.
    Returns:
        the matrix as a list of lists of floats, ``(rows, columns)``.
    Raises:
        ValueError: one line naming the problem, e.g. ``"--q: row 2 has 3 numbers but row 1 has 2"``.
    """
    rows = _as_rows(value)
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise ValueError(f"{label}: expected a list of rows like [[1, 2], [3, 4]]; got {_describe(rows)}")
    if len(rows) == 0:
        raise ValueError(f"{label} is empty; expected at least one row of numbers")
    matrix: Matrix = []
    for i, row in enumerate(rows, start=1):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(
                f"{label}: row {i} is {_describe(row)}, not a list of numbers "
                "(a matrix is a list of rows, e.g. [[1, 2], [3, 4]])"
            )
        if len(row) == 0:
            raise ValueError(f"{label}: row {i} is empty; expected at least one number")
        if matrix and len(row) != len(matrix[0]):
            given = _count(len(row), "number")
            raise ValueError(f"{label}: row {i} has {given} but row 1 has {len(matrix[0])}")
        matrix.append([_check_number(x, label, i, j) for j, x in enumerate(row, start=1)])
    return matrix


def _check_number(x: object, label: str, row: int, column: int) -> float:
    where = f"{label}: row {row}, column {column}"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{where} is {_describe(x)}, not a number")
    try:
        number = float(x)
    except OverflowError:
        raise ValueError(f"{where} is too large for float64") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} is {number}, not a finite number")
    return number


def _check_tokens(tokens: Sequence[str] | None, rows: int, noun: str, matrix: str) -> list[str] | None:
    """``tokens`` as a list, checked to be ``rows`` strings; ``noun`` is "token" or "key token"."""
    if tokens is None:
        return None
    if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{noun}s must be a list of strings; got {_describe(tokens)}")
    if len(tokens) != rows:
        raise ValueError(
            f"{_count(len(tokens), noun)} given but {matrix} has {_count(rows, 'row')}; "
            f"give one {noun} per row of {matrix}"
        )
    return list(tokens)


def _names(
    tokens: list[str] | None, key_tokens: list[str] | None, q_rows: int, k_rows: int
) -> tuple[list[str], list[str]]:
    """Query and key names: given ones, else ``t1…`` for self-attention, ``q1…``/``k1…`` for cross."""
    self_attention = q_rows == k_rows
    if tokens is None:
        tokens = [f"{'t' if self_attention and key_tokens is None else 'q'}{i}" for i in range(1, q_rows + 1)]
    if key_tokens is None:
        key_tokens = list(tokens) if self_attention else [f"k{j}" for j in range(1, k_rows + 1)]
    return tokens, key_tokens


def causal_visible(q_rows: int, k_rows: int) -> list[list[bool]]:
    """``(L, S)``: query ``i`` sees key ``j`` iff ``j <= i + (S - L)`` (qkv's bottom-right causal mask)."""
    offset = k_rows - q_rows
    return [[j <= i + offset for j in range(k_rows)] for i in range(q_rows)]


def explain(
    q: object,
    k: object,
    v: object,
    *,
    tokens: Sequence[str] | None = None,
    key_tokens: Sequence[str] | None = None,
    causal: bool = False,
) -> Explanation:
    """Compute every step of ``softmax(Q·Kᵀ/√d_k)·V`` for one small example.

    Args:
        q: ``(L, d_k)`` queries, nested lists of numbers or a 2-D tensor/array.
        k: ``(S, d_k)`` keys.
        v: ``(S, d_v)`` values.
        tokens: ``L`` query names; default ``t1…tL`` (``q1…`` in cross-attention, ``S != L``).
        key_tokens: ``S`` key names; default the query names when ``S == L``, else ``k1…kS``.
        causal: mask keys after each query, as ``qkv.attention(causal=True)`` (bottom-right aligned).
    Returns:
        the :class:`Explanation`; its weights and outputs are ``qkv.attention``'s.
    Raises:
        ValueError: a bad matrix or token list, in one line naming the problem.
        RuntimeError: the step-by-step numbers disagree with ``qkv.attention`` (a bug in qkv).
    """
    qm, km, vm = check_matrix(q, "Q"), check_matrix(k, "K"), check_matrix(v, "V")
    if len(qm[0]) != len(km[0]):
        raise ValueError(
            f"d_k differs: Q has {_count(len(qm[0]), 'column')} but K has {len(km[0])}; q·k needs rows of equal length"
        )
    if len(km) != len(vm):
        raise ValueError(f"K has {_count(len(km), 'row')} but V has {len(vm)}; each key needs exactly one value row")
    query_names, key_names = _names(
        _check_tokens(tokens, len(qm), "token", "Q"),
        _check_tokens(key_tokens, len(km), "key token", "K"),
        len(qm),
        len(km),
    )

    qt, kt, vt = (torch.tensor(m, dtype=torch.float64) for m in (qm, km, vm))
    visible = torch.tensor(
        causal_visible(len(qm), len(km)) if causal else [[True] * len(km)] * len(qm), dtype=torch.bool
    )
    dots = qt @ kt.T
    if not torch.isfinite(dots).all():
        raise ValueError("Q·Kᵀ overflows float64 (some |q·k| > 1.8e308); use smaller numbers")
    scaled = dots / math.sqrt(len(qm[0]))
    row_max = scaled.masked_fill(~visible, float("-inf")).amax(dim=-1)
    shifts = torch.where(torch.isfinite(row_max) & (row_max.abs() > SHIFT_ABOVE), row_max, 0.0)
    exps = torch.where(visible, torch.exp(scaled - shifts[:, None]), 0.0)
    sums = exps.sum(dim=-1)
    steps_weights = exps / torch.where(sums > 0, sums, 1.0)[:, None]
    steps_outputs = steps_weights @ vt

    # One head, no batch: qkv.attention wants (H, L, D).
    outputs, weights = attention(qt[None], kt[None], vt[None], causal=causal, backend="math", return_weights=True)
    outputs, weights = outputs[0], weights[0]
    if not torch.isfinite(outputs).all():
        raise ValueError("weights·V overflows float64 (some outputs > 1.8e308); use smaller values in V")
    difference = max((weights - steps_weights).abs().max().item(), (outputs - steps_outputs).abs().max().item())
    if not difference <= AGREEMENT_TOLERANCE:
        raise RuntimeError(
            f"the step-by-step numbers differ from qkv.attention's by {difference:.3g} "
            f"(expected at most {AGREEMENT_TOLERANCE:g}); this is a bug in qkv"
        )
    return Explanation(
        query_tokens=query_names,
        key_tokens=key_names,
        q=qm,
        k=km,
        v=vm,
        causal=causal,
        visible=visible.tolist(),
        dots=dots.tolist(),
        scaled=scaled.tolist(),
        shifts=shifts.tolist(),
        exps=exps.tolist(),
        sums=sums.tolist(),
        weights=weights.tolist(),
        outputs=outputs.tolist(),
        max_difference=difference,
    )


def example(*, causal: bool = False, tokens: Sequence[str] | None = None) -> Explanation:
    """The built-in example: "the cat sat", ``d_k = d_v = 4``, hand-picked Q, K, V."""
    return explain(EXAMPLE_Q, EXAMPLE_K, EXAMPLE_V, tokens=EXAMPLE_TOKENS if tokens is None else tokens, causal=causal)


def to_json(expl: Explanation) -> dict[str, object]:
    """The explanation as JSON-ready data, numbers unrounded.

    ``dot_products`` and ``scaled_scores`` are given for every key, masked or not; ``visible`` says which
    keys the query may attend to (masked keys have weight 0).
    """
    return {
        "formula": "softmax(Q K^T / sqrt(d_k)) V",
        "causal": expl.causal,
        "d_k": expl.d_k,
        "d_v": expl.d_v,
        "sqrt_d_k": expl.sqrt_d_k,
        "tokens": expl.query_tokens,
        "key_tokens": expl.key_tokens,
        "q": expl.q,
        "k": expl.k,
        "v": expl.v,
        "queries": [
            {
                "token": expl.query_tokens[i],
                "q": expl.q[i],
                "visible": expl.visible[i],
                "dot_products": expl.dots[i],
                "scaled_scores": expl.scaled[i],
                "weights": expl.weights[i],
                "output": expl.outputs[i],
            }
            for i in range(len(expl.q))
        ],
        "weights": expl.weights,
        "outputs": expl.outputs,
    }


# ---- text rendering -------------------------------------------------------------------------------------


def fmt(x: float) -> str:
    """A number with 4 decimals; ``-0.0000`` is written ``0.0000``."""
    text = f"{x:.4f}"
    return text[1:] if text == "-0.0000" else text


def _factor(x: float) -> str:
    """A number inside a product: negatives in parentheses, ``1.0000×(-0.5000)``."""
    text = fmt(x)
    return f"({text})" if text.startswith("-") else text


def fmt_vector(xs: Sequence[float]) -> str:
    """``[1.0000, -0.5000]``."""
    return "[" + ", ".join(fmt(x) for x in xs) + "]"


def _key_label(expl: Explanation, j: int) -> str:
    """``k2 (cat)``, or just ``k2`` when the key's name is ``k2``."""
    label = f"k{j + 1}"
    return label if expl.key_tokens[j] == label else f"{label} ({expl.key_tokens[j]})"


def _table(row_names: Sequence[str], col_names: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Right-aligned columns with a header row, indented by two spaces."""
    name_width = max(len(n) for n in row_names)
    widths = [max(len(col_names[c]), *(len(r[c]) for r in rows)) for c in range(len(col_names))]
    header = " " * name_width + "".join(f"  {n:>{w}}" for n, w in zip(col_names, widths, strict=True))
    lines = ["  " + header.rstrip()]
    for name, row in zip(row_names, rows, strict=True):
        cells = "".join(f"  {x:>{w}}" for x, w in zip(row, widths, strict=True))
        lines.append(f"  {name:<{name_width}}{cells}")
    return lines


def _matrix_lines(title: str, names: Sequence[str], matrix: Matrix) -> list[str]:
    columns = [str(c) for c in range(1, len(matrix[0]) + 1)]
    return [title, *_table(names, columns, [[fmt(x) for x in row] for row in matrix])]


def _intro(expl: Explanation) -> list[str]:
    length, keys = len(expl.q), len(expl.k)
    lines = [
        "Attention(Q, K, V) = softmax(Q·Kᵀ / √d_k) · V, step by step.",
        f"{length} query tokens ({', '.join(expl.query_tokens)}) and {keys} keys "
        f"({', '.join(expl.key_tokens)}); d_k = {expl.d_k}, so √d_k = {fmt(expl.sqrt_d_k)}; "
        f"d_v = {expl.d_v}.",
    ]
    if keys != length:
        lines.append("K has a different number of rows than Q: this is cross-attention.")
    if expl.causal:
        reach = "keys 1..i" if keys == length else f"keys 1..i{keys - length:+d} (aligned at the last key)"
        lines.append(f"Causal mask: query i sees only {reach}; later keys are masked (weight 0).")
    lines.append("")
    key_names = [_key_label(expl, j) for j in range(keys)]
    lines += _matrix_lines("Q, one row per query (what the token is looking for):", expl.query_tokens, expl.q)
    lines += _matrix_lines("K, one row per key (what the token can be found by):", key_names, expl.k)
    lines += _matrix_lines("V, one row per key (what the token passes on):", key_names, expl.v)
    return lines


def _dot_lines(expl: Explanation, i: int) -> list[str]:
    lines = ["  1. Dot products q·kⱼ: how well the query matches each key."]
    for j in range(len(expl.k)):
        label = f"q·{_key_label(expl, j)}"
        if not expl.visible[i][j]:
            lines.append(f"     {label}: masked, this key comes after the query")
        elif expl.d_k <= EXPAND_PRODUCTS_UP_TO:
            pairs = zip(expl.q[i], expl.k[j], strict=True)
            products = " + ".join(f"{_factor(a)}×{_factor(b)}" for a, b in pairs)
            lines.append(f"     {label} = {products} = {fmt(expl.dots[i][j])}")
        else:
            lines.append(f"     {label} = sum of {expl.d_k} products qₙ×kₙ = {fmt(expl.dots[i][j])}")
    return lines


def _scale_lines(expl: Explanation, i: int) -> list[str]:
    lines = [f"  2. Scale by √d_k = {fmt(expl.sqrt_d_k)}, so the scores do not grow with d_k."]
    for j in range(len(expl.k)):
        if expl.visible[i][j]:
            division = f"{fmt(expl.dots[i][j])} ÷ {fmt(expl.sqrt_d_k)}"
            lines.append(f"     s{j + 1} = {division} = {fmt(expl.scaled[i][j])}")
        else:
            lines.append(f"     s{j + 1} = -∞ (masked)")
    return lines


def _softmax_lines(expl: Explanation, i: int) -> list[str]:
    lines = ["  3. Softmax: exponentiate, then divide by the sum, so the weights are positive and sum to 1."]
    if expl.sums[i] == 0:
        return lines + ["     No key is visible to this query: every weight is 0."]
    shift = expl.shifts[i]
    if shift:
        lines.append(
            f"     The largest score is {fmt(shift)}; subtracting it from every score changes no weight "
            "but keeps exp in range."
        )
    for j in range(len(expl.k)):
        if not expl.visible[i][j]:
            lines.append(f"     exp(s{j + 1}) = exp(-∞) = 0")
        elif shift:
            lines.append(
                f"     exp(s{j + 1} - {fmt(shift)}) = exp({fmt(expl.scaled[i][j] - shift)}) = {fmt(expl.exps[i][j])}"
            )
        else:
            lines.append(f"     exp(s{j + 1}) = exp({fmt(expl.scaled[i][j])}) = {fmt(expl.exps[i][j])}")
    terms = [fmt(expl.exps[i][j]) for j in range(len(expl.k)) if expl.visible[i][j]]
    total = fmt(expl.sums[i])
    lines.append(f"     sum = {' + '.join(terms)} = {total}" if len(terms) > 1 else f"     sum = {total}")
    for j in range(len(expl.k)):
        name = expl.key_tokens[j]
        if expl.visible[i][j]:
            lines.append(
                f"     w{j + 1} = {fmt(expl.exps[i][j])} ÷ {fmt(expl.sums[i])} = {fmt(expl.weights[i][j])}   ({name})"
            )
        else:
            lines.append(f"     w{j + 1} = {fmt(0.0)}   ({name}, masked)")
    return lines


def _output_lines(expl: Explanation, i: int) -> list[str]:
    lines = ["  4. Output: the value rows, each multiplied by its weight, added up."]
    terms = [
        f"{fmt(expl.weights[i][j])} × v{j + 1} {fmt_vector(expl.v[j])}"
        for j in range(len(expl.k))
        if expl.visible[i][j]
    ]
    if not terms:
        return lines + [f"     output = {fmt_vector(expl.outputs[i])} (no visible key: qkv returns zeros)"]
    lines.append(f"       {terms[0]}")
    lines += [f"     + {t}" for t in terms[1:]]
    lines.append(f"     = {fmt_vector(expl.outputs[i])}")
    return lines


def _query_lines(expl: Explanation, i: int) -> list[str]:
    head = f'Query {i + 1} of {len(expl.q)}: "{expl.query_tokens[i]}", q = {fmt_vector(expl.q[i])}'
    return [
        head,
        *_dot_lines(expl, i),
        *_scale_lines(expl, i),
        *_softmax_lines(expl, i),
        *_output_lines(expl, i),
    ]


def _summary(expl: Explanation) -> list[str]:
    weights = [
        [fmt(w) if seen else "-" for w, seen in zip(row, visible, strict=True)]
        for row, visible in zip(expl.weights, expl.visible, strict=True)
    ]
    return [
        "All together: the weights (row = query, column = key; '-' = masked; each row adds up to 1):",
        *_table(expl.query_tokens, expl.key_tokens, weights),
        *_matrix_lines("and the outputs, weights · V:", expl.query_tokens, expl.outputs),
        f'Checked: qkv.attention(q, k, v, causal={expl.causal}, backend="math") gives the same numbers '
        f"(largest difference {expl.max_difference:.1e}).",
    ]


def render_text(expl: Explanation) -> str:
    """The whiteboard walk-through: intro with the formula, one block per query token, a summary."""
    blocks = [_intro(expl), *(_query_lines(expl, i) for i in range(len(expl.q))), _summary(expl)]
    return "\n\n".join("\n".join(block) for block in blocks)
