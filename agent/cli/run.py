"""`edge-agent run --profile FILE`: the daemon in the foreground.

Thin on purpose: the wiring is `agent.pipeline.open_pipelines`; the daemon module takes it over.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from agent.cli.errors import USAGE, CliError

log = logging.getLogger("agent.cli.run")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground", description="Run the agent with a device profile (systemd runs this).")
    p.add_argument("--profile", required=True, metavar="FILE", help="the device profile")
    p.set_defaults(handler=run, default_log_level="info")


def run(args: argparse.Namespace) -> int:
    from agent.profile import load_profile
    from agent.profile_errors import ProfileError

    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise CliError(f"invalid profile\n{exc}", USAGE) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return serve(profile, stop)


def serve(profile: Any, stop: threading.Event) -> int:
    """Open the profile's pipelines with results on stdout, run until `stop` or until every source ended."""
    from agent.events import log_event
    from agent.pipeline import open_pipelines
    from agent.stdout_sink import StdoutSink

    if profile.mqtt is not None:
        log.warning("the profile has an mqtt section, but this build publishes results to stdout only")
    state_dir = Path(profile.device.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    sink = StdoutSink(state_dir, emit=log_event)
    pipelines = open_pipelines(profile, sink, emit=sink.event)
    if not pipelines:
        sink.close()
        raise CliError("no pipeline could start (see the events above)" if profile.pipelines else "the profile has no pipelines")
    for pipeline in pipelines:
        pipeline.start()
    try:
        while not stop.wait(0.2):
            if all(p.finished for p in pipelines):
                break
            if sink.broken.is_set():
                log.info("stdout was closed by its reader: stopping")
                break
    finally:
        for pipeline in pipelines:
            pipeline.stop()
        sink.close()
    failed = [p.name for p in pipelines if p.stats()["state"] == "failed"]
    return 1 if failed else 0
