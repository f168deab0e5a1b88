"""`edge-agent demo`: a registry, a broker, an agent and a real model, all on this machine."""

from __future__ import annotations

import argparse

from agent.cli.errors import not_built


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run everything locally with a sample model", description="Start a local registry, broker and agent with a real sample model and print what arrives over MQTT.")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise not_built("demo", 9)
