"""`edge-agent run --profile FILE`: the daemon in the foreground."""

from __future__ import annotations

import argparse

from agent.cli.errors import not_built


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground", description="Run the agent with a device profile (systemd runs this).")
    p.add_argument("--profile", required=True, metavar="FILE", help="the device profile")
    p.set_defaults(handler=run, default_log_level="info")


def run(args: argparse.Namespace) -> int:
    raise not_built("run", 5)
