"""``qkv demo``: the main job on the built-in default, what ``make demo`` runs.

Until the translation pipeline exists: the step-by-step explainer on its built-in example, then qkv
checked against PyTorch's ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import argparse

from qkv.cli import compare, explain


def run(args: argparse.Namespace) -> int:
    """Explain attention on the built-in example, then compare qkv with SDPA."""
    parser = argparse.ArgumentParser(prog="qkv")
    sub = parser.add_subparsers()
    explain.register(sub)
    compare.register(sub)
    print("=" * 78 + "\n1. Attention, step by step (qkv explain)\n" + "=" * 78)
    status = parser.parse_args(["explain"]).run(parser.parse_args(["explain"]))
    print("\n" + "=" * 78 + "\n2. qkv against PyTorch (qkv compare)\n" + "=" * 78)
    compare_args = parser.parse_args(["compare", "--length", str(args.length)])
    return int(status or 0) or int(compare_args.run(compare_args) or 0)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="the built-in demonstration that `make demo` runs")
    p.add_argument("--length", type=int, default=512, help="sequence length of the comparison")
    p.set_defaults(run=run)
