"""`edge-agent run --profile FILE`: the daemon in the foreground (SIGTERM stops it, SIGHUP reloads)."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from agent.cli.errors import FAILURE, USAGE, CliError
from agent.config.errors import ProfileError
from agent.config.profile import load_profile
from agent.util.malloc import return_large_blocks
from agent.util.timeline import START


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Run the agent with a device profile (systemd runs this).",
    )
    p.add_argument("--profile", required=True, metavar="FILE", help="the device profile")
    p.set_defaults(handler=run, default_log_level="info")


def run(args: argparse.Namespace) -> int:
    START.mark("command line parsed")
    return_large_blocks()  # freed tensors go back to the kernel instead of staying in per-thread arenas
    # The CLI imports every verb at start: the daemon's parts (onnxruntime, OpenCV, paho) load only here.
    from agent.service.daemon import Daemon, DaemonError

    START.mark("daemon imported")
    try:
        profile = load_profile(
            args.profile, files="service", snapshot=True
        )  # a missing key or TLS file: one located line
    except ProfileError as exc:
        raise CliError(f"invalid profile\n{exc}", USAGE) from None
    START.mark("profile loaded")
    stop, reload = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    try:
        return Daemon(profile, Path(args.profile)).run(stop, reload)
    except DaemonError as exc:
        raise CliError(str(exc), FAILURE) from None
