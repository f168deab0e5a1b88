"""What this connection may send: a preset's hard limits, narrowed at every connect by what the broker announces.

An MQTT 5 broker announces some limits in CONNACK: Maximum Packet Size, Maximum QoS, Retain Available,
Receive Maximum, Topic Alias Maximum. A 3.1.1 broker announces none, and a managed broker has limits it
never announces (a publish rate, the depth of topics): those come from `mqtt.preset`
(agent/config/presets.py). `Limits` is the merge, which the connection and the pump hold to: QoS lowered
to what the broker takes, retain dropped where it keeps nothing, a message over the packet size refused
rather than sent (the broker would close the connection), publishes paced under the rate. `summary()`
is the one line logged at connect when anything is limited. `Negotiation` is what the connection tries
next: the protocol (`auto` falls back to 3.1.1 once), the Will (unretained, or at QoS 0, once a broker
refused it), the in-flight window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config.presets import BrokerPreset
from agent.config.units import format_size
from agent.transport import pahopatch
from agent.transport.refusals import QOS_NOT_SUPPORTED, RETAIN_NOT_SUPPORTED, UNSUPPORTED_PROTOCOL
from agent.util.jsonlimits import MAX_PAYLOAD_BYTES
from agent.util.ratelimit import RateLimit

log = logging.getLogger(__name__)

# The share of a preset's publish rate the pump uses: a broker counts what arrives in its own second, and a
# TCP stream that stalled for a moment delivers two of ours in one of its.
RATE_SAFETY = 0.9
# paho's own in-flight window; a broker's Receive Maximum (MQTT 5 CONNACK) replaces it.
DEFAULT_INFLIGHT = 20


@dataclass(frozen=True)
class Limits:
    """The broker as this connection knows it; a fresh connection starts from `Limits(preset=...)`."""

    preset: BrokerPreset | None = None
    protocol: Literal["5", "3.1.1"] = "5"
    mqtt5_refused: bool = False  # `auto` fell back to 3.1.1 because the broker refused or ignored MQTT 5
    retain: bool = True
    max_qos: int = 2
    max_packet: int | None = None  # bytes of a whole packet (MQTT 5 Maximum Packet Size)
    receive_maximum: int | None = None  # announced messages in flight (None: not announced)

    @classmethod
    def announced(
        cls,
        preset: BrokerPreset | None,
        protocol: Literal["5", "3.1.1"],
        properties: Properties | None,
        *,
        mqtt5_refused: bool,
        retain: bool,
    ) -> Limits:
        """The limits after a successful CONNACK with these properties (`retain` False: a broker that refused
        our retained Will)."""

        def prop(name: str) -> int | None:
            return int(getattr(properties, name)) if properties is not None and hasattr(properties, name) else None

        retain_available, max_qos = prop("RetainAvailable"), prop("MaximumQoS")
        return cls(
            preset=preset,
            protocol=protocol,
            mqtt5_refused=mqtt5_refused,
            retain=retain and retain_available != 0,
            max_qos=2 if max_qos is None else max_qos,
            max_packet=prop("MaximumPacketSize"),
            receive_maximum=prop("ReceiveMaximum"),
        )

    def qos(self, wanted: int) -> int:
        """The QoS to publish with: a broker disconnects a client that exceeds its Maximum QoS."""
        return min(wanted, self.max_qos)

    def too_large(self, topic: str, payload: int, qos: int) -> str | None:
        """Why a message cannot be sent here (one line), or None when it fits."""
        if self.preset is not None and payload > self.preset.max_payload:
            return (
                f"{payload} bytes, over the {format_size(self.preset.max_payload)} payloads "
                f"{self.preset.title} takes (mqtt.preset)"
            )
        if self.max_packet is not None:
            size = packet_size(topic, payload, qos, self.protocol == "5")
            if size > self.max_packet:
                return f"a {size}-byte packet, over the broker's Maximum Packet Size of {self.max_packet} bytes"
        return None

    def rate_limit(self, clock: Callable[[], float] = time.monotonic) -> RateLimit | None:
        """The pace the preset allows on one connection (shared by the pump and direct publishes)."""
        preset = self.preset
        if preset is None:
            return None
        size = preset.bytes_rate * RATE_SAFETY if preset.bytes_rate else None
        return RateLimit(max(1, int(preset.publish_rate * RATE_SAFETY)), size, clock=clock)

    def summary(self) -> tuple[str, bool] | None:
        """(the one line to log, whether something the agent relies on is missing), or None: no limit."""
        notes: list[str] = []
        degraded = False
        if self.mqtt5_refused:
            notes.append(
                "MQTT 3.1.1 (the broker does not take MQTT 5): command replies go to cmd/<name>/reply, without "
                "a response topic or correlation data"
            )
        if not self.retain:
            degraded = True
            notes.append(
                "no retained messages: status, health and the Will go out unretained, and deployment orders "
                "reach this device only while it is connected"
            )
        if self.max_qos < 1:
            degraded = True
            notes.append("QoS 0 only: results leave the outbox when sent, without the broker's acknowledgement")
        if self.max_packet is not None:
            notes.append(f"packets up to {self.max_packet} bytes; larger messages are refused and counted")
        if self.preset is not None:
            preset = self.preset
            notes.append(
                f"{preset.title}'s limits (mqtt.preset): at most {preset.publish_rate:g} publishes/s, so results "
                f"go several to a message; payloads up to {format_size(preset.max_payload)}"
            )
        return ("; ".join(notes), degraded) if notes else None


def packet_size(topic: str, payload: int, qos: int, mqtt5: bool) -> int:
    """Bytes of a PUBLISH packet (no properties but their length byte on MQTT 5)."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if mqtt5 else 0) + payload
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


# The largest packet this device reads, announced in its MQTT 5 CONNECT (Maximum Packet Size): the broker
# then drops a larger message for us instead of sending it, and paho never holds it in memory. Everything
# the device subscribes to (commands, orders, sensor payloads) is refused above 1 MiB anyway; the rest is
# room for the topic and the packet's header and properties.
MAX_INBOUND_PACKET = MAX_PAYLOAD_BYTES + (64 << 10)


def connect_properties() -> Properties:
    """What an MQTT 5 CONNECT announces of this device: the largest packet it reads."""
    announced = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it unannotated
    announced.MaximumPacketSize = MAX_INBOUND_PACKET
    return announced


class Negotiation:
    """What the connection tries next, and what the broker took: one per connection, kept across clients."""

    def __init__(self, protocol: Literal["auto", "5", "3.1.1"], preset: BrokerPreset | None) -> None:
        self.mqtt5 = protocol != "3.1.1"
        self.known = protocol != "auto"  # fixed by the profile, or learnt at the first CONNACK
        self.mqtt5_refused = False
        self.will: tuple[int, bool] = (1, True)  # (QoS, retain) until a broker refuses them
        self.inflight = DEFAULT_INFLIGHT
        self.limits = Limits(preset=preset)
        self._said: str | None = None

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        return "5" if self.mqtt5 else "3.1.1"

    def may_switch(self, first: bool) -> bool:
        """`auto`, before the first success, still on MQTT 5: a refusal may be the protocol's (once)."""
        return not self.known and first and self.mqtt5

    def switch(self) -> None:
        """The other protocol next (quietly: the line at connect says what was settled)."""
        self.mqtt5_refused = self.mqtt5
        self.mqtt5 = not self.mqtt5

    def after_refusal(self, code: int, *, first: bool) -> bool:
        """After a CONNACK refusal: True when something else is worth a try (3.1.1, or a Will without the
        retain flag or QoS the broker refused; the line at connect says so), False when the refusal is final."""
        qos, retain = self.will
        if code == UNSUPPORTED_PROTOCOL and self.may_switch(first):
            self.switch()
        elif code == RETAIN_NOT_SUPPORTED and retain:
            self.will = (qos, False)
        elif code == QOS_NOT_SUPPORTED and qos:
            self.will = (0, retain)
        else:
            return False
        return True

    def adopt_window(self, client: paho.Client, properties: Properties | None) -> bool:
        """paho's in-flight window becomes the broker's Receive Maximum; False when that needs a new client.

        A client that sends more than the broker's Receive Maximum gets disconnected (MQTT 5, 3.3.4).
        """
        limit = DEFAULT_INFLIGHT
        if properties is not None and hasattr(properties, "ReceiveMaximum"):
            limit = int(properties.ReceiveMaximum)
        current = client.max_inflight_messages
        if limit != current and not pahopatch.adopt_receive_maximum(client, limit) and limit < current:
            # Stock paho cannot lower its window on a live connection: a client built with it must connect.
            log.info("mqtt: the broker takes %d messages in flight; connecting again with that window", limit)
            self.inflight = limit
            return False
        self.inflight = client.max_inflight_messages
        return True

    def connected(self, properties: Properties | None, broker: str) -> Limits:
        """A successful CONNACK: the protocol is settled, the limits are read and said once when they change."""
        self.known = True
        self.limits = Limits.announced(
            self.limits.preset, self.protocol, properties, mqtt5_refused=self.mqtt5_refused, retain=self.will[1]
        )
        summary = self.limits.summary()
        text = summary[0] if summary else None
        if summary and text != self._said:
            log.log(logging.WARNING if summary[1] else logging.INFO, "mqtt: the broker at %s: %s", broker, text)
        self._said = text
        return self.limits
