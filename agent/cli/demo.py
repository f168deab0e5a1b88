"""`edge-agent demo`: a registry, a broker, an agent and a real model, all on this machine."""

from __future__ import annotations

import argparse
import os
import sys

from agent.cli.errors import USAGE, CliError
from agent.cloud.demo.broker import BROKER_CHOICES


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run everything locally with a sample model",
        description="Start a local registry, broker and agent with a real sample model (the PP-OCR text detector) "
        "and print what arrives over MQTT; half way through, a second model version is published and swapped in "
        "while frames keep coming. Everything lives in a temporary directory removed at the end; the sample "
        "model is cached in ~/.cache/edge-agent. Ctrl-C stops it cleanly.",
    )
    p.add_argument(
        "--duration", type=_positive, metavar="SECONDS", help="stop after this long (default: run until Ctrl-C)"
    )
    p.add_argument(
        "--port-base",
        type=int,
        metavar="N",
        help="use ports N (broker), N+1 (registry), N+2 (status page) instead of free ones",
    )
    p.add_argument(
        "--no-color",
        action="store_true",
        help="no ANSI colours (also when NO_COLOR is set or stdout is not a terminal)",
    )
    p.add_argument(
        "--broker",
        choices=BROKER_CHOICES,
        default=os.environ.get("EDGE_AGENT_DEMO_BROKER", "auto"),
        help="auto: Mosquitto when installed, else the embedded amqtt broker (default: auto, or $EDGE_AGENT_DEMO_BROKER)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, registry, profile) for a look"
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from agent.cloud.demo.session import Options, run_demo

    if args.broker not in BROKER_CHOICES:
        raise CliError(
            f"EDGE_AGENT_DEMO_BROKER: expected one of {', '.join(BROKER_CHOICES)}, got {args.broker!r}", USAGE
        )
    if args.port_base is not None and not 1024 <= args.port_base <= 65533:
        raise CliError(f"--port-base: expected a port from 1024 to 65533, got {args.port_base}", USAGE)
    color = not args.no_color and not os.environ.get("NO_COLOR") and sys.stdout.isatty()
    return run_demo(
        Options(duration=args.duration, port_base=args.port_base, color=color, broker=args.broker, keep_tmp=args.keep)
    )
