"""The fleet side of deployments: write signed, retained orders and follow what the devices report.

`deploy()` writes an order (agent.deploy) to `<prefix>/<device>/deploy` or `<prefix>/fleet/<group>/deploy`
and follows the devices' events (`<prefix>/<device>/events`) and retained health until every targeted
device has gone active, refused or rolled back, or the wait runs out. `status()` reads the retained
status, health and deploy topics for a moment and tabulates them.

The group a device belongs to is read from its retained status or health (`"group"`); a device that
reports an event for the order is followed too, known or not. Only the standard library, paho-mqtt and
the signing module are needed: no onnx.
"""

from __future__ import annotations

import json
import queue
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.models.deploy import Canary, DeployOrder, new_order, sign_order
from agent.transport.topics import Topics, check_level

CONNECT_TIMEOUT = 10.0
SETTLE = 1.0  # how long retained messages are read before acting on them

# Progress states of one device for one order.
PENDING, DOWNLOADING, VERIFYING, ACTIVE, REFUSED, ROLLED_BACK, ERROR = (
    "pending",
    "downloading",
    "verifying",
    "active",
    "refused",
    "rolled-back",
    "error",
)
TERMINAL = {ACTIVE, REFUSED, ROLLED_BACK}
_EVENT_STATE = {
    "model.downloading": DOWNLOADING,
    "model.verifying": VERIFYING,
    "model.activated": ACTIVE,
    "model.refused": REFUSED,
    "model.rolled_back": ROLLED_BACK,
    "model.error": ERROR,
    "deploy.refused": REFUSED,
}


class FleetError(Exception):
    """Ends a fleet command with a one-line message: code 1 for runtime failures, 2 for bad input."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ---- the broker ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    url: str
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def address(self) -> tuple[str, int, bool]:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise FleetError(f"--broker: expected mqtt://host[:port] or mqtts://host[:port], got {self.url!r}", 2)
        try:
            port = parts.port
        except ValueError:
            raise FleetError(f"--broker: the port in {self.url!r} is not a number from 1 to 65535", 2) from None
        secure = parts.scheme == "mqtts"
        if not secure and (self.tls_ca or self.tls_cert or self.tls_key):
            raise FleetError("--tls-* given but --broker is mqtt://; use mqtts:// to connect with TLS", 2)
        return parts.hostname, port or (8883 if secure else 1883), secure


@dataclass
class Device:
    """What the retained topics say about one device."""

    id: str
    state: str | None = None  # online | offline | None (no status seen)
    group: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] | None = None

    def model_version(self, model: str) -> str | None:
        models = (self.health or {}).get("models")
        entry = models.get(model) if isinstance(models, dict) else None
        return entry.get("version") if isinstance(entry, dict) else None

    def models(self) -> dict[str, dict[str, Any]]:
        models = (self.health or {}).get("models")
        return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}

    def providers(self) -> list[str]:
        seen = [m.get("provider") for m in self.models().values()]
        return sorted({p for p in seen if isinstance(p, str) and p})

    def health_time(self) -> datetime | None:
        ts = (self.health or {}).get("ts")
        try:
            value = datetime.fromisoformat(ts) if isinstance(ts, str) else None
        except ValueError:
            return None
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)

    def outbox_depth(self) -> int | None:
        outbox = (self.health or {}).get("outbox")
        depth = outbox.get("depth") if isinstance(outbox, dict) else None
        return depth if isinstance(depth, int) else None


@dataclass(frozen=True)
class Message:
    kind: str  # status | health | events | deploy
    device: str | None  # None for a group deploy topic
    payload: Any  # decoded JSON, or None for an empty or undecodable payload
    topic: str


class FleetClient:
    """A plain paho-mqtt 2 client for the cloud side. Messages are queued by paho's thread and
    decoded, and the device table updated, on the caller's thread by `poll()`."""

    def __init__(self, settings: BrokerSettings, prefix: str = "edge") -> None:
        for level in prefix.split("/"):
            try:
                check_level(level, "topic prefix level")
            except ValueError as exc:
                raise FleetError(f"--topic-prefix: {exc}", 2) from None
        self.settings, self.prefix = settings, prefix
        self.host, self.port, self.secure = settings.address()
        self.devices: dict[str, Device] = {}
        self.orders: dict[str, Any] = {}  # deploy topic -> decoded payload
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connected = threading.Event()
        self._connect_reason: Any = None
        self._subacks: set[int] = set()
        self._acked = threading.Condition()
        self._pubacks: dict[int, Any] = {}
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"edge-agent-fleet-{uuid.uuid4().hex[:10]}", protocol=paho.MQTTv5
        )
        if settings.username:
            password = None
            if settings.password_file is not None:
                try:
                    password = settings.password_file.read_text().strip()
                except OSError as exc:
                    raise FleetError(
                        f"--password-file: cannot read {settings.password_file}: {exc.strerror or exc}", 2
                    ) from None
            client.username_pw_set(settings.username, password)
        elif settings.password_file is not None:
            raise FleetError("--password-file needs --username", 2)
        if self.secure:
            try:
                client.tls_set(
                    ca_certs=str(settings.tls_ca) if settings.tls_ca else None,
                    certfile=str(settings.tls_cert) if settings.tls_cert else None,
                    keyfile=str(settings.tls_key) if settings.tls_key else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError) as exc:
                raise FleetError(f"--tls-*: cannot load the TLS files ({exc})", 2) from None
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self.client = client

    # ---- connection ------------------------------------------------------------------------------

    def connect(self, timeout: float = CONNECT_TIMEOUT) -> FleetClient:
        self.client.connect_timeout = timeout
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except ssl.SSLError as exc:
            raise FleetError(f"cannot connect to {self.settings.url}: TLS: {exc.reason or exc}") from None
        except OSError as exc:
            raise FleetError(f"cannot connect to {self.settings.url}: {exc.strerror or exc}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise FleetError(f"no answer from the broker at {self.settings.url} within {timeout:g}s")
        reason = self._connect_reason
        if reason is not None and reason.is_failure:
            self.close()
            raise FleetError(
                f"the broker at {self.settings.url} refused the connection: {reason} "
                "(check --username, --password-file and the broker's ACL)"
            )
        return self

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def subscribe(self, *filters: str, timeout: float = 5.0) -> None:
        """Subscribe and wait for the SUBACKs (retained messages follow them)."""
        mids = []
        for f in filters:
            rc, mid = self.client.subscribe(f, qos=1)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise FleetError(f"cannot subscribe to {f}: {paho.error_string(rc)}")
            mids.append(mid)
        deadline = time.monotonic() + timeout
        with self._acked:
            while not all(m in self._subacks for m in mids):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(f"the broker did not acknowledge the subscriptions within {timeout:g}s")
                self._acked.wait(left)

    def publish_retained(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        """Publish retained at QoS 1 and wait for the PUBACK; a refusal (MQTT 5 reason code) raises."""
        info = self.client.publish(topic, payload, qos=1, retain=True)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise FleetError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        deadline = time.monotonic() + timeout
        with self._acked:
            while info.mid not in self._pubacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FleetError(f"the broker did not acknowledge the order on {topic} within {timeout:g}s")
                self._acked.wait(left)
            reason = self._pubacks.pop(info.mid)
        if reason is not None and getattr(reason, "is_failure", False):
            raise FleetError(f"the broker refused the publish on {topic}: {reason} (check the ACL of this user)")

    # ---- messages --------------------------------------------------------------------------------

    def poll(self, timeout: float) -> Message | None:
        """The next message (device table updated), or None after `timeout` seconds."""
        try:
            topic, raw = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        return self._absorb(topic, raw)

    def settle(self, seconds: float) -> None:
        """Read what arrives for `seconds` (retained messages right after subscribing)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.poll(left)

    def device(self, device_id: str) -> Device:
        return self.devices.setdefault(device_id, Device(device_id))

    def group_members(self, group: str) -> list[str]:
        return sorted(d.id for d in self.devices.values() if d.group == group)

    def _absorb(self, topic: str, raw: bytes) -> Message | None:
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        levels = topic[len(head) :].split("/")
        payload: Any = None
        if raw:
            try:
                payload = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                payload = None
        if len(levels) == 3 and levels[0] == "fleet" and levels[2] == "deploy":
            self._order(topic, payload)
            return Message("deploy", None, payload, topic)
        if len(levels) != 2:
            return None
        device_id, kind = levels
        if kind == "deploy":
            self._order(topic, payload)
            return Message("deploy", device_id, payload, topic)
        if kind not in ("status", "health", "events"):
            return None
        if kind != "events" and not isinstance(payload, dict) and raw:
            return None  # garbage on a retained topic: not a device
        dev = self.device(device_id)
        if kind == "status" and isinstance(payload, dict):
            dev.status = payload
            state = payload.get("state")
            dev.state = state if isinstance(state, str) else None
            self._take_group(dev, payload)
        elif kind == "health" and isinstance(payload, dict):
            dev.health = payload
            self._take_group(dev, payload)
        return Message(kind, device_id, payload if isinstance(payload, dict) else None, topic)

    def _order(self, topic: str, payload: Any) -> None:
        if payload is None:
            self.orders.pop(topic, None)
        else:
            self.orders[topic] = payload

    @staticmethod
    def _take_group(dev: Device, payload: dict[str, Any]) -> None:
        group = payload.get("group")
        if isinstance(group, str) and group:
            dev.group = group

    # ---- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connect_reason = reason
        self._connected.set()

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self._acked:
            self._subacks.add(mid)
            self._acked.notify_all()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._acked:
            self._pubacks[mid] = reason
            self._acked.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._queue.put((message.topic, bytes(message.payload)))

    # ---- topics ----------------------------------------------------------------------------------

    def filters(self) -> tuple[str, ...]:
        p = self.prefix
        return (f"{p}/+/status", f"{p}/+/health", f"{p}/+/events")

    def order_topic(self, order: DeployOrder) -> str:
        if order.target_kind == "device":
            return Topics(self.prefix, order.target_name).deploy
        return Topics(self.prefix, "-", order.target_name).fleet_deploy


# ---- following one order ------------------------------------------------------------------------


@dataclass
class Progress:
    state: str = PENDING
    reason: str | None = None
    healthy: bool = False  # its health reports the order's version
    via: str = ""  # what made it active: an event, or its health


def event_matches(event: dict[str, Any], order: DeployOrder, topic: str) -> bool:
    """Is this device event about this order? Events that name the order decide by id; others (from a
    daemon that does not add `order`) by model and version (for a rollback: the version rolled back from)."""
    etype = event.get("type")
    if etype not in _EVENT_STATE:
        return False
    if etype == "deploy.refused":
        return event.get("order") == order.id or (event.get("order") is None and event.get("topic") == topic)
    if "order" in event and event["order"] is not None:
        return event["order"] == order.id
    if event.get("model") != order.model:
        return False
    if etype == "model.rolled_back":
        return event.get("previous") == order.version or event.get("from") == order.version
    return event.get("version") == order.version


def _mb(n: Any) -> str:
    return f"{n / 1e6:.1f} MB" if isinstance(n, (int, float)) and not isinstance(n, bool) else "?"


def describe(state: str, event: dict[str, Any]) -> str:
    reason = event.get("reason") or "no reason given"
    if state == DOWNLOADING:
        resume = event.get("resume_from")
        more = f", resuming at {_mb(resume)}" if isinstance(resume, int) and resume > 0 else ""
        variant = f"variant {event['variant']}, " if event.get("variant") else ""
        return f"downloading ({variant}{_mb(event.get('bytes'))}{more})"
    if state == ACTIVE:
        bits = [
            f"variant {event['variant']}" if event.get("variant") else "",
            f"on {event['provider']}" if event.get("provider") else "",
        ]
        detail = " ".join(b for b in bits if b)
        return f"active ({detail})" if detail else "active"
    if state in (REFUSED, ROLLED_BACK):
        return f"{state}: {reason}"
    if state == ERROR:
        return f"error: {reason} (the device retries)"
    return state


class DeployWatch:
    """The progress of one order on its target devices, fed with the client's messages. Pure logic."""

    def __init__(
        self,
        client: FleetClient,
        order: DeployOrder,
        topic: str,
        *,
        need_health: bool = False,
        targets: list[str] | None = None,
    ) -> None:
        self.client, self.order, self.topic, self.need_health = client, order, topic, need_health
        self.fixed = targets
        self.progress: dict[str, Progress] = {}
        self.started = time.monotonic()

    def targets(self) -> list[str]:
        if self.fixed is not None:
            ids = set(self.fixed)
        elif self.order.target_kind == "device":
            ids = {self.order.target_name}
        else:
            ids = set(self.client.group_members(self.order.target_name))
        return sorted(ids | set(self.progress))

    def _p(self, device: str) -> Progress:
        return self.progress.setdefault(device, Progress())

    def _targeted(self, device: str) -> bool:
        return device in self.targets()

    def seed(self) -> list[str]:
        """Devices whose retained health already reports the version: nothing left to do there."""
        lines = []
        for device in self.targets():
            dev = self.client.devices.get(device)
            if dev is not None and dev.model_version(self.order.model) == self.order.version:
                p = self._p(device)
                p.state, p.healthy, p.via = ACTIVE, True, "health"
                lines.append(f"{device}: active (already runs {self.order.model} {self.order.version})")
        return lines

    def feed(self, msg: Message) -> list[str]:
        if msg.device is None or not isinstance(msg.payload, dict):
            return []
        device, payload = msg.device, msg.payload
        if msg.kind == "events":
            if not event_matches(payload, self.order, self.topic):
                return []
            if self.fixed is not None and device not in self.fixed:
                return []
            state = _EVENT_STATE[payload["type"]]
            p = self._p(device)
            if p.state in TERMINAL and not (state == ROLLED_BACK and p.state == ACTIVE):
                return []
            text = describe(state, payload)
            changed = (p.state, p.reason) != (state, text)
            p.state, p.reason, p.via = state, text, "event"
            if state == ROLLED_BACK:
                p.healthy = False
            return [f"{device}: {text}"] if changed else []
        if msg.kind == "health" and self._targeted(device):
            dev = self.client.devices[device]
            if dev.model_version(self.order.model) != self.order.version:
                return []
            p = self._p(device)
            first = not p.healthy
            p.healthy = True
            if p.state not in TERMINAL:
                p.state, p.via = ACTIVE, "health"
                provider = dev.models().get(self.order.model, {}).get("provider")
                return [
                    f"{device}: active (health reports {self.order.version}{' on ' + provider if provider else ''})"
                ]
            if first and self.need_health and p.state == ACTIVE:
                return [f"{device}: healthy (health reports {self.order.version})"]
            return []
        if msg.kind == "status" and self._targeted(device):
            dev = self.client.devices[device]
            p = self.progress.get(device)
            if dev.state == "offline" and (p is None or p.state not in TERMINAL):
                return [f"{device}: offline (the retained order applies when it reconnects)"]
        return []

    def ok(self, device: str) -> bool:
        p = self.progress.get(device)
        return p is not None and p.state == ACTIVE and (p.healthy or not self.need_health)

    def settled(self, device: str) -> bool:
        p = self.progress.get(device)
        if p is not None and p.state in (REFUSED, ROLLED_BACK):
            return True
        if self.ok(device):
            return True
        dev = self.client.devices.get(device)
        return dev is not None and dev.state == "offline"

    def failures(self) -> list[tuple[str, str]]:
        return [(d, p.reason or p.state) for d, p in sorted(self.progress.items()) if p.state in (REFUSED, ROLLED_BACK)]

    def done(self) -> bool:
        targets = self.targets()
        return bool(targets) and all(self.settled(d) for d in targets)

    def all_ok(self) -> bool:
        targets = self.targets()
        return bool(targets) and all(self.ok(d) for d in targets)

    def summary(self, waited: float) -> list[str]:
        lines = []
        for d in self.targets():
            p = self.progress.get(d, Progress())
            dev = self.client.devices.get(d)
            if self.ok(d):
                continue
            if p.state in (REFUSED, ROLLED_BACK):
                lines.append(f"  {d}: {p.reason}")
            elif dev is not None and dev.state == "offline":
                lines.append(f"  {d}: offline; the retained order applies when it reconnects")
            elif p.state == ACTIVE:
                lines.append(f"  {d}: active, but no health report with {self.order.version} within {waited:g}s")
            else:
                last = f" (last: {p.reason or p.state})" if p.state != PENDING else ""
                lines.append(f"  {d}: no final report within {waited:g}s{last}")
        return lines


def follow(
    client: FleetClient, watch: Any, wait: float, out: TextIO, stop: Callable[[Any], bool] | None = None
) -> None:
    """Print progress until the watch is done (or `stop` says so) or `wait` seconds pass."""
    for line in watch.seed():
        _say(out, watch, line)
    deadline = time.monotonic() + wait
    while not watch.done() and not (stop and stop(watch)):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        msg = client.poll(min(left, 0.5))
        if msg is not None:
            for line in watch.feed(msg):
                _say(out, watch, line)


def _say(out: TextIO, watch: Any, line: str) -> None:
    print(f"[{time.monotonic() - watch.started:6.1f}s] {line}", file=out, flush=True)


# ---- the commands ------------------------------------------------------------------------------


def _parse_target(to: str) -> tuple[str, str]:
    from agent.models.deploy import parse_target

    try:
        return parse_target(to)
    except ValueError as exc:
        raise FleetError(f"--to: {exc}", 2) from None


def deploy(
    settings: BrokerSettings,
    *,
    model: str,
    version: str,
    to: str,
    private_key: Any,
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
    kind, name = _parse_target(to)
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
    client = FleetClient(settings, prefix).connect()
    try:
        client.subscribe(*client.filters())
        client.settle(settle)
        if canary is not None:
            code = _canary_run(client, order, make, name, canary, wait, probation, private_key, out)
            if code is not None:
                return code
            order = make(to)  # issued after the canaries' orders, so it supersedes them
        topic = client.order_topic(order)
        client.publish_retained(topic, sign_order(order, private_key))
        print(
            f"order {order.id}: {model} {version} -> {to} written to {topic} (retained, expires {order.expires:%Y-%m-%d %H:%M}Z)",
            file=out,
            flush=True,
        )
        watch = DeployWatch(client, order, topic)
        if kind == "group" and not watch.targets():
            print(
                f"no device of group {name!r} is known from the retained status and health topics; "
                "the order stays retained for devices of the group that connect",
                file=out,
                flush=True,
            )
            return 1
        if wait <= 0:
            return 0
        follow(client, watch, wait, out)
        return _verdict(watch, wait, out)
    finally:
        client.close()


def _verdict(watch: DeployWatch, wait: float, out: TextIO) -> int:
    targets = watch.targets()
    good = [d for d in targets if watch.ok(d)]
    if watch.all_ok():
        print(
            f"done: {len(good)}/{len(targets)} device(s) active on {watch.order.model} {watch.order.version}",
            file=out,
            flush=True,
        )
        return 0
    print(
        f"not done: {len(good)}/{len(targets)} device(s) active on {watch.order.model} {watch.order.version}",
        file=out,
        flush=True,
    )
    for line in watch.summary(wait):
        print(line, file=out, flush=True)
    return 1


def _canary_run(
    client: FleetClient,
    group_order: DeployOrder,
    make: Callable[..., DeployOrder],
    group: str,
    n: int,
    wait: float,
    probation: float,
    private_key: Any,
    out: TextIO,
) -> int | None:
    """Deploy to n devices of the group first; None to go on with the group order, else the exit code."""
    members = client.group_members(group)
    online = [d for d in members if client.devices[d].state == "online"]
    if not online:
        seen = f" ({len(members)} known, none online)" if members else ""
        print(
            f"canary: no online device of group {group!r} is known from the retained status topics{seen}; "
            "nothing deployed",
            file=out,
            flush=True,
        )
        return 1
    chosen = online[:n]
    if len(chosen) < n:
        print(f"canary: only {len(chosen)} device(s) of group {group!r} online; using them all", file=out, flush=True)
    info = Canary(group, tuple(chosen))
    written: list[str] = []
    watches = []
    for device in chosen:
        order = make(f"device:{device}", info)
        topic = client.order_topic(order)
        client.publish_retained(topic, sign_order(order, private_key))
        written.append(topic)
        watches.append(DeployWatch(client, order, topic, need_health=True, targets=[device]))
    print(
        f"canary: {group_order.model} {group_order.version} -> {', '.join(chosen)} (device orders written); "
        f"waiting up to {wait:g}s for them to report active and healthy",
        file=out,
        flush=True,
    )
    combined = _Combined(watches)
    follow(client, combined, wait, out, stop=lambda w: bool(w.failures()))
    failures = combined.failures()
    if not failures and probation > 0 and combined.all_ok():
        print(f"canary: active and healthy; watching for {probation:g}s of probation", file=out, flush=True)
        deadline = time.monotonic() + probation
        while not combined.failures() and (left := deadline - time.monotonic()) > 0:
            msg = client.poll(min(left, 0.5))
            if msg is not None:
                for line in combined.feed(msg):
                    _say(out, combined, line)
        failures = combined.failures()
    if failures or not combined.all_ok():
        for topic in written:  # withdraw: a refusing canary would otherwise retry at every restart
            client.publish_retained(topic, b"")
        if failures:
            device, reason = failures[0]
            print(
                f"canary failed: {device} {reason}; the canary orders were withdrawn and the group order was not written",
                file=out,
                flush=True,
            )
        else:
            print("canary failed: not every canary reported active and healthy in time:", file=out, flush=True)
            for line in combined.summary(wait):
                print(line, file=out, flush=True)
            print("the canary orders were withdrawn and the group order was not written", file=out, flush=True)
        return 1
    print("canary: passed; writing the group order", file=out, flush=True)
    for topic in written:  # superseded by the group order (same version): keep the tree to one order per device
        client.publish_retained(topic, b"")
    return None


class _Combined:
    """Several single-device watches (the canaries' own orders) followed as one."""

    def __init__(self, watches: list[DeployWatch]) -> None:
        self.watches = watches
        self.started = time.monotonic()

    def seed(self) -> list[str]:
        return [line for w in self.watches for line in w.seed()]

    def feed(self, msg: Message) -> list[str]:
        return [line for w in self.watches for line in w.feed(msg)]

    def done(self) -> bool:
        return all(w.done() for w in self.watches)

    def all_ok(self) -> bool:
        return all(w.all_ok() for w in self.watches)

    def failures(self) -> list[tuple[str, str]]:
        return [f for w in self.watches for f in w.failures()]

    def summary(self, waited: float) -> list[str]:
        return [line for w in self.watches for line in w.summary(waited)]


# ---- status -------------------------------------------------------------------------------------


def _age(ts: datetime | None, now: datetime) -> float | None:
    return None if ts is None else round((now - ts).total_seconds(), 1)


def _human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}min ago"
    if s < 172800:
        return f"{s // 3600}h ago"
    return f"{s // 86400}d ago"


def _order_summary(topic: str, payload: Any) -> dict[str, Any]:
    """What a retained order says (its signature is the devices' business; not checked here)."""
    doc: Any = None
    if isinstance(payload, dict) and isinstance(payload.get("order"), str):
        try:
            doc = json.loads(payload["order"])
        except ValueError:
            doc = None
    if not isinstance(doc, dict):
        return {"topic": topic, "error": "not a deployment order"}
    keys = ("id", "model", "version", "target", "issued", "expires")
    out = {"topic": topic, **{k: doc.get(k) for k in keys}}
    if doc.get("canary"):
        out["canary"] = doc["canary"]
    return out


def fleet_state(
    settings: BrokerSettings, prefix: str = "edge", group: str | None = None, settle: float = SETTLE
) -> dict[str, Any]:
    client = FleetClient(settings, prefix).connect()
    try:
        client.subscribe(f"{prefix}/+/status", f"{prefix}/+/health", f"{prefix}/+/deploy", f"{prefix}/fleet/+/deploy")
        client.settle(settle)
    finally:
        client.close()
    now = datetime.now(timezone.utc)
    devices = []
    for dev in sorted(client.devices.values(), key=lambda d: d.id):
        if group is not None and dev.group != group:
            continue
        devices.append(
            {
                "device": dev.id,
                "state": dev.state,
                "group": dev.group,
                "models": {
                    k: {f: v.get(f) for f in ("version", "provider", "digest") if f in v}
                    for k, v in dev.models().items()
                },
                "providers": dev.providers(),
                "health_ts": (dev.health or {}).get("ts"),
                "health_age_s": _age(dev.health_time(), now),
                "outbox_depth": dev.outbox_depth(),
                "agent_version": dev.status.get("version"),
            }
        )
    orders = [_order_summary(t, p) for t, p in sorted(client.orders.items())]
    if group is not None:
        names = {d["device"] for d in devices}
        orders = [o for o in orders if o.get("target") in (f"group:{group}", *(f"device:{n}" for n in names))]
    return {"prefix": prefix, "devices": devices, "orders": orders}


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider") or provider


def render_status(state: dict[str, Any]) -> str:
    rows = [("DEVICE", "STATE", "GROUP", "MODELS", "PROVIDER", "HEALTH", "OUTBOX")]
    for d in state["devices"]:
        models = ", ".join(f"{k} {v.get('version', '?')}" for k, v in sorted(d["models"].items())) or "-"
        rows.append(
            (
                d["device"],
                d["state"] or "?",
                d["group"] or "?",
                models,
                ", ".join(_short(p) for p in d["providers"]) or "-",
                _human_age(d["health_age_s"]),
                "-" if d["outbox_depth"] is None else str(d["outbox_depth"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append(f"(no device seen on {state['prefix']}/+/status or {state['prefix']}/+/health)")
    if state["orders"]:
        lines.append("")
        lines.append("retained deployment orders (signatures are checked by the devices):")
        for o in state["orders"]:
            if "error" in o:
                lines.append(f"  {o['topic']}: {o['error']}")
            else:
                canary = " (canary)" if o.get("canary") else ""
                lines.append(
                    f"  {o['topic']}: {o['model']} {o['version']} -> {o['target']}{canary}, "
                    f"issued {o['issued']}, expires {o['expires']}, id {o['id']}"
                )
    return "\n".join(lines)
