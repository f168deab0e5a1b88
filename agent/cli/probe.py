"""`edge-agent probe [--json]`: the hardware found and the provider ranking, with reasons."""

from __future__ import annotations

import argparse

from agent.cli.errors import not_built


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="show hardware and execution providers", description="Probe the hardware and rank ONNX Runtime execution providers.")
    p.add_argument("--json", action="store_true", help="machine-readable output (see docs/probe.md)")
    p.add_argument("--profile", metavar="FILE", help="rank with this profile's runtime settings")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    raise not_built("probe", 3)
