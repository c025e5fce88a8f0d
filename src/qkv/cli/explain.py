"""`qkv explain` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `explain` subcommand."""
    p = sub.add_parser("explain", help="(not yet implemented)")
    p.set_defaults(run=lambda args: 1)
