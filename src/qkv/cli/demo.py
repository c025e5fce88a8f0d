"""`qkv demo` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = sub.add_parser("demo", help="(not yet implemented)")
    p.set_defaults(run=lambda args: 1)
