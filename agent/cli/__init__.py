"""The `edge-agent` command: one module per verb, each adding its parser and its handler.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad input. Errors are one line on stderr; a
traceback only with --debug.

A command line that names its verb loads that verb's module only: `edge-agent run` is a daemon's cold
start, and the other verbs' imports (the registry's keys, the fleet's client) are no part of it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from agent import __version__
from agent.cli.errors import CliError
from agent.service.logs import setup_logging
from agent.util.libraries import quiet_libraries

VERBS = ("run", "check", "probe", "models", "bench", "registry", "fleet", "demo")

log = logging.getLogger(__name__)


def build_parser(verbs: Sequence[str] = VERBS) -> argparse.ArgumentParser:
    """The command's parser, with these verbs' sub-commands (all of them unless told)."""
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Edge inference agent: keeps ONNX models up to date from a signed registry, runs them on "
        "the best execution provider here, and publishes results and health over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=("debug", "info", "warning", "error"),
        help="log level (default: warning; info for run)",
    )
    parser.add_argument("--log-format", default="text", choices=("text", "json"), help="log line format on stderr")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb in verbs:
        importlib.import_module(f"agent.cli.{verb}").add_parser(sub)
    return parser


def named_verb(argv: Sequence[str]) -> str | None:
    """The verb a command line names, when it names one before any `-h`; no option of the command itself
    takes a verb's name as its value."""
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if arg in VERBS:
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()  # before any verb imports numpy, OpenCV or onnxruntime
    argv = sys.argv[1:] if argv is None else list(argv)
    verb = named_verb(argv)
    parser = build_parser((verb,) if verb is not None else VERBS)
    args = parser.parse_args(argv)
    level = "debug" if args.debug else (args.log_level or getattr(args, "default_log_level", "warning"))
    setup_logging(level, args.log_format)
    try:
        return int(args.handler(args) or 0)
    except CliError as exc:
        if args.debug:
            log.exception("failed")
        print(f"edge-agent {args.verb}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: one line, not a traceback
        if args.debug:
            raise
        print(
            f"edge-agent {args.verb}: error: {exc.__class__.__name__}: {exc} (run with --debug for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
