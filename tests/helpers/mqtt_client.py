"""A plain paho-mqtt subscriber for tests: connected straight to the broker, it records what arrives."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.helpers.waiting import wait_for


class Subscriber:
    def __init__(self, port: int, *topics: str, username: str | None = None, password: str | None = None) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._lock = threading.Lock()
        self._topics = topics
        self._connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._connected.wait(10), "subscriber could not connect"
        time.sleep(0.1)  # let the SUBACKs arrive

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        for topic in self._topics:
            client.subscribe(topic, 1)
        self._connected.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(msg)

    def on(self, topic: str) -> list[paho.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def payloads(self, topic: str) -> list[Any]:
        return [json.loads(m.payload) for m in self.on(topic)]

    def wait_for(self, check: Callable[[], Any], timeout: float = 10.0) -> Any:
        return wait_for(check, timeout)

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
