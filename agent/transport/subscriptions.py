"""The connection's subscriptions: remembered, made again on every connect, and routed to handlers.

A clean start on every connect means the broker forgets subscriptions with the session, so the
connection subscribes to every remembered filter again at each CONNACK; `acknowledged` is set once the
broker has answered them all (a command sent after that reaches us). Messages are copied out of paho
into `Incoming` and handed to each handler whose filter matches, on the network thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    """A message handed to a subscription handler: copied out of paho, safe to keep."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Incoming], None]


class Subscriptions:
    """Topic filters with their handler and QoS; `on_subscribe` and `on_message` are paho callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._filters: dict[str, tuple[Handler, int]] = {}
        self._pending: set[int] = set()  # SUBSCRIBE mids not acknowledged yet (network thread only)
        self.acknowledged = threading.Event()

    def add(self, topic_filter: str, handler: Handler, qos: int) -> None:
        with self._lock:
            self._filters[topic_filter] = (handler, qos)

    def subscribe_all(self, client: paho.Client) -> None:
        """Subscribe to every filter again (on CONNACK, on the network thread)."""
        with self._lock:
            filters = [(f, qos) for f, (_handler, qos) in self._filters.items()]
        self.acknowledged.clear()
        self._pending = set()
        for topic_filter, qos in filters:
            _rc, mid = client.subscribe(topic_filter, qos)
            if mid is not None:
                self._pending.add(mid)
        if not self._pending:
            self.acknowledged.set()

    def on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            log.error("mqtt: the broker refused a subscription (%s); check its ACL for this device", failed[0])
        self._pending.discard(mid)
        if not self._pending:
            self.acknowledged.set()

    def on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)
        incoming = Incoming(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            retain=bool(message.retain),
            response_topic=getattr(props, "ResponseTopic", None) if props else None,
            correlation_data=getattr(props, "CorrelationData", None) if props else None,
            user_properties=tuple(getattr(props, "UserProperty", ()) or ()) if props else (),
        )
        with self._lock:
            handlers = [h for f, (h, _q) in self._filters.items() if paho.topic_matches_sub(f, message.topic)]
        for handler in handlers:
            try:
                handler(incoming)
            except Exception:  # a bad message must never end the network thread
                log.exception("mqtt: handler for %s failed", message.topic)
