"""`edge-agent registry keygen|publish|serve`: the cloud side of the model registry."""

from __future__ import annotations

import argparse

from agent.cli.errors import not_built


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="keys, publishing and a development server for the model registry",
                       description="The cloud side: make keys, publish signed models, serve a registry folder.")
    p.add_argument("action", choices=("keygen", "publish", "serve"))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise not_built("registry", 4)
