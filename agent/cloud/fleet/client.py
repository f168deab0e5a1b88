"""The cloud side's broker connection: one short-lived paho-mqtt 2 client per command.

Unlike the device's connection (agent.transport), nothing here reconnects or keeps an outbox: a fleet
command connects, reads what it needs, writes an order and ends, and any failure ends it with one line.
A broker that refuses MQTT 5, or closes the connection before answering it (RabbitMQ 3.10, amqtt), gets
one more try with MQTT 3.1.1.
Messages are queued by the network thread (the device's loop, agent.transport.netloop, on the patched
paho client) and taken on the caller's thread by `receive()`, so that everything that interprets them
runs single-threaded. A lost connection ends the command: `receive()` raises FleetError (paho's own
loop reconnected silently, into a session without the subscriptions, and the command waited forever).
"""

from __future__ import annotations

import contextlib
import functools
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.transport import pahopatch
from agent.transport.netloop import NetworkLoop
from agent.util import redact

CONNECT_TIMEOUT = 10.0
SUBACK_TIMEOUT = 5.0
PUBACK_TIMEOUT = 10.0
KEEPALIVE = 30
RECEIVE_BUFFER = 4 * 1024 * 1024  # bytes; the kernel caps it at net.core.rmem_max
UNSUPPORTED_PROTOCOL = 0x84  # CONNACK: the broker does not speak this MQTT version


class FleetError(Exception):
    """Ends a fleet command with a one-line message: code 1 for runtime failures, 2 for bad input."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class BrokerSettings:
    url: str
    username: str | None = None
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def address(self) -> tuple[str, int, bool]:
        """(host, port, TLS) from the URL; FleetError (code 2) for a URL the options cannot mean."""
        parts = urlsplit(self.url)
        shown = redact.text(self.url)  # a password in the URL is never echoed
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise FleetError(f"--broker: expected mqtt://host[:port] or mqtts://host[:port], got {shown!r}", 2)
        if "@" in parts.netloc:  # paho logs in with --username and --password-file only: never silently ignore
            raise FleetError(
                f"--broker: put the user in --username and the password in --password-file, not in {shown!r}", 2
            )
        try:
            port = parts.port
        except ValueError:
            raise FleetError(f"--broker: the port in {shown!r} is not a number from 1 to 65535", 2) from None
        secure = parts.scheme == "mqtts"
        if not secure and (self.tls_ca or self.tls_cert or self.tls_key):
            raise FleetError("--tls-* given but --broker is mqtt://; use mqtts:// to connect with TLS", 2)
        return parts.hostname, port or (8883 if secure else 1883), secure


@functools.cache
def _options(qos: int, retained: bool) -> SubscribeOptions:
    """One options object per kind, shared by every filter: paho only reads it, and making one costs more
    than the rest of a subscription (a controller or `fleet status` subscribes to 20,000 topics at 10,000
    devices)."""
    return SubscribeOptions(qos, retainHandling=0 if retained else SubscribeOptions.RETAIN_DO_NOT_SEND)


class _Mqtt5RefusedError(Exception):
    """The broker refused MQTT 5 (or closed the connection before any CONNACK): 3.1.1 is worth a try."""


class BrokerClient:
    """Connect or fail in one line; subscribe and publish retained, each waiting for the broker's ack."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str | None = None,
        protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    ) -> None:
        self.settings = settings
        self.host, self.port, self.secure = settings.address()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._acked = threading.Condition()
        self._pubacks: dict[int, ReasonCode] = {}
        self._client_id = client_id or f"edge-agent-fleet-{uuid.uuid4().hex[:10]}"
        self._netloop = NetworkLoop()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None  # why the connection ended, once it did
        self.client = self._make_client(protocol)

    def _make_client(self, protocol: MQTTProtocolVersion) -> paho.Client:
        settings = self.settings
        self.protocol = protocol
        # SimpleQueue: put and get in C; a retained burst of 30,000 messages crosses it one by one. One per
        # client: a broker that closed an MQTT 5 attempt left that attempt's end (None) in the last one.
        self._queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()  # None: connection lost
        self._connected = threading.Event()
        self._connect_reason: ReasonCode | None = None
        client = pahopatch.CLIENT_CLASS(
            CallbackAPIVersion.VERSION2, client_id=self._client_id, protocol=protocol, reconnect_on_failure=False
        )
        if settings.username:
            client.username_pw_set(settings.username, self._password())
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
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._netloop.attach(client)
        return client

    def _password(self) -> str | None:
        path = self.settings.password_file
        if path is None:
            return None
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise FleetError(f"--password-file: cannot read {path}: {exc.strerror or exc}", 2) from None

    def connect(self, timeout: float = CONNECT_TIMEOUT) -> BrokerClient:
        try:
            return self._connect(timeout)
        except _Mqtt5RefusedError:
            self.client = self._make_client(MQTTProtocolVersion.MQTTv311)
            return self._connect(timeout)

    def _connect(self, timeout: float) -> BrokerClient:
        url = self.settings.url
        self.client.connect_timeout = timeout
        self._netloop.open()
        try:
            self.client.connect(self.host, self.port, keepalive=KEEPALIVE)
        except ssl.SSLError as exc:
            self._netloop.close()
            raise FleetError(f"cannot connect to {url}: TLS: {exc.reason or exc}") from None
        except OSError as exc:
            self._netloop.close()
            raise FleetError(f"cannot connect to {url}: {exc.strerror or exc}") from None
        self._stopping.clear()
        self._lost = None
        self._thread = threading.Thread(target=self._run, name="fleet-mqtt", daemon=True)
        self._thread.start()
        if not self._connected.wait(timeout):
            self.close()
            raise FleetError(f"no answer from the broker at {url} within {timeout:g}s")
        reason = self._connect_reason
        if self.protocol == MQTTProtocolVersion.MQTTv5 and (reason is None or reason.value == UNSUPPORTED_PROTOCOL):
            self.close()
            raise _Mqtt5RefusedError
        if reason is not None and reason.is_failure:
            self.close()
            raise FleetError(
                f"the broker at {url} refused the connection: {reason} "
                "(check --username, --password-file and the broker's ACL)"
            )
        return self

    def close(self) -> None:
        """Stop the network thread, then write the DISCONNECT from this one (it owns the client now)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping.set()
            self._netloop.wake()
            thread.join()
        try:
            if self.client.socket() is not None:
                self.client.disconnect()
                self.client.loop_write()
        except OSError:  # the connection is gone already
            pass
        self._netloop.close()

    def _run(self) -> None:
        """The network thread: paho's reads, writes and keepalive until `close()` or the connection ends."""
        rc = paho.MQTT_ERR_SUCCESS
        while not self._stopping.is_set() and rc == paho.MQTT_ERR_SUCCESS:
            rc = self._netloop.turn(self.client, 1.0)
        if not self._stopping.is_set():
            with self._acked:
                self._lost = paho.error_string(rc)
                self._acked.notify_all()  # an ack waited for will not come
            self._connected.set()
            self._queue.put(None)

    def subscribe(
        self, *filters: str | tuple[str, int] | tuple[str, int, bool], qos: int = 1, timeout: float = SUBACK_TIMEOUT
    ) -> None:
        """Subscribe to every filter (a topic filter at `qos`, or (filter, QoS), or (filter, QoS, retained)) in
        ONE packet, and wait for its SUBACK: the broker answers before it sends the retained messages of any
        of them, where a second packet's SUBACK would wait behind the first one's retained burst.

        `retained` False (MQTT 5 only; 3.1.1 has no way to say it): live messages only, no retained burst.
        See `agent.cloud.fleet.inventory` for why a large retained burst is read in batches."""
        subs = [(f, qos, True) if isinstance(f, str) else (f[0], f[1], f[2] if len(f) == 3 else True) for f in filters]
        v5 = self.protocol == MQTTProtocolVersion.MQTTv5
        request: list[tuple[str, Any]] = [(f, _options(q, keep) if v5 else q) for f, q, keep in subs]
        rc, mid = self.client.subscribe(request)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise FleetError(f"cannot subscribe to {', '.join(f for f, _, _ in subs)}: {paho.error_string(rc)}")
        with self._acked:
            self._await(
                lambda: mid in self._subacks,
                timeout,
                lambda: f"the broker did not acknowledge the subscriptions within {timeout:g}s",
            )
            codes = self._subacks.pop(mid)
        for (topic_filter, _, _), code in zip(subs, codes, strict=False):
            if code.is_failure:
                raise FleetError(
                    f"the broker refused the subscription to {topic_filter}: {code} (check the ACL of this user)"
                )

    def unsubscribe(self, *filters: str) -> None:
        """Unsubscribe, not waiting for the broker's answer (nothing depends on when it comes)."""
        rc, _ = self.client.unsubscribe(list(filters))
        if rc != paho.MQTT_ERR_SUCCESS:
            raise FleetError(f"cannot unsubscribe: {paho.error_string(rc)}")

    def publish_retained(self, topic: str, payload: bytes, timeout: float = PUBACK_TIMEOUT) -> None:
        """Publish retained at QoS 1 and wait for the PUBACK; a refusal (MQTT 5 reason code) raises."""
        self.publish(topic, payload, retain=True, timeout=timeout)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = PUBACK_TIMEOUT) -> None:
        """Publish at QoS 1 and wait for the PUBACK; a refusal (MQTT 5 reason code) raises."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise FleetError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        what = "the order" if retain else "the message"
        with self._acked:
            self._await(
                lambda: info.mid in self._pubacks,
                timeout,
                lambda: f"the broker did not acknowledge {what} on {topic} within {timeout:g}s",
            )
            reason = self._pubacks.pop(info.mid)
        if reason.is_failure:
            raise FleetError(f"the broker refused the publish on {topic}: {reason} (check the ACL of this user)")

    def publish_many(self, items: list[tuple[str, bytes]], timeout: float = PUBACK_TIMEOUT) -> None:
        """Publish each (topic, payload) retained at QoS 1, then wait for every PUBACK (a wave's orders:
        thousands, so not one round trip each); the first refusal raises."""
        mids = {}
        for topic, payload in items:
            info = self.client.publish(topic, payload, qos=1, retain=True)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise FleetError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
            mids[info.mid] = topic
        with self._acked:
            self._await(
                lambda: all(m in self._pubacks for m in mids),
                timeout + len(items) / 1000,
                lambda: (
                    f"the broker did not acknowledge {sum(m not in self._pubacks for m in mids)} of {len(mids)} "
                    "publishes in time"
                ),
            )
            reasons = {m: self._pubacks.pop(m) for m in mids}
        for mid, reason in reasons.items():
            if reason.is_failure:
                raise FleetError(
                    f"the broker refused the publish on {mids[mid]}: {reason} (check the ACL of this user)"
                )

    def send(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1 without waiting: the mid, whose answer `refusal()` tells once it came."""
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise FleetError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        return info.mid

    def refusal(self, mid: int) -> ReasonCode | None:
        """The broker's refusal of a `send()`, once its PUBACK came (None: accepted, or not answered yet)."""
        with self._acked:
            reason = self._pubacks.get(mid)
        return reason if reason is not None and reason.is_failure else None

    @property
    def client_id(self) -> str:
        return self._client_id

    def receive(self, timeout: float) -> tuple[str, bytes] | None:
        """The next (topic, payload), or None after `timeout` seconds."""
        try:
            received = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        if received is None:
            self._queue.put(None)  # every later call says so too
            raise self._lost_error()
        return received

    def _lost_error(self) -> FleetError:
        return FleetError(f"lost the connection to the broker at {self.settings.url}: {self._lost}")

    def _await(self, done: Callable[[], bool], timeout: float, late: Callable[[], str]) -> None:
        """Wait, holding `_acked`, until `done()`: FleetError saying `late()` after `timeout` seconds, and at
        once when the connection is lost (not after the whole timeout)."""
        deadline = time.monotonic() + timeout
        while not done():
            if self._lost is not None:
                raise self._lost_error()
            left = deadline - time.monotonic()
            if left <= 0:
                raise FleetError(late())
            self._acked.wait(left)

    # ---- paho callbacks (network thread) ---------------------------------------------------------
    # userdata is paho's own `Any`: this client never sets it.

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # A retained burst arrives faster than Python parses it: room in the kernel keeps it off the broker's
        # per-client queue (Mosquitto drops beyond `max_queued_messages` packets waiting there, QoS 0 too).
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connect_reason = reason
        self._connected.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Properties | None
    ) -> None:
        self._connected.set()  # before any CONNACK: the broker closed the connection (`_connect_reason` None)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._acked:
            self._subacks[mid] = reasons
            self._acked.notify_all()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties
    ) -> None:
        with self._acked:
            self._pubacks[mid] = reason
            self._acked.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._queue.put((message.topic, bytes(message.payload)))
