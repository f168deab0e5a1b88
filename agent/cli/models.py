"""`edge-agent models list|pull|rollback|inspect`: the local model store."""

from __future__ import annotations

import argparse

from agent.cli.errors import not_built


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="the local model store", description="List, pull, roll back and inspect models in the local store.")
    p.add_argument("action", choices=("list", "pull", "rollback", "inspect"))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise not_built("models", 4)
