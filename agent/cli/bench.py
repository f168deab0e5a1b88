"""`edge-agent bench --model FILE`: time a model on every usable provider here."""

from __future__ import annotations

import argparse

from agent.cli.errors import not_built


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time a model on each usable provider", description="Time a model on each usable execution provider and thread count.")
    p.add_argument("--model", required=True, metavar="FILE", help="an .onnx or .ort file")
    p.add_argument("--providers", nargs="+", metavar="NAME", help="providers to time (default: all usable)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise not_built("bench", 3)
