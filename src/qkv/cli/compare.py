"""`qkv compare` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `compare` subcommand."""
    p = sub.add_parser("compare", help="(not yet implemented)")
    p.set_defaults(run=lambda args: 1)
