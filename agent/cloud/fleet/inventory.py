"""What the fleet's retained topics say: the devices (state, group, models, health) and the orders.

A device is known from its retained status or health; the group it belongs to is the `"group"` either
reports. `Inventory.poll()` takes the next message off the broker connection, updates the table and
hands the message on (a deploy watch reads the events too). Payloads come from devices and stay
hostile: status, health, reports and events are parsed with the agent's own contract
(`agent.transport.contract`), and a message that does not match it is handed on as an `error`, never
read field by field (a report's signature is the controller's business: `agent.cloud.fleet.reports`).
The fleet side asks a little more than the contract, what every agent's profile guarantees: the device
id of the topic and the group are names (`agent.util.names`), and the counts and times that the fleet
adds up are finite, not negative and below 2^63. A refused message is counted (`refused`, the first few
kept as one line each) and is not stored. Text from a device goes to a terminal or a log through
`printable` only: an id in a topic once carried escape sequences straight to the operator's terminal.

When the retained burst is in: the broker delivers a connection's messages in order, so a marker this
client publishes to itself after its subscriptions were acknowledged arrives after every retained
message they matched (`Inventory.sync`). No settle time is guessed: at 10,000 devices a fixed second
read 7,000 of them, silently.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from paho.mqtt.enums import MQTTProtocolVersion

from agent.cloud.fleet.client import BrokerClient, BrokerSettings, FleetError
from agent.models.deploy import MAX_ORDER_BYTES, DeployOrder
from agent.transport.contract import ContractError, WireEvent, parse_event, parse_health, parse_status
from agent.transport.contract.health import HealthReport, ModelHealth, OutboxHealth, PipelineHealth
from agent.transport.contract.report import DeviceReport, parse_report_text, split_signed
from agent.transport.contract.status import StatusMessage
from agent.transport.topics import Topics, check_level
from agent.util import jsonlimits, names
from agent.util.printable import printable
from agent.util.timefmt import parse_utc_iso

SETTLE = 0.0  # how long to go on reading once the retained burst is in (the marker says when it is)
BATCH = 400  # devices whose own retained topics are read at once: 2 x 400 messages stay under 1000
PER_DEVICE: tuple[MessageKind, ...] = ("health", "report")  # read per device, in batches
SYNC_TIMEOUT = 60.0  # the longest a retained burst may take to arrive (10,000 devices: about 4 s here)
KEPT_REFUSALS = 10  # refused messages kept as lines for the operator; the rest are only counted
# Counts and times that the fleet sums over 10,000 devices stay finite in a float below this (a device's
# 1e308 uptime twice over was `Infinity`, which no JSON reader takes).
MAX_FIGURE = 2**63

MessageKind = Literal["status", "health", "events", "deploy", "report"]
_DEVICE_KINDS: dict[str, MessageKind] = {
    "status": "status",
    "health": "health",
    "events": "events",
    "deploy": "deploy",
    "report": "report",
}


@dataclass(frozen=True)
class SignedReport:
    """A device's retained report as it arrived: its exact text and signature (checked by whoever counts
    it), and the report read from that text."""

    text: bytes
    sig: bytes
    report: DeviceReport


@dataclass
class Device:
    """What the retained topics say about one device."""

    id: str
    status: StatusMessage | None = None  # the last retained status
    health: HealthReport | None = None  # the last retained health
    report: SignedReport | None = None  # the last report (signature not checked here)

    @property
    def state(self) -> str | None:
        """online | offline | None (no status seen)."""
        return self.status.state if self.status is not None else None

    @property
    def group(self) -> str | None:
        if self.status is not None:
            return self.status.group
        group = self.health.group if self.health is not None else None
        return group if isinstance(group, str) and group else None

    def models(self) -> dict[str, ModelHealth]:
        return self.health.model_versions() if self.health is not None else {}

    def model_version(self, model: str) -> str | None:
        found = self.models().get(model)
        return found.version if found is not None else None

    def providers(self) -> list[str]:
        return sorted({m.provider for m in self.models().values()})

    def health_time(self) -> datetime | None:
        return parse_utc_iso(self.health.ts) if self.health is not None else None

    def outbox_depth(self) -> int | None:
        outbox = self.health.outbox if self.health is not None else None
        return outbox.depth if isinstance(outbox, OutboxHealth) else None


@dataclass(frozen=True)
class Message:
    kind: MessageKind
    device: str | None  # None for a group deploy topic
    topic: str
    event: WireEvent | None = None  # an event, as the contract reads it
    error: str | None = None  # what the contract found wrong with a device's message
    report: SignedReport | None = None  # a report, as it arrived


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
        self.other: Callable[[str, bytes], None] | None = None  # topics not read here (the controller's lease)
        self.orders: dict[str, object] = {}  # deploy topic -> decoded payload (any JSON: checked when shown)
        self.refused = 0  # device messages refused here (contract, names, figures)
        self.refusals: list[str] = []  # the first KEPT_REFUSALS of them, one printable line each

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
        """Read what arrives for `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.poll(left)

    def load(self, kinds: tuple[MessageKind, ...], live: tuple[MessageKind, ...] = (), follow: bool = True) -> None:
        """Subscribe to `kinds` and read every retained message they match; `live` kinds (QoS 1) are followed
        from now on. Statuses and group orders come in one burst, then each device's health and report in
        batches of its own topics, each batch small enough for Mosquitto's default per-client queue
        (`max_queued_messages` 1000 packets, beyond which it drops, QoS 0 included: with a Python reader a
        wildcard burst of 10,000 devices' health lost a third of them here), then the device orders in one
        burst (small messages; an order may name a device never seen). The wildcard subscriptions that
        follow health and reports afterwards ask for no retained messages (MQTT 5); under 3.1.1 they are
        made last, and their burst only repeats what the batches read. `follow`: the caller reads on (a watch,
        the controller), so each batch's subscriptions are dropped once read and live messages come once,
        through the wildcards; a one-shot reader leaves them to its disconnect (decoding 20,000 UNSUBACK
        reason codes cost `fleet status` a tenth of its time)."""
        per_device = [k for k in kinds if k in PER_DEVICE]
        v5 = self.client.protocol == MQTTProtocolVersion.MQTTv5
        wild = [(f"{self.prefix}/+/{k}", 1 if k in live else 0, False) for k in (*per_device, *live)]
        first: list[tuple[str, int, bool]] = [(f"{self.prefix}/+/status", 0, True)] if "status" in kinds else []
        if "deploy" in kinds:
            first.append((f"{self.prefix}/fleet/+/deploy", 0, True))
        self.client.subscribe(*first, *(wild if v5 else ()), (self.marker_topic(), 0, True))
        self.sync()
        ids = sorted(self.devices)
        for i in range(0, len(ids), BATCH):
            topics = [f"{self.prefix}/{d}/{k}" for d in ids[i : i + BATCH] for k in per_device]
            self.client.subscribe(*((t, 0, True) for t in topics))
            self.sync()
            if follow:
                self.client.unsubscribe(*topics)
        if "deploy" in kinds:
            self.client.subscribe((f"{self.prefix}/+/deploy", 0, True))
            self.sync()
        if not v5 and wild:
            self.client.subscribe(*wild)

    def marker_topic(self) -> str:
        return f"{self.prefix}/fleet/marker/{check_level(self.client.client_id, 'client id')}"

    def sync(self, timeout: float = SYNC_TIMEOUT) -> list[Message]:
        """Read until every retained message of the subscriptions made so far is in (`load` subscribes to the
        marker's topic): a marker published to this client itself arrives after them. Returns what was
        read (FleetError after `timeout`)."""
        marker, nonce = self.marker_topic(), uuid.uuid4().hex.encode()
        # QoS 1: an ACL that refuses it says so (MQTT 5) instead of a timeout; its PUBACK comes after the
        # burst, so it is not waited for.
        mid = self.client.send(marker, nonce)
        read: list[Message] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            received = self.client.receive(min(left, 0.5))
            refused = self.client.refusal(mid)
            if refused is not None:
                raise FleetError(f"the broker refused the publish on {marker}: {refused} (check the ACL of this user)")
            if received is None:
                continue
            topic, raw = received
            if topic == marker:
                if raw == nonce:
                    return read
                continue
            msg = self.absorb(topic, raw)
            if msg is not None:
                read.append(msg)
        raise FleetError(
            f"the broker did not deliver this client's own marker on {marker} within {timeout:g}s: the retained "
            "messages cannot be known to be complete (the ACL must let the fleet user write and read it)"
        )

    def device(self, device_id: str) -> Device:
        return self.devices.setdefault(device_id, Device(device_id))

    def group_members(self, group: str) -> list[str]:
        return sorted(d.id for d in self.devices.values() if d.group == group)

    def absorb(self, topic: str, raw: bytes) -> Message | None:
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head) :].split("/")
        if len(levels) == 3 and levels[0] == "fleet" and levels[2] == "deploy":
            self._order(topic, raw)
            return Message("deploy", None, topic)
        kind = _DEVICE_KINDS.get(levels[1]) if len(levels) == 2 else None
        if kind is None:
            if self.other is not None:
                self.other(topic, raw)
            return None
        device_id = levels[0]
        if kind == "deploy":
            self._order(topic, raw)
            return Message("deploy", device_id, topic)
        if not raw:
            return None  # a retained message cleared: nothing to read
        try:
            names.check(device_id, "device id in the topic")
        except names.UnsafeNameError as exc:
            return self._refuse(Message(kind, None, topic, error=str(exc)))
        try:
            if kind == "events":
                return Message(kind, device_id, topic, event=parse_event(raw))
            if kind == "report":
                text, sig = split_signed(raw)
                signed = SignedReport(text, sig, parse_report_text(text))
                self.device(device_id).report = signed
                return Message(kind, device_id, topic, report=signed)
            if kind == "status":
                status = parse_status(raw)
                _check_name(status.group, "status", "group")
                self.device(device_id).status = status
            else:
                health = parse_health(raw)
                _check_health(health)
                self.device(device_id).health = health
        except ContractError as exc:
            return self._refuse(Message(kind, device_id, topic, error=str(exc)))
        return Message(kind, device_id, topic)

    def _refuse(self, msg: Message) -> Message:
        self.refused += 1
        if len(self.refusals) < KEPT_REFUSALS:
            self.refusals.append(f"{printable(msg.topic)}: {printable(msg.error)}")
        return msg

    def _order(self, topic: str, raw: bytes) -> None:
        """An order as the devices would read it, bounded as they bound it: a retained payload of brackets
        once ended `fleet status` with a RecursionError. One that is not JSON is kept (as its error), so
        that it is listed, not taken for a withdrawn order."""
        if not raw:
            self.orders.pop(topic, None)
            return
        try:
            self.orders[topic] = jsonlimits.loads(raw, max_bytes=MAX_ORDER_BYTES)
        except jsonlimits.JSONLimitError as exc:
            self.orders[topic] = Unreadable(str(exc))


@dataclass(frozen=True)
class Unreadable:
    """A retained payload on a deploy topic that is not JSON, or too large or deep to be read."""

    error: str


def _check_name(value: object, what: str, field: str) -> None:
    """ContractError unless `value` is a name: every agent's profile makes its id and group names."""
    try:
        names.check(value, f"field {field!r}")
    except names.UnsafeNameError as exc:
        raise ContractError(what, str(exc)) from None


def _check_health(health: HealthReport) -> None:
    """The group is a name, and every count and time the fleet reads from the agent, the pipelines and the
    outbox is a finite number from 0 to MAX_FIGURE: a NaN p95 sorted the fleet's percentiles wrongly and
    printed `NaN` in `--json`, a 400-digit error count ended `fleet status` with an OverflowError."""
    if isinstance(health.group, str):
        _check_name(health.group, "health", "group")
    _check_figures(health.agent.uptime_s, "agent.uptime_s")
    if isinstance(health.pipelines, dict):
        for name, pipeline in health.pipelines.items():
            _check_pipeline(pipeline, f"pipelines.{printable(name, 64)}")
    if isinstance(health.outbox, OutboxHealth):
        for field, value in health.outbox:
            _check_figures(value, f"outbox.{field}")


def _check_pipeline(pipeline: PipelineHealth, where: str) -> None:
    for field, value in pipeline:
        if field == "latency_ms":
            for stage, times in pipeline.latency_ms.items():
                for part, figure in times:
                    _check_figures(figure, f"{where}.latency_ms.{printable(stage, 64)}.{part}")
        else:
            _check_figures(value, f"{where}.{field}")


def _check_figures(value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return  # text, flags and absent figures are the contract's business
    if not (0 <= value < MAX_FIGURE and (isinstance(value, int) or math.isfinite(value))):  # a float NaN fails both
        raise ContractError("health", f"expected a finite number from 0 to 2^63 (got {printable(value, 40)})", field)


@contextmanager
def connected(
    settings: BrokerSettings,
    prefix: str,
    kinds: tuple[MessageKind, ...],
    settle: float = SETTLE,
    live: tuple[MessageKind, ...] = (),
    sync: bool = True,
) -> Iterator[Inventory]:
    """An inventory subscribed to `kinds` that has read every retained message they match (then `settle`
    seconds more); the connection is closed on the way out (what was read stays readable). Retained
    state is read at QoS 0 (see `BrokerClient.subscribe`); `live` kinds, the messages a command follows
    as they come, at QoS 1. `sync=False`: nothing retained is needed (the subscriptions are made all the same)."""
    client = BrokerClient(settings)
    inventory = Inventory(client, prefix)
    client.connect()
    try:
        if sync:
            inventory.load(kinds, live, follow=bool(live))
        else:
            client.subscribe(*inventory.filters(*kinds, *live))
        inventory.settle(settle)
        yield inventory
    finally:
        client.close()
