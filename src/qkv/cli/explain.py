"""``qkv explain``: walk ``softmax(Q·Kᵀ/√d_k)·V`` step by step for a small example.

Reads Q, K, V from the command line (``--q '[[1, 0], [0, 1]]' --k ... --v ...``), from a JSON file
(``--file example.json`` with keys ``q``, ``k``, ``v`` and optional ``tokens``, ``key_tokens``), or uses
the built-in "the cat sat" example; prints the walk-through (or, with ``--json``, the numbers). A bad input
is one line on stderr, ``qkv explain: error: ...``, and exit status 2.

The walk-through is for small examples: it prints every one of the ``L × S`` scores several times (about
100 bytes each), so inputs with more than :data:`MAX_SCORES` scores (e.g. 100 queries × 100 keys, about
1 MB of text) are refused unless ``--force`` is given; 3000 × 3000 would be a gigabyte.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qkv.viz.explain import (
    EXAMPLE_K,
    EXAMPLE_Q,
    EXAMPLE_TOKENS,
    EXAMPLE_V,
    Matrix,
    check_matrix,
    explain,
    render_text,
    to_json,
)

MAX_SCORES = 10_000
MATRICES = ("q", "k", "v")
FILE_KEYS = ("q", "k", "v", "tokens", "key_tokens")
# (q, k, v, tokens, key_tokens)
Inputs = tuple[Matrix, Matrix, Matrix, list[str] | None, list[str] | None]

EPILOG = """\
examples:
  qkv explain                                   the built-in example, "the cat sat"
  qkv explain --causal                          the same, each token seeing only itself and earlier ones
  qkv explain --q '[[1, 0], [0, 1]]' --k '[[1, 1], [0, 1]]' --v '[[1, 2], [3, 4]]' --tokens Acting Machines
  qkv explain --file example.json --json        {"q": [[...]], "k": ..., "v": ..., "tokens": [...]}
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``explain`` subcommand."""
    p = sub.add_parser(
        "explain",
        help="walk softmax(Q·Kᵀ/√d_k)·V step by step for a small example",
        description="Walk the attention formula softmax(Q·Kᵀ/√d_k)·V step by step, with 4 decimals:\n"
        "for each query token the dot products q·k, the scaled scores, the softmax weights\n"
        "and the weighted sum of the values. Without --q/--k/--v or --file: a built-in example.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--q", metavar="JSON", help="queries, JSON rows (L, d_k), e.g. '[[1, 0], [0, 1]]'")
    p.add_argument("--k", metavar="JSON", help="keys, JSON rows (S, d_k)")
    p.add_argument("--v", metavar="JSON", help="values, JSON rows (S, d_v)")
    p.add_argument("--tokens", nargs="+", metavar="TOKEN", help="one name per row of Q (default t1, t2, …)")
    p.add_argument(
        "--key-tokens",
        nargs="+",
        metavar="TOKEN",
        help="one name per row of K (default: the tokens when K has as many rows as Q, else k1, k2, …)",
    )
    p.add_argument(
        "--file",
        type=Path,
        metavar="PATH",
        help="JSON file with keys q, k, v and optional tokens, key_tokens (instead of --q/--k/--v)",
    )
    p.add_argument("--causal", action="store_true", help="mask keys after each query (qkv's causal=True)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON, not the walk-through")
    p.add_argument(
        "--force",
        action="store_true",
        help=f"explain even more than {MAX_SCORES:,} scores (L x S); the output grows by ~100 bytes a score",
    )
    p.set_defaults(run=run)


def parse_matrix(text: str, label: str) -> Matrix:
    """A matrix from a JSON string, validated; ``ValueError`` naming ``label`` if it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{label} is not valid JSON ({e.msg} at column {e.colno}); expected e.g. '[[1, 2], [3, 4]]'"
        ) from None
    except RecursionError:
        raise ValueError(f"{label} is nested too deeply; expected a matrix, rows of numbers like [[1, 2]]") from None
    return check_matrix(value, label)


def _check_file_tokens(value: object, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        got = json.dumps(value)[:40]
        raise ValueError(f'{where} must be a list of strings, e.g. ["the", "cat"]; got {got}')
    return value


def read_file(path: Path) -> Inputs:
    """``(q, k, v, tokens, key_tokens)`` from a JSON file; ``ValueError`` naming the file and the problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read --file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--file {path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"--file {path} is nested too deeply; expected an object with matrices q, k, v") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"--file {path}: expected a JSON object with keys q, k, v (and optional tokens, key_tokens); "
            f"got a {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(FILE_KEYS))
    if unknown:
        raise ValueError(f"--file {path}: unknown key {unknown[0]!r}; expected q, k, v, tokens, key_tokens")
    missing = [name for name in MATRICES if name not in data]
    if missing:
        raise ValueError(f"--file {path}: missing key {missing[0]!r}; q, k and v are required")
    q, k, v = (check_matrix(data[name], f"--file {path}: {name}") for name in MATRICES)
    tokens = _check_file_tokens(data.get("tokens"), f"--file {path}: tokens")
    key_tokens = _check_file_tokens(data.get("key_tokens"), f"--file {path}: key_tokens")
    return q, k, v, tokens, key_tokens


def load_inputs(args: argparse.Namespace) -> Inputs:
    """``(q, k, v, tokens, key_tokens)`` from ``--file``, ``--q/--k/--v`` or the built-in example."""
    given = [f"--{name}" for name in MATRICES if getattr(args, name) is not None]
    if args.file is not None and given:
        raise ValueError(f"give Q, K, V either with --file or with --q/--k/--v, not both (got --file and {given[0]})")
    if given and len(given) < len(MATRICES):
        missing = [f"--{name}" for name in MATRICES if getattr(args, name) is None]
        raise ValueError(f"--q, --k and --v go together; missing {' and '.join(missing)}")
    if args.file is not None:
        q, k, v, tokens, key_tokens = read_file(args.file)
    elif given:
        q, k, v = (parse_matrix(getattr(args, name), f"--{name}") for name in MATRICES)
        tokens, key_tokens = None, None
    else:
        if args.tokens is not None and len(args.tokens) != len(EXAMPLE_TOKENS):
            raise ValueError(
                f"the built-in example has {len(EXAMPLE_TOKENS)} tokens ({' '.join(EXAMPLE_TOKENS)}) "
                f"but --tokens gave {len(args.tokens)}; give {len(EXAMPLE_TOKENS)}, or your own --q/--k/--v"
            )
        q, k, v, tokens, key_tokens = EXAMPLE_Q, EXAMPLE_K, EXAMPLE_V, list(EXAMPLE_TOKENS), None
    # Command-line names win over the file's (and the example's).
    return (
        q,
        k,
        v,
        args.tokens if args.tokens is not None else tokens,
        args.key_tokens if args.key_tokens is not None else key_tokens,
    )


def run(args: argparse.Namespace) -> int:
    """Print the walk-through (or JSON); a bad input prints one error line and returns 2."""
    try:
        q, k, v, tokens, key_tokens = load_inputs(args)
        check_size(len(q), len(k), args.force)
        expl = explain(q, k, v, tokens=tokens, key_tokens=key_tokens, causal=args.causal)
    except ValueError as e:
        print(f"qkv explain: error: {e}", file=sys.stderr)
        return 2
    # A reader that goes away (``qkv explain | head``) is handled once for every command, in qkv.cli.main.
    print(json.dumps(to_json(expl), indent=2) if args.json else render_text(expl), flush=True)
    return 0


def check_size(queries: int, keys: int, force: bool) -> None:
    """``ValueError`` when ``queries × keys`` exceeds :data:`MAX_SCORES` and ``force`` is not set."""
    if queries * keys > MAX_SCORES and not force:
        raise ValueError(
            f"Q has {queries} rows and K has {keys}: {queries * keys:,} scores, more than the {MAX_SCORES:,} "
            f"a walk-through is meant for (about {queries * keys * 100 / 1e6:,.0f} MB of output); "
            "give fewer rows, or --force"
        )
