"""`fleet deploy`: write a signed, retained order (after a canary run, when asked) and follow it.

The order goes to `<prefix>/<device>/deploy` or `<prefix>/fleet/<group>/deploy`. With a canary, N
online devices of the group get their own device orders first; the group order is written only once
they all report active and healthy (and stay so through the probation: a rollback by the device's own
probation, in an event or in its health, fails the canary); otherwise the canary orders are withdrawn,
so that a refusing device does not retry at every restart, and nothing else is written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import timedelta
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cloud.fleet.client import BrokerSettings, FleetError
from agent.cloud.fleet.inventory import SETTLE, Inventory, connected
from agent.cloud.fleet.watch import Combined, DeployWatch, explain, follow, pump
from agent.models.deploy import Canary, DeployOrder, new_order, parse_target, sign_order

MakeOrder = Callable[[str, Canary | None], DeployOrder]


def deploy(
    settings: BrokerSettings,
    *,
    model: str,
    version: str,
    to: str,
    private_key: Ed25519PrivateKey,
    prefix: str = "edge",
    canary: int | None = None,
    wait: float = 300.0,
    probation: float = 0.0,
    expires: timedelta = timedelta(days=7),
    allow_older: bool = False,
    settle: float = SETTLE,
    out: TextIO | None = None,
) -> int:
    """Write the order (after a canary run when `canary` is set) and follow it. Returns the exit code."""
    out = out or sys.stdout
    try:
        kind, name = parse_target(to)
    except ValueError as exc:
        raise FleetError(f"--to: {exc}", 2) from None
    if canary is not None and kind != "group":
        raise FleetError("--canary needs a group target (--to group:NAME)", 2)
    if canary is not None and canary < 1:
        raise FleetError("--canary: expected a number of devices >= 1", 2)

    def make(target: str, canary_info: Canary | None = None) -> DeployOrder:
        try:
            return new_order(model, version, target, expires_in=expires, allow_older=allow_older, canary=canary_info)
        except ValueError as exc:
            raise FleetError(str(exc), 2) from None

    order = make(to)  # checks every name before anything touches the broker
    # An order to one device, not followed, needs nothing retained (a device's own user may try, and be refused).
    need_state = canary is not None or kind == "group" or wait > 0
    with connected(settings, prefix, ("status", "health"), settle, live=("events",), sync=need_state) as inventory:
        canaries: list[str] = []
        if canary is not None:
            passed = _canary_run(inventory, order, make, name, canary, wait, probation, private_key, out)
            if isinstance(passed, int):
                return passed
            canaries = passed
            order = make(to)  # issued after the canaries' orders, so it supersedes them
        return _write_and_follow(inventory, order, private_key, wait, out, withdraw=canaries)


def _write_and_follow(
    inventory: Inventory,
    order: DeployOrder,
    private_key: Ed25519PrivateKey,
    wait: float,
    out: TextIO,
    withdraw: list[str] | None = None,
) -> int:
    """Write `order`, then withdraw the orders on `withdraw` (a passed canary's: written after the group
    order, so the canary never goes back to its channel's version in between), then follow it."""
    topic = inventory.order_topic(order)
    inventory.client.publish_retained(topic, sign_order(order, private_key))
    for canary in withdraw or ():  # superseded by the group order (same version): one order per device
        inventory.client.publish_retained(canary, b"")
    _say(
        out,
        f"order {order.id}: {order.model} {order.version} -> {order.target} written to {topic} "
        f"(retained, expires {order.expires:%Y-%m-%d %H:%M}Z)",
    )
    watch = DeployWatch(inventory, order, topic)
    if order.target_kind == "group" and not watch.targets():
        _say(
            out,
            f"no device of group {order.target_name!r} is known from the retained status and health topics; "
            "the order stays retained for devices of the group that connect",
        )
        return 1
    if wait <= 0:
        return 0
    follow(inventory, watch, wait, out)
    explain(inventory, watch, out)
    return _verdict(watch, wait, out)


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)


def _verdict(watch: DeployWatch, wait: float, out: TextIO) -> int:
    targets = watch.targets()
    good = [d for d in targets if watch.ok(d)]
    what = f"{len(good)}/{len(targets)} device(s) active on {watch.order.model} {watch.order.version}"
    if watch.all_ok():
        _say(out, f"done: {what}")
        return 0
    _say(out, f"not done: {what}")
    for line in watch.summary(wait):
        _say(out, line)
    return 1


def _canary_run(
    inventory: Inventory,
    group_order: DeployOrder,
    make: MakeOrder,
    group: str,
    n: int,
    wait: float,
    probation: float,
    private_key: Ed25519PrivateKey,
    out: TextIO,
) -> int | list[str]:
    """Deploy to n devices of the group first: the canaries' order topics, to withdraw once the group order
    is written, or the exit code."""
    client = inventory.client
    members = inventory.group_members(group)
    online = [d for d in members if inventory.devices[d].state == "online"]
    if not online:
        seen = f" ({len(members)} known, none online)" if members else ""
        _say(
            out,
            f"canary: no online device of group {group!r} is known from the retained status topics{seen}; "
            "nothing deployed",
        )
        return 1
    chosen = online[:n]
    if len(chosen) < n:
        _say(out, f"canary: only {len(chosen)} device(s) of group {group!r} online; using them all")
    info = Canary(group, tuple(chosen))
    written: list[str] = []
    watches = []
    for device in chosen:
        order = make(f"device:{device}", info)
        topic = inventory.order_topic(order)
        client.publish_retained(topic, sign_order(order, private_key))
        written.append(topic)
        watches.append(DeployWatch(inventory, order, topic, need_health=True, targets=[device]))
    _say(
        out,
        f"canary: {group_order.model} {group_order.version} -> {', '.join(chosen)} (device orders written); "
        f"waiting up to {wait:g}s for them to report active and healthy",
    )
    combined = Combined(watches)
    follow(inventory, combined, wait, out, stop=lambda: bool(combined.failures()))
    if not combined.failures() and probation > 0 and combined.all_ok():
        _say(out, f"canary: active and healthy; watching for {probation:g}s of probation")
        pump(inventory, combined, probation, out, until=lambda: bool(combined.failures()))
    explain(inventory, combined, out)
    failures = combined.failures()
    if failures or not combined.all_ok():
        for topic in written:  # withdraw: a refusing canary would otherwise retry at every restart
            client.publish_retained(topic, b"")
        if failures:
            device, reason = failures[0]
            _say(
                out,
                f"canary failed: {device} {reason}; the canary orders were withdrawn and the group order was not "
                "written",
            )
        else:
            _say(out, "canary failed: not every canary reported active and healthy in time:")
            for line in combined.summary(wait):
                _say(out, line)
            _say(out, "the canary orders were withdrawn and the group order was not written")
        return 1
    _say(out, "canary: passed; writing the group order")
    return written  # withdrawn once the group order is written
