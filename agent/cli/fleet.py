"""`edge-agent fleet deploy|status|rollout|controller|enroll`: push model versions to devices and groups over MQTT."""

from __future__ import annotations

import argparse
import json
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli.errors import USAGE, CliError
from agent.config.units import parse_duration

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.cloud.fleet.client import BrokerSettings
    from agent.cloud.fleet.state import StateDB


def _registry_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        default=os.environ.get("EDGE_AGENT_REGISTRY"),
        metavar="URL|DIR",
        help="the registry (a folder or an http(s) URL): --key is refused unless its keys/root.json names it for "
        "the orders role (default: $EDGE_AGENT_REGISTRY; unset: not checked)",
    )


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
        description="Write a deployment order, signed with an orders key of the registry (docs/trust.md), retained on "
        "<prefix>/<device>/deploy or "
        "<prefix>/fleet/<group>/deploy, then show each targeted device's progress (downloading, verifying, active, "
        "refused, rolled-back, rollback-failed) until all have reported or --wait runs out. Exit 0 when every "
        "targeted device went active, 1 otherwise, 2 for bad input.",
    )
    d.add_argument("--model", required=True, metavar="NAME", help="registry model name")
    d.add_argument("--version", required=True, metavar="VER", help="the version to run, e.g. 1.5.0")
    d.add_argument("--to", required=True, metavar="TARGET", help="device:ID or group:NAME")
    d.add_argument(
        "--key",
        type=Path,
        metavar="KEY",
        help="the private key that signs orders: one the registry's keys/root.json names for the orders role "
        "(default: $EDGE_AGENT_REGISTRY_KEY)",
    )
    _registry_option(d)
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
    _rollout_parsers(actions)


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        type=Path,
        default=Path(os.environ.get("EDGE_AGENT_CONTROLLER_DB", DEFAULT_DB)),
        metavar="FILE",
        help=f"the controller's state file (default: $EDGE_AGENT_CONTROLLER_DB or {DEFAULT_DB})",
    )


def _rollout_parsers(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = actions.add_parser(
        "rollout",
        help="progressive rollouts in waves, gated on model health (driven by `fleet controller`)",
        description="Ask the controller (through its state file) to roll a version out to a group in waves, each "
        "gated on the devices' signed reports of how the model behaves against the version before it.",
    )
    verbs = r.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    st = verbs.add_parser("start", help="plan a rollout; the controller drives it")
    st.add_argument("--model", required=True, metavar="NAME")
    st.add_argument("--version", required=True, metavar="VER")
    st.add_argument("--to", required=True, metavar="group:NAME")
    st.add_argument(
        "--waves",
        default="1%,10%,50%,100%",
        metavar="LIST",
        help="cumulative wave sizes: counts, percentages, `all`, or exp:START,FACTOR (default: 1%%,10%%,50%%,100%%)",
    )
    st.add_argument("--soak", default="0s", metavar="DURATION", help="watch each settled wave this long (default: 0s)")
    st.add_argument("--device-timeout", default="10min", metavar="DURATION", help="a device's time (default: 10min)")
    st.add_argument("--abort-percent", type=float, default=5.0, help="abort above this %% failed (default: 5)")
    st.add_argument("--abort-min", type=int, default=1, help="failures before the percentage applies (default: 1)")
    st.add_argument("--abort-count", type=int, help="abort at this many failures, whatever the share")
    st.add_argument("--max-p95-ratio", type=float, default=1.5, help="p95 against the previous version (1.5)")
    st.add_argument(
        "--min-p95-increase", type=float, default=1.0, metavar="MS", help="...and slower by at least (ms, 1.0)"
    )
    st.add_argument("--max-error-rate", type=float, default=0.01, help="failed or NaN inferences (default: 0.01)")
    st.add_argument("--max-drop-rate", type=float, default=0.05, help="dropped frames (default: 0.05)")
    st.add_argument("--min-inferences", type=int, default=20, help="before a device's vitals count (default: 20)")
    st.add_argument("--allow-fallback", action="store_true", help="a provider fallback does not fail a device")
    st.add_argument("--window", action="append", default=[], metavar="HH:MM-HH:MM", help="UTC; waves start inside")
    st.add_argument("--override-hold", action="store_true", help="release a hold on this version first")
    _db_option(st)
    st.set_defaults(handler=rollout_start)
    for verb, text in (("status", "one rollout, or the latest"), ("list", "every rollout")):
        v = verbs.add_parser(verb, help=text)
        if verb == "status":
            v.add_argument("id", nargs="?", help="the rollout (default: the latest)")
        v.add_argument("--json", action="store_true")
        _db_option(v)
        v.set_defaults(handler=rollout_show)
    for verb in ("pause", "resume", "abort"):
        v = verbs.add_parser(verb, help=f"{verb} a rollout (the controller acts on it within a second)")
        v.add_argument("id")
        _db_option(v)
        v.set_defaults(handler=rollout_request)
    rel = verbs.add_parser("release", help="release the fleet-wide hold an abort put on a version")
    rel.add_argument("--model", required=True)
    rel.add_argument("--version", required=True)
    _db_option(rel)
    rel.set_defaults(handler=rollout_release)

    c = actions.add_parser(
        "controller",
        help="the service that drives every rollout (systemd: edge-agent-controller.service)",
        description="Drive every rollout in the state file: waves of signed device orders, gated on the devices' "
        "signed reports; abort and roll back; one controller at a time (a lease in the state file and on the broker).",
    )
    c.add_argument(
        "--key", type=Path, metavar="KEY", help="the key that signs orders (an orders key; or $EDGE_AGENT_REGISTRY_KEY)"
    )
    _registry_option(c)
    c.add_argument("--inventory", type=Path, required=True, metavar="FILE", help="the enrolled devices (YAML)")
    c.add_argument("--name", default="controller", help="this controller's name in the lease")
    c.add_argument("--lease", default="15s", metavar="DURATION", help="the lease's lifetime (default: 15s)")
    _db_option(c)
    _broker_options(c)
    c.set_defaults(handler=controller, default_log_level="info")

    e = actions.add_parser(
        "enroll",
        help="this device's identity key (made if missing) as an inventory entry",
        description="Print the inventory entry of the device a profile describes: its id, its identity key's public "
        "half (the key is made in the profile's state_dir when missing) and its group.",
    )
    e.add_argument("--profile", type=Path, required=True, metavar="FILE")
    e.set_defaults(handler=enroll)


DEFAULT_DB = "/var/lib/edge-agent-controller/controller.db"


def _waves(value: str) -> tuple[str, ...]:
    """--waves split at its commas, except the one inside `exp:START,FACTOR`."""
    return tuple(w.strip() for w in re.findall(r"exp:[^,]*(?:,[^,]*)?|[^,]+", value) if w.strip())


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


def _private_key(path: Path | None, registry: str | None = None) -> Ed25519PrivateKey:
    """The order-signing key; with `registry`, refused unless the registry's keys document lists it for orders."""
    import sys

    from agent.cloud.fleet.client import FleetError
    from agent.cloud.fleet.orderkey import check_order_key
    from agent.models.signing import load_private_key

    key_path = path or (
        Path(os.environ["EDGE_AGENT_REGISTRY_KEY"]) if os.environ.get("EDGE_AGENT_REGISTRY_KEY") else None
    )
    if key_path is None:
        raise CliError(
            "no signing key: pass --key (an orders key of the registry) or set EDGE_AGENT_REGISTRY_KEY", USAGE
        )
    if not key_path.is_file():
        raise CliError(f"--key: {key_path}: no such file", USAGE)
    try:
        key = load_private_key(key_path)
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None
    if registry:
        try:
            warning = check_order_key(registry, key)
        except FleetError as exc:
            raise CliError(str(exc), exc.code) from None
        if warning is not None:
            print(f"warning: {warning}", file=sys.stderr)
    return key


def deploy(args: argparse.Namespace) -> int:
    from agent.cloud.fleet.client import FleetError
    from agent.cloud.fleet.deploy import deploy as do_deploy

    wait, probation = _duration(args.wait, "--wait"), _duration(args.probation, "--probation")
    expires, settle = _duration(args.expires, "--expires"), _duration(args.settle, "--settle")
    if expires <= 0:
        raise CliError("--expires: expected a duration > 0", USAGE)
    key = _private_key(args.key, args.registry)
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


def _db(args: argparse.Namespace, must_exist: bool = True) -> StateDB:
    import sqlite3

    from agent.cloud.fleet.state import StateDB

    if must_exist and not args.db.is_file():
        raise CliError(f"--db: {args.db}: no such file (has a rollout been started, or the controller run?)", USAGE)
    try:
        return StateDB(args.db)
    except (OSError, sqlite3.Error) as exc:
        raise CliError(f"--db: cannot open {args.db}: {exc}") from None


def rollout_start(args: argparse.Namespace) -> int:
    from agent.cloud.fleet.plan import RolloutSpec, check_spec
    from agent.models.deploy import new_order, new_order_id, parse_target

    try:
        kind, group = parse_target(args.to)
    except ValueError as exc:
        raise CliError(f"--to: {exc}", USAGE) from None
    if kind != "group":
        raise CliError("--to: a rollout goes to a group (group:NAME)", USAGE)
    spec = RolloutSpec(
        model=args.model,
        version=args.version,
        group=group,
        waves=_waves(args.waves),
        soak_s=_duration(args.soak, "--soak"),
        device_timeout_s=_duration(args.device_timeout, "--device-timeout"),
        abort_percent=args.abort_percent,
        abort_min=args.abort_min,
        abort_count=args.abort_count,
        max_p95_ratio=args.max_p95_ratio,
        min_p95_increase_ms=args.min_p95_increase,
        allow_fallback=args.allow_fallback,
        max_error_rate=args.max_error_rate,
        max_drop_rate=args.max_drop_rate,
        min_inferences=args.min_inferences,
        windows=tuple(args.window),
    )
    try:
        check_spec(spec)
        new_order(spec.model, spec.version, args.to)  # the names, checked as a device will check them
    except ValueError as exc:
        raise CliError(str(exc), USAGE) from None
    db = _db(args, must_exist=False)
    held = db.held(spec.model, spec.version)
    if held is not None and not args.override_hold:
        raise CliError(
            f"{spec.model} {spec.version} is held fleet-wide ({held}); "
            f"release it with `edge-agent fleet rollout release` or pass --override-hold"
        )
    busy = [r for r in db.rollouts(("pending", "running", "paused", "aborting", "completing")) if r.spec.group == group]
    if busy:
        raise CliError(f"group {group} already has rollout {busy[0].id} ({busy[0].state}); abort it or wait")
    if held is not None:  # only once the rollout will start: a refused start keeps the hold
        db.release(spec.model, spec.version)
    rollout_id = "ro-" + new_order_id()
    db.add_rollout(rollout_id, spec)
    print(f"rollout {rollout_id}: {spec.model} {spec.version} -> group:{group} in waves {','.join(spec.waves)}")
    return 0


def rollout_show(args: argparse.Namespace) -> int:
    from agent.cloud.fleet.overview import render, render_list, view

    db = _db(args)
    rollouts = db.rollouts()
    if args.verb == "list":
        views = [view(db, r) for r in rollouts]
        print(json.dumps(views, indent=2) if args.json else render_list(views))
        return 0
    chosen = [r for r in rollouts if r.id == args.id] if args.id else rollouts[-1:]
    if not chosen:
        raise CliError(f"no rollout {args.id}" if args.id else "no rollout yet", USAGE)
    shown = view(db, chosen[0])
    print(json.dumps(shown, indent=2) if args.json else render(shown))
    return 0


def rollout_request(args: argparse.Namespace) -> int:
    db = _db(args)
    rollout = db.rollout(args.id)
    if rollout is None:
        raise CliError(f"no rollout {args.id}", USAGE)
    db.request(args.id, args.verb)
    print(f"rollout {args.id}: {args.verb} requested (it is {rollout.state})")
    return 0


def rollout_release(args: argparse.Namespace) -> int:
    db = _db(args)
    if not db.release(args.model, args.version):
        raise CliError(f"{args.model} {args.version} is not held", USAGE)
    print(f"{args.model} {args.version}: released; a rollout may name it again")
    return 0


def controller(args: argparse.Namespace) -> int:
    import signal
    import threading

    from agent.cloud.fleet.client import FleetError
    from agent.cloud.fleet.controller import Controller

    key = _private_key(args.key, args.registry)
    if not args.inventory.is_file():
        raise CliError(f"--inventory: {args.inventory}: no such file", USAGE)
    lease = _duration(args.lease, "--lease")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service = Controller(
            _settings(args),
            args.db,
            key,
            args.inventory,
            prefix=args.topic_prefix,
            name=args.name,
            lease_ttl=lease,
            registry=args.registry,
        )
        return service.run(stop)
    except FleetError as exc:
        raise CliError(str(exc), exc.code) from None


def enroll(args: argparse.Namespace) -> int:
    from agent.config.errors import ProfileError
    from agent.config.profile import load_profile
    from agent.service.identity import enrollment_entry, key_path, load_or_create

    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise CliError(str(exc.issues[0]), USAGE) from None
    device = profile.device
    key = load_or_create(device.state_dir)
    print(f"# identity key: {key_path(device.state_dir)}")
    print("# add under `devices:` in the fleet inventory the controller reads (--inventory)")
    print(enrollment_entry(device.id, device.group, key), end="")
    return 0
