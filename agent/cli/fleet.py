"""`edge-agent fleet deploy|status`: push model versions to devices and groups over MQTT."""

from __future__ import annotations

import argparse

from agent.cli.errors import not_built


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="deploy models to devices and see their state", description="Deploy model versions over MQTT and show the fleet's state.")
    p.add_argument("action", choices=("deploy", "status"))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise not_built("fleet", 8)
