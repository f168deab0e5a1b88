"""`edge-agent fleet deploy|status`: push model versions to devices and groups over MQTT."""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.errors import USAGE, CliError
from agent.config.units import parse_duration

if TYPE_CHECKING:
    from agent.cloud.fleet.client import BrokerSettings


def _broker_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("broker")
    g.add_argument("--broker", required=True, metavar="URL", help="mqtt://host[:port] or mqtts://host[:port]")
    g.add_argument(
        "--topic-prefix", default="edge", metavar="PREFIX", help="first level(s) of every topic (default: edge)"
    )
    g.add_argument("--username", metavar="NAME", help="user name for the broker")
    g.add_argument("--password-file", type=Path, metavar="FILE", help="a file holding the password")
    g.add_argument("--tls-ca", type=Path, metavar="FILE", help="CA that signed the broker's certificate (mqtts://)")
    g.add_argument("--tls-cert", type=Path, metavar="FILE", help="client certificate (mqtts://)")
    g.add_argument("--tls-key", type=Path, metavar="FILE", help="client key (mqtts://)")
    g.add_argument(
        "--settle",
        default="0s",
        metavar="DURATION",
        help="how long to go on reading once every retained message is in (the end of the retained burst is "
        "known exactly, from a marker this command sends itself; default: 0s)",
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fleet",
        help="deploy models to devices and see their state",
        description="Deploy model versions over MQTT and show the fleet's state.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    d = actions.add_parser(
        "deploy",
        help="write a signed, retained deployment order and follow the devices' progress",
        description="Write a deployment order, signed with the registry key, retained on <prefix>/<device>/deploy or "
        "<prefix>/fleet/<group>/deploy, then show each targeted device's progress (downloading, verifying, active, "
        "refused, rolled-back, rollback-failed) until all have reported or --wait runs out. Exit 0 when every "
        "targeted device went active, 1 otherwise, 2 for bad input.",
    )
    d.add_argument("--model", required=True, metavar="NAME", help="registry model name")
    d.add_argument("--version", required=True, metavar="VER", help="the version to run, e.g. 1.5.0")
    d.add_argument("--to", required=True, metavar="TARGET", help="device:ID or group:NAME")
    d.add_argument(
        "--key", type=Path, metavar="KEY", help="the registry's private key (default: $EDGE_AGENT_REGISTRY_KEY)"
    )
    d.add_argument(
        "--canary",
        type=int,
        metavar="N",
        help="deploy to N online devices of the group first; write the group "
        "order only when they report active and healthy",
    )
    d.add_argument(
        "--probation",
        default="0s",
        metavar="DURATION",
        help="with --canary: keep watching the healthy canaries this long for a rollback (an event, or health "
        "reporting another version) before the group order; at least the devices' own probation (default: 0s)",
    )
    d.add_argument(
        "--wait",
        default="5min",
        metavar="DURATION",
        help="how long to follow progress (default: 5min; 0: write the order and exit); with --canary, for each stage",
    )
    d.add_argument(
        "--expires", default="7d", metavar="DURATION", help="devices ignore the order after this (default: 7d)"
    )
    d.add_argument(
        "--allow-older",
        action="store_true",
        help=(
            "a rollback order: devices may install a version older than their active one, and one they hold "
            "(refused after a try, or rolled back)"
        ),
    )
    _broker_options(d)
    d.set_defaults(handler=deploy)

    s = actions.add_parser(
        "status",
        help="every device on the retained topics: state, group, models, health",
        description="Read every retained status, health, report and deploy message (until a marker this command "
        "sends itself comes back: the retained burst is then complete) and print a table per device, per group and "
        "model, and per model version.",
    )
    s.add_argument("--group", metavar="NAME", help="only the devices of this group")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--html", type=Path, metavar="FILE", help="also write the state as a static HTML page to FILE")
    _broker_options(s)
    s.set_defaults(handler=status)


def _duration(value: str, option: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise CliError(f"{option}: {exc}", USAGE) from None


def _settings(args: argparse.Namespace) -> BrokerSettings:
    from agent.cloud.fleet.client import BrokerSettings

    for opt in ("password_file", "tls_ca", "tls_cert", "tls_key"):
        path = getattr(args, opt)
        if path is not None and not path.is_file():
            raise CliError(f"--{opt.replace('_', '-')}: {path}: no such file", USAGE)
    return BrokerSettings(args.broker, args.username, args.password_file, args.tls_ca, args.tls_cert, args.tls_key)


def deploy(args: argparse.Namespace) -> int:
    from agent.cloud.fleet.client import FleetError
    from agent.cloud.fleet.deploy import deploy as do_deploy
    from agent.models.signing import load_private_key

    wait, probation = _duration(args.wait, "--wait"), _duration(args.probation, "--probation")
    expires, settle = _duration(args.expires, "--expires"), _duration(args.settle, "--settle")
    if expires <= 0:
        raise CliError("--expires: expected a duration > 0", USAGE)
    key_path = args.key or (
        Path(os.environ["EDGE_AGENT_REGISTRY_KEY"]) if os.environ.get("EDGE_AGENT_REGISTRY_KEY") else None
    )
    if key_path is None:
        raise CliError("no signing key: pass --key (the registry's private key) or set EDGE_AGENT_REGISTRY_KEY", USAGE)
    if not key_path.is_file():
        raise CliError(f"--key: {key_path}: no such file", USAGE)
    try:
        key = load_private_key(key_path)
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None
    try:
        return do_deploy(
            _settings(args),
            model=args.model,
            version=args.version,
            to=args.to,
            private_key=key,
            prefix=args.topic_prefix,
            canary=args.canary,
            wait=wait,
            probation=probation,
            expires=timedelta(seconds=expires),
            allow_older=args.allow_older,
            settle=settle,
        )
    except FleetError as exc:
        raise CliError(str(exc), exc.code) from None


def status(args: argparse.Namespace) -> int:
    from agent.cloud.fleet.client import FleetError
    from agent.cloud.fleet.status import fleet_state, render_status

    settle = _duration(args.settle, "--settle")
    if args.group is not None:
        from agent.models.deploy import parse_target

        try:
            parse_target(f"group:{args.group}")
        except ValueError as exc:
            raise CliError(f"--group: {exc}", USAGE) from None
    try:
        state = fleet_state(_settings(args), args.topic_prefix, args.group, settle)
    except FleetError as exc:
        raise CliError(str(exc), exc.code) from None
    if args.html is not None:
        from agent.cloud.fleet.page import render_page

        try:
            args.html.write_text(render_page(state))
        except OSError as exc:
            raise CliError(f"--html: cannot write {args.html}: {exc.strerror or exc}") from None
    print(json.dumps(state, indent=2) if args.json else render_status(state))
    return 0
