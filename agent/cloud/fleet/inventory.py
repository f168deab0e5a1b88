"""What the fleet's retained topics say: the devices (state, group, models, health) and the orders.

A device is known from its retained status or health; the group it belongs to is the `"group"` either
reports. `Inventory.poll()` takes the next message off the broker connection, updates the table and
hands the message on (a deploy watch reads the events too). Payloads come from devices and stay
hostile: decoded JSON is checked field by field, never trusted to have a shape.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from agent.cloud.fleet.client import BrokerClient, BrokerSettings, FleetError
from agent.models.deploy import DeployOrder
from agent.transport.topics import Topics, check_level
from agent.util.timefmt import parse_utc_iso

SETTLE = 1.0  # how long retained messages are read before acting on them

MessageKind = Literal["status", "health", "events", "deploy"]
_DEVICE_KINDS: dict[str, MessageKind] = {"status": "status", "health": "health", "events": "events", "deploy": "deploy"}


@dataclass
class Device:
    """What the retained topics say about one device."""

    id: str
    state: str | None = None  # online | offline | None (no status seen)
    group: str | None = None
    status: dict[str, Any] = field(default_factory=dict)  # the last retained status, as decoded
    health: dict[str, Any] | None = None  # the last retained health, as decoded

    def models(self) -> dict[str, dict[str, Any]]:
        models = (self.health or {}).get("models")
        return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}

    def model_version(self, model: str) -> str | None:
        version = self.models().get(model, {}).get("version")
        return version if isinstance(version, str) else None

    def providers(self) -> list[str]:
        seen = [m.get("provider") for m in self.models().values()]
        return sorted({p for p in seen if isinstance(p, str) and p})

    def health_time(self) -> datetime | None:
        ts = (self.health or {}).get("ts")
        return parse_utc_iso(ts) if isinstance(ts, str) else None

    def outbox_depth(self) -> int | None:
        outbox = (self.health or {}).get("outbox")
        depth = outbox.get("depth") if isinstance(outbox, dict) else None
        return depth if isinstance(depth, int) else None


@dataclass(frozen=True)
class Message:
    kind: MessageKind
    device: str | None  # None for a group deploy topic
    payload: dict[str, Any] | None  # decoded JSON object; None for an empty payload or anything else
    topic: str


class Inventory:
    """The device table and the retained orders, fed from one broker connection on the caller's thread."""

    def __init__(self, client: BrokerClient, prefix: str = "edge") -> None:
        for level in prefix.split("/"):
            try:
                check_level(level, "topic prefix level")
            except ValueError as exc:
                raise FleetError(f"--topic-prefix: {exc}", 2) from None
        self.client, self.prefix = client, prefix
        self.devices: dict[str, Device] = {}
        self.orders: dict[str, object] = {}  # deploy topic -> decoded payload (any JSON: checked when shown)

    # ---- topics ----------------------------------------------------------------------------------

    def filters(self, *kinds: MessageKind) -> tuple[str, ...]:
        """The subscriptions for these kinds of message, on every device (and every group for deploy)."""
        found = tuple(f"{self.prefix}/+/{kind}" for kind in kinds)
        return (*found, f"{self.prefix}/fleet/+/deploy") if "deploy" in kinds else found

    def order_topic(self, order: DeployOrder) -> str:
        if order.target_kind == "device":
            return Topics(self.prefix, order.target_name).deploy
        return Topics(self.prefix, "-", order.target_name).fleet_deploy

    # ---- reading ---------------------------------------------------------------------------------

    def poll(self, timeout: float) -> Message | None:
        """The next message (the table updated), or None after `timeout` seconds."""
        received = self.client.receive(timeout)
        return None if received is None else self.absorb(*received)

    def settle(self, seconds: float) -> None:
        """Read what arrives for `seconds` (retained messages right after subscribing)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.poll(left)

    def device(self, device_id: str) -> Device:
        return self.devices.setdefault(device_id, Device(device_id))

    def group_members(self, group: str) -> list[str]:
        return sorted(d.id for d in self.devices.values() if d.group == group)

    def absorb(self, topic: str, raw: bytes) -> Message | None:
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head) :].split("/")
        payload: object = None
        if raw:
            try:
                payload = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                payload = None
        body = payload if isinstance(payload, dict) else None
        if len(levels) == 3 and levels[0] == "fleet" and levels[2] == "deploy":
            self._order(topic, payload)
            return Message("deploy", None, body, topic)
        kind = _DEVICE_KINDS.get(levels[1]) if len(levels) == 2 else None
        if kind is None:
            return None
        device_id = levels[0]
        if kind == "deploy":
            self._order(topic, payload)
            return Message("deploy", device_id, body, topic)
        if kind != "events" and body is None and raw:
            return None  # garbage on a retained topic: not a device
        dev = self.device(device_id)
        if kind == "status" and body is not None:
            dev.status = body
            state = body.get("state")
            dev.state = state if isinstance(state, str) else None
            _take_group(dev, body)
        elif kind == "health" and body is not None:
            dev.health = body
            _take_group(dev, body)
        return Message(kind, device_id, body, topic)

    def _order(self, topic: str, payload: object) -> None:
        if payload is None:
            self.orders.pop(topic, None)
        else:
            self.orders[topic] = payload


def _take_group(dev: Device, payload: dict[str, Any]) -> None:
    group = payload.get("group")
    if isinstance(group, str) and group:
        dev.group = group


@contextmanager
def connected(
    settings: BrokerSettings, prefix: str, kinds: tuple[MessageKind, ...], settle: float = SETTLE
) -> Iterator[Inventory]:
    """An inventory subscribed to `kinds` that has read the retained messages for `settle` seconds; the
    connection is closed on the way out (what was read stays readable)."""
    client = BrokerClient(settings)
    inventory = Inventory(client, prefix)
    client.connect()
    try:
        client.subscribe(*inventory.filters(*kinds))
        inventory.settle(settle)
        yield inventory
    finally:
        client.close()
