"""Managed brokers' hard limits, named by `mqtt.preset`: what `edge-agent check` and the connection keep to.

A managed broker enforces limits that it never announces: a publish rate per connection, the depth and
length of topics, what the client id must be. Exceeding one gets the connection closed, or the message
dropped, with no reason given. A preset states them, from the vendor's published quotas (docs/brokers.md
links each), so that the agent stays under them: `check` refuses a profile that cannot (located errors),
the sink batches results to stay under the rate and refuses oversized payloads with an event, the pump
paces its publishes. What a broker does announce (MQTT 5 CONNACK: Maximum Packet Size, Maximum QoS,
Retain Available, Receive Maximum) is read at every connect (agent/transport/limits.py), preset or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PresetName = Literal["aws-iot-core", "azure-event-grid", "emqx-serverless"]

KiB = 1024


@dataclass(frozen=True)
class BrokerPreset:
    """One managed broker's limits; None where it sets none the agent could reach."""

    name: PresetName
    title: str
    publish_rate: float  # PUBLISH packets per second on one connection
    bytes_rate: float | None  # payload bytes per second on one connection
    max_payload: int  # bytes of one message's payload
    max_topic_slashes: int | None  # "/" in one topic (levels - 1)
    max_topic_bytes: int | None
    keepalive: tuple[float, float]  # the keepalive interval the broker accepts, in seconds
    tls_only: bool
    client_id_is_device_id: bool  # the broker binds the client id to the device's identity
    credentials: bool  # no anonymous access: a user name (or client certificate) is needed
    docs: str


PRESETS: dict[str, BrokerPreset] = {
    p.name: p
    for p in (
        BrokerPreset(
            name="aws-iot-core",
            title="AWS IoT Core",
            publish_rate=100,
            bytes_rate=512 * KiB,
            max_payload=128 * KiB,
            max_topic_slashes=7,
            max_topic_bytes=256,
            keepalive=(30, 1200),
            tls_only=True,
            # The thing name is the client id (policies use iot:Connection.Thing.ThingName).
            client_id_is_device_id=True,
            credentials=False,  # X.509 client certificates, which mqtt.tls already takes
            docs="https://docs.aws.amazon.com/general/latest/gr/iot-core.html#message-broker-limits",
        ),
        BrokerPreset(
            name="azure-event-grid",
            title="Azure Event Grid (MQTT broker)",
            publish_rate=1000,
            bytes_rate=1024 * KiB,
            max_payload=512 * KiB,
            max_topic_slashes=7,
            max_topic_bytes=256,
            keepalive=(1, 1160),
            tls_only=True,
            client_id_is_device_id=False,
            credentials=False,
            docs="https://learn.microsoft.com/azure/event-grid/quotas-limits",
        ),
        BrokerPreset(
            name="emqx-serverless",
            title="EMQX Cloud Serverless",
            publish_rate=10,
            bytes_rate=None,
            max_payload=1024 * KiB,
            max_topic_slashes=9,  # subscriptions: 10 topic levels
            max_topic_bytes=None,
            keepalive=(1, 65535),
            tls_only=True,
            client_id_is_device_id=False,
            credentials=True,
            docs="https://docs.emqx.com/en/cloud/latest/create/restriction.html",
        ),
    )
}

# The command with the longest name the agent answers: its reply, `<prefix>/<device>/cmd/<name>/reply`, is
# the deepest and longest topic the agent publishes.
LONGEST_COMMAND = "snapshot"
