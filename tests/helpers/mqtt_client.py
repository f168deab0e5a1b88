"""A plain paho-mqtt subscriber for tests: connected straight to the broker, it records what arrives.

Every device message it receives (events, health, status, command replies) is also checked against the
wire contract (`agent.transport.contract`); a message that does not match is recorded in `VIOLATIONS`,
and the autouse fixture `fail_on_contract_violations` (tests/conftest.py) fails the test that saw it.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport.contract import ContractError
from agent.transport.contract.wire import PARSERS, Kind
from tests.helpers.waiting import wait_for


def contract_kind(topic: str) -> Kind | None:
    """Which contract a device topic's messages follow: `<prefix>/<device>/events|health|status` and
    `<prefix>/<device>/cmd/<name>/reply` (and `report`); None for results, orders, requests and anything else."""
    levels = topic.split("/")
    if len(levels) >= 4 and levels[-1] == "reply" and levels[-3] == "cmd":
        return "reply"
    if len(levels) >= 3 and levels[-2] != "cmd":
        return _DEVICE_TOPICS.get(levels[-1])
    return None


_DEVICE_TOPICS: dict[str, Kind] = {"events": "events", "health": "health", "status": "status", "report": "report"}


class ContractViolations:
    """Device messages that did not match the contract, as "topic: error", until a test takes them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._found: list[str] = []

    def check(self, topic: str, payload: bytes) -> None:
        kind = contract_kind(topic)
        if kind is None or not payload:  # an empty retained payload clears the topic
            return
        try:
            PARSERS[kind](payload)
        except ContractError as exc:
            with self._lock:
                self._found.append(f"{topic}: {exc}")

    def take(self) -> list[str]:
        with self._lock:
            found, self._found = self._found, []
        return found


VIOLATIONS = ContractViolations()


class Subscriber:
    def __init__(
        self,
        port: int,
        *topics: str,
        username: str | None = None,
        password: str | None = None,
        protocol: int = paho.MQTTv5,
    ) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._lock = threading.Lock()
        self._topics = topics
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending: set[int] = set()  # SUBACKs not in yet
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}", protocol=protocol
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._connected.wait(10), "subscriber could not connect"
        # What another client publishes from now on reaches this one (a guessed 0.1 s used to stand here).
        assert self._subscribed.wait(10), "the broker did not acknowledge the subscriptions"

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._lock:
            mids = (client.subscribe(topic, 1)[1] for topic in self._topics)
            self._pending = {mid for mid in mids if mid is not None}
            if not self._pending:
                self._subscribed.set()
        self._connected.set()

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._lock:
            self._pending.discard(mid)
            if not self._pending:
                self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        VIOLATIONS.check(msg.topic, bytes(msg.payload))
        with self._lock:
            self.messages.append(msg)

    def on(self, topic: str) -> list[paho.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def payloads(self, topic: str) -> list[Any]:
        return [json.loads(m.payload) for m in self.on(topic)]

    def wait_for(self, check: Callable[[], Any], timeout: float = 10.0) -> Any:
        return wait_for(check, timeout)

    def sync(self, timeout: float = 10.0) -> None:
        """Every retained message of this subscriber's topics is in, none guessed by a sleep: a marker it
        publishes to itself after subscribing arrives after them (the broker keeps one connection's
        messages in order, as `agent.cloud.fleet.inventory` relies on too)."""
        marker = f"test-marker/{uuid.uuid4().hex}"
        self.client.subscribe(marker, 1)
        self.publish(marker, b"marker")
        assert self.wait_for(lambda: self.on(marker), timeout), f"the marker on {marker} did not come back"

    def publish(
        self, topic: str, payload: bytes | str, response_topic: str | None = None, correlation: bytes | None = None
    ) -> None:
        props = None
        if response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def seqs(payloads: list[dict[str, Any]]) -> list[int]:
    """Every seq in result payloads, batches included."""
    out: list[int] = []
    for p in payloads:
        if "results" in p:
            out.extend(r["seq"] for r in p["results"])
        else:
            out.append(p["seq"])
    return out
